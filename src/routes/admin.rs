//! The operators' API, on only when `admin.key_sha256` is set and only for
//! the admin key (never a client's or a vendor's): `GET /admin/stats` (what
//! `embgate stats` prints, as JSON) and `POST /admin/purge` (what `embgate
//! purge` does, the filters as JSON, `dry_run` included).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use crate::error::ApiError;
use crate::purge::{self, Filter, PurgeError};
use crate::stats;

/// Entries scanned per step of a purge through the API.
const PURGE_BATCH: usize = 500;

pub async fn stats(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.auth.admin(&headers)?;
    let store = state.pipeline.cache().store();
    let models = state.purge.models();
    let stats = stats::collect(store.as_ref(), models.iter().map(String::as_str))
        .await
        .map_err(|e| ApiError::Unavailable(format!("store: {e}")))?;
    Ok(Json(stats.to_json()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    #[serde(flatten)]
    filter: Filter,
    #[serde(default)]
    dry_run: bool,
}

pub async fn purge(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.auth.admin(&headers)?;
    let request: PurgeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BodyRead(format!("a purge is a JSON object of filters: {e}")))?;
    let store = state.pipeline.cache().store();
    let report = purge::run(
        store.as_ref(),
        &state.purge,
        &request.filter,
        request.dry_run,
        PURGE_BATCH,
        None,
    )
    .await
    .map_err(|e| match e {
        PurgeError::Filter(m) => ApiError::BodyRead(m),
        PurgeError::Store(e) => ApiError::Unavailable(format!("store: {e}")),
    })?;
    Ok(Json(report).into_response())
}

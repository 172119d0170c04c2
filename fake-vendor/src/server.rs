//! Router and accept loop.
//!
//! The loop is hand-rolled rather than `axum::serve` so that a handler can
//! make its connection close without any response (the `CloseConnection`
//! fault), and so that dropping the server task also drops every connection.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tower_service::Service;

use crate::error::ApiError;
use crate::native::{bedrock, cohere, gemini, voyage};
use crate::{Shared, batches, embeddings, passthrough};

/// Largest request body read; OpenAI accepts multi-megabyte embedding
/// batches (2048 inputs of up to 8192 tokens).
pub(crate) const MAX_BODY: usize = 64 * 1024 * 1024;

/// Request extension through which a handler asks for its connection to be
/// dropped.
#[derive(Clone)]
pub(crate) struct ConnectionKill(pub Arc<Notify>);

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings::handle))
        .route("/v2/embed", post(cohere::handle))
        .route("/voyage/v1/embeddings", post(voyage::handle))
        .route("/v1beta/models/{spec}", post(gemini::handle))
        .route("/model/{id}/invoke", post(bedrock::handle))
        .route("/v1/models", get(passthrough::list_models))
        .route("/v1/models/{*id}", get(passthrough::get_model))
        .route("/v1/chat/completions", post(passthrough::chat_completions))
        .route("/v1/echo", any(passthrough::echo))
        .route("/v1/echo/{*rest}", any(passthrough::echo))
        .merge(batch_routes(shared.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            log_request,
        ))
        .with_state(shared)
}

/// The Files and Batch APIs, behind the key check: OpenAI's under `/v1`,
/// Azure OpenAI's under `/openai` (its `api-key` header and `api-version`).
fn batch_routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let routes = |prefix: &str| {
        let upload = post(batches::upload).layer(axum::extract::DefaultBodyLimit::max(
            batches::MAX_FILE_BYTES + 64 * 1024,
        ));
        Router::new()
            .route(&format!("{prefix}/files"), upload)
            .route(&format!("{prefix}/files/{{id}}"), get(batches::file))
            .route(
                &format!("{prefix}/files/{{id}}/content"),
                get(batches::content),
            )
            .route(&format!("{prefix}/batches"), post(batches::create))
            .route(&format!("{prefix}/batches/{{id}}"), get(batches::retrieve))
            .route(
                &format!("{prefix}/batches/{{id}}/cancel"),
                post(batches::cancel),
            )
    };
    let openai = routes("/v1").route_layer(axum::middleware::from_fn_with_state(
        shared.clone(),
        batches::require_key,
    ));
    let azure = routes("/openai").route_layer(axum::middleware::from_fn_with_state(
        shared,
        batches::require_azure_key,
    ));
    openai.merge(azure)
}

/// Records every request line before any route sees it.
async fn log_request(
    State(shared): State<Arc<Shared>>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
    shared.record_seen(format!("{} {target}", req.method()));
    next.run(req).await
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("Invalid URL ({method} {})", uri.path()),
    )
    .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("Invalid method for URL ({method} {})", uri.path()),
    )
    .into_response()
}

pub(crate) async fn serve(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Transient failures such as EMFILE: back off briefly.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                connections.spawn(connection(stream, router.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, router: Router) {
    let kill = Arc::new(Notify::new());
    let handler_kill = kill.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut()
            .insert(ConnectionKill(handler_kill.clone()));
        let mut router = router.clone();
        async move {
            let response: Result<Response<Body>, Infallible> = router.call(req).await;
            response
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = kill.notified() => {}
    }
}

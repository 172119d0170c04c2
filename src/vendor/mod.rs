//! The vendors: which upstream serves a model ([`Upstreams`]), the HTTP
//! client of one upstream with its retries ([`client`]), the checks every
//! answer passes before anything is trusted ([`response`]), how misses are
//! split into calls within the vendor's limits ([`batch`]), the Batch API
//! for `embgate warm --batch-api` ([`batch_api`]), and what each input costs
//! in tokens ([`tokens`]).

pub mod batch;
pub mod batch_api;
mod client;
mod response;
pub mod tokens;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use client::{CallerAuth, EmbedCall, Embeddings, Upstream, UpstreamError};

use crate::config::Settings;
use crate::metrics::Metrics;

/// Every configured vendor, and which one serves a model.
pub struct Upstreams {
    default: Arc<Upstream>,
    exact: HashMap<String, Arc<Upstream>>,
    /// Longest prefix first.
    prefixes: Vec<(String, Arc<Upstream>)>,
}

impl Upstreams {
    pub fn new(settings: &Settings, metrics: &Arc<Metrics>) -> Result<Upstreams, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let default = Arc::new(Upstream::new(
            "default",
            http.clone(),
            &settings.upstream.base_url,
            &settings.upstream.api_key,
            None,
            &settings.upstream,
            metrics,
        ));
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        let mut names: Vec<&String> = settings.upstreams.keys().collect();
        names.sort();
        for name in names {
            let named = &settings.upstreams[name];
            let upstream = Arc::new(Upstream::new(
                name,
                http.clone(),
                &named.base_url,
                &named.api_key,
                Some(named),
                &settings.upstream,
                metrics,
            ));
            if !upstream.can_call() {
                return Err(format!(
                    "upstreams.{name}: a bedrock upstream needs AWS_ACCESS_KEY_ID, \
                     AWS_SECRET_ACCESS_KEY and AWS_REGION"
                ));
            }
            for pattern in named
                .models
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
            {
                match pattern.strip_suffix('*') {
                    Some(prefix) => prefixes.push((prefix.to_owned(), Arc::clone(&upstream))),
                    None => {
                        exact.insert(pattern.to_owned(), Arc::clone(&upstream));
                    }
                }
            }
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        Ok(Upstreams {
            default,
            exact,
            prefixes,
        })
    }

    /// The upstream serving `model`: an exact name, else the longest
    /// prefix, else the default.
    pub fn route(&self, model: &str) -> &Arc<Upstream> {
        self.exact
            .get(model)
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| model.starts_with(p.as_str()))
                    .map(|(_, u)| u)
            })
            .unwrap_or(&self.default)
    }

    /// The upstream that other routes are passed through to.
    pub fn default(&self) -> &Arc<Upstream> {
        &self.default
    }

    /// The model names configured exactly (not by prefix), for metric labels.
    pub fn exact_models(&self) -> impl Iterator<Item = &str> {
        self.exact.keys().map(String::as_str)
    }
}

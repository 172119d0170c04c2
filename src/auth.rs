//! Who may use the gateway. A cache hit must never be a way around the
//! vendor's authentication:
//!
//! - forward: callers bring their own vendor key. Each distinct key is
//!   verified once with the vendor that serves the request (the verdict is
//!   remembered, by endpoint and the key's hash, for `auth.verify_ttl_secs`)
//!   before any vector, cached or not, is returned.
//! - gateway: callers present client keys listed (hashed) under
//!   `auth.tenants`; the gateway's own vendor keys pay.
//! - open: no caller authentication; the gateway's vendor key pays.
//!
//! Keys never reach logs, metrics or error messages: only [`ApiKey::id`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use sha2::{Digest, Sha256};

use crate::config::{AuthMode, ConfigError, Settings, TenantCache};
use crate::metrics::Metrics;
use crate::vendor::{Upstream, UpstreamError};

/// A secret key. Its `Debug` shows only its id.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: &str) -> ApiKey {
        ApiKey(key.to_owned())
    }

    pub fn sha256(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// A short, non-reversible id, safe to log: the first 8 hex digits of
    /// the key's SHA-256.
    pub fn id(&self) -> String {
        hex(&self.sha256()[..4])
    }

    /// `Authorization: Bearer <key>`, marked sensitive.
    pub fn bearer(&self) -> Option<HeaderValue> {
        sensitive(HeaderValue::from_str(&format!("Bearer {}", self.0)).ok()?)
    }

    /// The bare key as a header value (Azure's `api-key`), marked sensitive.
    pub fn header_value(&self) -> Option<HeaderValue> {
        sensitive(HeaderValue::from_str(&self.0).ok()?)
    }
}

fn sensitive(mut v: HeaderValue) -> Option<HeaderValue> {
    v.set_sensitive(true);
    Some(v)
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.id())
    }
}

/// Hex SHA-256 of a key, as `auth.tenants.<name>.key_sha256` wants it.
pub fn hash_key(key: &str) -> String {
    hex(&ApiKey::new(key).sha256())
}

/// The 32 bytes written as 64 hex digits.
fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (hex.len() == 64).then_some(hash)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Azure's key header.
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// The key a request presents: `Authorization: Bearer K`, `api-key: K`
/// (Azure) or `x-goog-api-key: K` (Gemini).
pub fn presented_key(headers: &HeaderMap) -> Option<ApiKey> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let azure = || headers.get(API_KEY).and_then(|v| v.to_str().ok());
    let google = || {
        headers
            .get(crate::vendor::wire::X_GOOG_API_KEY)
            .and_then(|v| v.to_str().ok())
    };
    bearer
        .or_else(azure)
        .or_else(google)
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(ApiKey::new)
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Labels metrics and the ledger; `default` outside gateway mode.
    pub tenant: Arc<str>,
    /// This tenant's entries are kept apart.
    pub isolated: bool,
    /// What this tenant's requests may do with the cache.
    pub cache: TenantCache,
    /// Forward mode: the caller's vendor key, used for its misses.
    pub key: Option<ApiKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "You didn't provide an API key. You need to provide your API key in an Authorization \
         header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
    )]
    Missing,
    #[error("Incorrect API key provided (key id {0}).")]
    Rejected(String),
    /// The vendor could not say whether it accepts the key.
    #[error(transparent)]
    Vendor(#[from] UpstreamError),
    #[error("The admin API is off: the operator enables it by setting admin.key_sha256.")]
    AdminOff,
}

struct Tenant {
    name: Arc<str>,
    isolated: bool,
    cache: TenantCache,
}

pub struct Auth {
    mode: AuthMode,
    tenants: HashMap<[u8; 32], Tenant>,
    /// SHA-256 of the admin key, when the admin API is on.
    admin: Option<[u8; 32]>,
    default_tenant: Arc<str>,
    /// Vendor verdicts by (endpoint, key hash); concurrent checks of one
    /// key share a single vendor call.
    verdicts: moka::future::Cache<(String, [u8; 32]), bool>,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// Fails when `auto` cannot decide (see [`Settings::auth_mode`]) or a
    /// tenant's hash is not hex SHA-256.
    pub fn new(settings: &Settings, metrics: Arc<Metrics>) -> Result<Auth, ConfigError> {
        let mode = settings.auth_mode()?;
        let mut tenants = HashMap::new();
        for (name, t) in &settings.auth.tenants {
            let hash = parse_sha256(&t.key_sha256).ok_or_else(|| ConfigError::Invalid {
                key: "auth.tenants",
                reason: format!("{name}: key_sha256 is not hex SHA-256"),
            })?;
            tenants.insert(
                hash,
                Tenant {
                    name: Arc::from(name.as_str()),
                    isolated: t.isolated,
                    cache: t.cache,
                },
            );
        }
        let admin = match settings.admin.key_sha256.as_str() {
            "" => None,
            hex => Some(parse_sha256(hex).ok_or_else(|| ConfigError::Invalid {
                key: "admin.key_sha256",
                reason: "not hex SHA-256".to_owned(),
            })?),
        };
        Ok(Auth {
            mode,
            tenants,
            admin,
            default_tenant: Arc::from("default"),
            verdicts: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(settings.auth.verify_ttl_secs.max(1)))
                .build(),
            metrics,
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Who is calling; gateway mode refuses unknown keys here.
    /// Lets an operator in: only the admin key opens `/admin/*`; client
    /// keys and vendor keys never do.
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let admin = self.admin.ok_or(AuthError::AdminOff)?;
        let key = presented_key(headers).ok_or(AuthError::Missing)?;
        if key.sha256() == admin {
            Ok(())
        } else {
            Err(AuthError::Rejected(key.id()))
        }
    }

    pub fn identify(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let presented = presented_key(headers);
        match self.mode {
            AuthMode::Gateway => {
                let key = presented.ok_or(AuthError::Missing)?;
                let tenant = self
                    .tenants
                    .get(&key.sha256())
                    .ok_or_else(|| AuthError::Rejected(key.id()))?;
                Ok(Caller {
                    tenant: Arc::clone(&tenant.name),
                    isolated: tenant.isolated,
                    cache: tenant.cache,
                    key: None,
                })
            }
            // `Auth::new` resolved `auto`; it is listed for completeness.
            AuthMode::Forward | AuthMode::Auto => Ok(Caller {
                tenant: Arc::clone(&self.default_tenant),
                isolated: false,
                cache: TenantCache::ReadWrite,
                key: Some(presented.ok_or(AuthError::Missing)?),
            }),
            AuthMode::Open => Ok(Caller {
                tenant: Arc::clone(&self.default_tenant),
                isolated: false,
                cache: TenantCache::ReadWrite,
                key: None,
            }),
        }
    }

    /// Forward mode: makes sure the caller's key may use the endpoint that
    /// serves `model` at `upstream` (the upstream the request goes to) before
    /// anything is served. That vendor judges even when the gateway holds a
    /// key of its own for it: a caller must hold a key of the vendor whose
    /// vectors it gets, so one vendor's key never unlocks another's cache or
    /// spends another upstream's key.
    pub async fn admit(
        &self,
        caller: &Caller,
        upstream: &Upstream,
        model: &str,
    ) -> Result<(), AuthError> {
        let Some(key) = &caller.key else {
            return Ok(());
        };
        // The namespace is the endpoint (base URL, and for Azure the
        // deployment): one verdict per endpoint a key is used on.
        let accepted = self
            .verdicts
            .try_get_with((upstream.namespace(model), key.sha256()), async {
                let verdict = upstream.verify_key(key, model).await;
                let label = match &verdict {
                    Ok(true) => "accepted",
                    Ok(false) => "rejected",
                    Err(_) => "error",
                };
                self.metrics
                    .auth_verifications
                    .with_label_values(&[label])
                    .inc();
                verdict
            })
            .await
            .map_err(|e| AuthError::Vendor((*e).clone()))?;
        if accepted {
            Ok(())
        } else {
            tracing::info!(key_id = %key.id(), upstream = %upstream.name(), "vendor rejected key");
            Err(AuthError::Rejected(key.id()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_show_only_their_id() {
        let key = ApiKey::new("sk-very-secret");
        assert_eq!(format!("{key:?}"), format!("ApiKey({})", key.id()));
        assert_eq!(key.id().len(), 8);
        assert!(!format!("{key:?}").contains("secret"));
        assert_eq!(hash_key("abc").len(), 64);
    }

    #[test]
    fn presented_key_reads_bearer_and_azure_headers() {
        let mut h = HeaderMap::new();
        assert!(presented_key(&h).is_none());
        h.insert("api-key", HeaderValue::from_static("az-1"));
        assert_eq!(presented_key(&h), Some(ApiKey::new("az-1")));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-1"),
        );
        assert_eq!(presented_key(&h), Some(ApiKey::new("sk-1")));
    }
}

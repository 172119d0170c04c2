//! Settings: built-in defaults, then an optional TOML file, then `EMBGATE__*`
//! environment variables (`__` separates levels: `EMBGATE__STORE__URL`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The defaults, written as the TOML a user would write. Every key a user can
/// set has a value here, so `.env.example` and the README can be checked
/// against one place.
pub const DEFAULTS: &str = r#"
listen = "0.0.0.0:8080"

[store]
url = ""
path = "embgate-data/cache.redb"
max_bytes = 0
cache_bytes = 268435456
key_prefix = "embgate"
timeout_ms = 50
max_wait_ms = 1000
write_timeout_ms = 1000
max_pending_write_bytes = 268435456
breaker_failures = 5
breaker_open_ms = 500
breaker_max_open_ms = 10000

[upstream]
base_url = "https://api.openai.com/v1"
api_key = ""
timeout_secs = 60
max_inputs_per_call = 2048
max_tokens_per_call = 300000
max_concurrency = 4
max_retries = 4
retry_deadline_secs = 60
max_dimensions = 4096

[ledger]
sync_secs = 5

[metrics]
max_models = 100

[l1]
max_bytes = 134217728

[auth]
mode = "auto"
verify_ttl_secs = 300

[coalesce]
distributed = false
lease_ms = 10000
poll_ms = 20

[limits]
max_body_bytes = 67108864
max_inputs = 2048
max_input_bytes = 1048576

[prices]
"text-embedding-3-small" = 0.02
"text-embedding-3-large" = 0.13
"text-embedding-ada-002" = 0.10
"#;

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Address the HTTP server binds.
    pub listen: String,
    pub store: StoreSettings,
    pub upstream: UpstreamSettings,
    pub limits: LimitSettings,
    pub coalesce: CoalesceSettings,
    pub auth: AuthSettings,
    pub ledger: LedgerSettings,
    pub metrics: MetricsSettings,
    pub l1: L1Settings,
    /// More vendors, by name, each serving the models it lists.
    #[serde(default)]
    pub upstreams: HashMap<String, NamedUpstream>,
    /// USD per 1M input tokens, by model name.
    pub prices: HashMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StoreSettings {
    /// Redis shared by gateways; empty: the embedded store at `path`.
    pub url: String,
    /// The embedded store's file (its directory is created at start).
    pub path: String,
    /// The embedded store evicts least recently used entries past this
    /// many bytes of entries; 0: never (entries were paid for).
    pub max_bytes: u64,
    /// The embedded store's page cache, in memory.
    pub cache_bytes: u64,
    pub key_prefix: String,
    /// A lookup waits for the store as long as the vendor typically takes
    /// to answer (waiting is cheaper than paying again), but at least this
    /// long...
    pub timeout_ms: u64,
    /// ... and at most this long (each plus 0.1 ms per key looked up).
    pub max_wait_ms: u64,
    /// Writes carry whole vectors (up to tens of MB per request), so they get longer.
    pub write_timeout_ms: u64,
    /// Bytes of fetched entries waiting to be written; past it, new ones
    /// are served but not stored.
    pub max_pending_write_bytes: u64,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker first stays open; doubled while probes fail...
    pub breaker_open_ms: u64,
    /// ... up to this.
    pub breaker_max_open_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamSettings {
    pub base_url: String,
    /// Vendor key the gateway uses; empty means "forward the caller's `Authorization`".
    pub api_key: String,
    pub timeout_secs: u64,
    pub max_inputs_per_call: usize,
    pub max_tokens_per_call: u64,
    pub max_concurrency: usize,
    pub max_retries: u32,
    pub retry_deadline_secs: u64,
    /// The most dimensions a model without `dimensions` in its request is
    /// expected to return; bounds how much of an answer is read.
    pub max_dimensions: u32,
}

/// The in-process cache in front of the store.
#[derive(Debug, Clone, Deserialize)]
pub struct L1Settings {
    /// Bytes of entries kept in process; 0 disables it.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LedgerSettings {
    /// How often the savings ledger is written to the store and the store
    /// gauges (entries, memory) are refreshed.
    pub sync_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    /// Models that get a label of their own (beyond configured and priced
    /// ones); others count as `other`.
    pub max_models: usize,
}

/// Who may use the gateway, and whose vendor key pays.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// Forward mode: how long the vendor's verdict on a key is remembered.
    pub verify_ttl_secs: u64,
    /// Gateway mode: client keys by tenant name.
    #[serde(default)]
    pub tenants: HashMap<String, TenantSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `forward` when `upstream.api_key` is empty, else `open`.
    Auto,
    /// Callers bring their own vendor key; it is verified with the vendor
    /// (even for a full hit) and used for their misses.
    Forward,
    /// Callers present keys listed under `auth.tenants`; the gateway's own
    /// vendor keys pay.
    Gateway,
    /// No caller authentication; the gateway's vendor key pays.
    Open,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TenantSettings {
    /// Hex SHA-256 of the client key (`embgate hash-key KEY` prints it).
    pub key_sha256: String,
    /// Keep this tenant's cache entries apart from everyone else's.
    #[serde(default)]
    pub isolated: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// OpenAI and compatible APIs (Mistral, Together, Voyage, Ollama, TEI...).
    #[default]
    Openai,
    /// Azure OpenAI: deployment paths, `api-version`, `api-key` header.
    Azure,
}

/// An extra vendor; timeouts, retries and batch limits come from `[upstream]`.
#[derive(Debug, Clone, Deserialize)]
pub struct NamedUpstream {
    pub base_url: String,
    #[serde(default)]
    pub api_key: String,
    #[serde(default)]
    pub flavour: Flavour,
    /// Comma-separated model names it serves; `name*` matches a prefix.
    pub models: String,
    /// Azure: the `api-version` query parameter.
    #[serde(default)]
    pub api_version: String,
    /// Azure: deployment name by model (default: the model name).
    #[serde(default)]
    pub deployments: HashMap<String, String>,
}

/// Concurrent misses on one key are always fetched once per process; with
/// `distributed`, once per fleet of gateways sharing a Redis.
#[derive(Debug, Clone, Deserialize)]
pub struct CoalesceSettings {
    pub distributed: bool,
    /// How long another instance may hold a key's fetch before we fetch too.
    pub lease_ms: u64,
    /// How often a waiting instance looks for the entry.
    pub poll_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LimitSettings {
    pub max_body_bytes: usize,
    pub max_inputs: usize,
    /// Longest single input, in bytes of UTF-8 (or 4 bytes per token id).
    pub max_input_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Settings {
    /// Loads defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, None)
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let environment = config::Environment::with_prefix("EMBGATE")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(env);
        let settings: Settings = builder.add_source(environment).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if reqwest::Url::parse(&self.upstream.base_url).is_err() {
            return invalid("upstream.base_url", "not a URL");
        }
        if self.store.is_embedded() {
            if self.store.path.trim().is_empty() {
                return invalid(
                    "store.path",
                    "the embedded store needs a file (or set store.url)",
                );
            }
            if self.coalesce.distributed {
                return invalid(
                    "coalesce.distributed",
                    "coalescing across gateways needs a store they share: set store.url to a Redis",
                );
            }
        } else if self.store.max_bytes > 0 {
            return invalid(
                "store.max_bytes",
                "bounds the embedded store only; bound Redis with its own maxmemory",
            );
        }
        if self.store.key_prefix.is_empty() || self.store.key_prefix.contains(char::is_whitespace) {
            return invalid("store.key_prefix", "must be non-empty, without spaces");
        }
        if self.store.timeout_ms == 0
            || self.store.write_timeout_ms == 0
            || self.store.max_wait_ms == 0
        {
            return invalid("store.timeout_ms", "timeouts must be positive");
        }
        if self.store.breaker_failures == 0
            || self.store.breaker_open_ms == 0
            || self.store.breaker_max_open_ms < self.store.breaker_open_ms
        {
            return invalid(
                "store.breaker_*",
                "breaker_failures and breaker_open_ms must be positive, breaker_max_open_ms at least breaker_open_ms",
            );
        }
        if self.upstream.max_dimensions == 0 {
            return invalid("upstream.max_dimensions", "must be positive");
        }
        if self.upstream.timeout_secs == 0 {
            return invalid("upstream.timeout_secs", "must be positive");
        }
        if self.upstream.max_inputs_per_call == 0
            || self.upstream.max_tokens_per_call == 0
            || self.upstream.max_concurrency == 0
        {
            return invalid("upstream.max_*", "batch limits must be positive");
        }
        if self.ledger.sync_secs == 0 {
            return invalid("ledger.sync_secs", "must be positive");
        }
        if self.coalesce.lease_ms == 0 || self.coalesce.poll_ms == 0 {
            return invalid("coalesce", "lease_ms and poll_ms must be positive");
        }
        for (name, u) in &self.upstreams {
            if reqwest::Url::parse(&u.base_url).is_err() {
                return Err(ConfigError::Invalid {
                    key: "upstreams",
                    reason: format!("{name}: base_url is not a URL"),
                });
            }
            if u.flavour == Flavour::Azure && u.api_version.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "upstreams",
                    reason: format!("{name}: an azure upstream needs api_version"),
                });
            }
        }
        if self.auth_mode() == AuthMode::Gateway {
            if self.auth.tenants.is_empty() {
                return invalid("auth.tenants", "gateway mode needs at least one tenant key");
            }
            if self.upstream.api_key.is_empty()
                || self.upstreams.values().any(|u| u.api_key.is_empty())
            {
                return invalid(
                    "upstream.api_key",
                    "gateway mode needs the gateway's own vendor key on every upstream",
                );
            }
            if let Some((name, _)) = self.auth.tenants.iter().find(|(_, t)| {
                t.key_sha256.len() != 64 || !t.key_sha256.chars().all(|c| c.is_ascii_hexdigit())
            }) {
                return Err(ConfigError::Invalid {
                    key: "auth.tenants",
                    reason: format!("{name}: key_sha256 must be 64 hex digits"),
                });
            }
        }
        if self.limits.max_inputs == 0 || self.limits.max_body_bytes == 0 {
            return invalid("limits", "limits must be positive");
        }
        if let Some((model, _)) = self
            .prices
            .iter()
            .find(|(_, p)| !(p.is_finite() && **p >= 0.0))
        {
            return Err(ConfigError::Invalid {
                key: "prices",
                reason: format!("price of {model} must be a non-negative number"),
            });
        }
        Ok(())
    }

    /// The mode in force, with `auto` resolved.
    pub fn auth_mode(&self) -> AuthMode {
        match self.auth.mode {
            AuthMode::Auto if self.upstream.api_key.is_empty() => AuthMode::Forward,
            AuthMode::Auto => AuthMode::Open,
            mode => mode,
        }
    }

    /// The vendor key the gateway itself holds, if any.
    pub fn upstream_api_key(&self) -> Option<&str> {
        Some(self.upstream.api_key.as_str()).filter(|k| !k.is_empty())
    }
}

impl StoreSettings {
    /// No Redis named: the gateway keeps its cache in its own file.
    pub fn is_embedded(&self) -> bool {
        self.url.trim().is_empty()
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_are_complete() {
        let s = Settings::load_from(None, env(&[])).expect("defaults load");
        assert_eq!(s.listen, "0.0.0.0:8080");
        assert_eq!(s.store.key_prefix, "embgate");
        assert!(s.store.is_embedded(), "no Redis needed to start");
        assert_eq!(s.store.path, "embgate-data/cache.redb");
        assert_eq!(s.store.max_bytes, 0, "entries are never evicted by default");
        assert_eq!(s.upstream.base_url, "https://api.openai.com/v1");
        assert_eq!(s.upstream_api_key(), None);
        assert_eq!(s.prices["text-embedding-3-small"], 0.02);
        assert_eq!(s.prices["text-embedding-3-large"], 0.13);
        assert_eq!(s.prices["text-embedding-ada-002"], 0.10);
        assert_eq!(
            s.l1.max_bytes,
            128 << 20,
            "L1 on by default (BENCHMARKS.md)"
        );
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s = Settings::load_from(
            None,
            env(&[
                ("EMBGATE__LISTEN", "127.0.0.1:9999"),
                ("EMBGATE__STORE__URL", "redis://127.0.0.1:6380/3"),
                ("EMBGATE__STORE__KEY_PREFIX", "t1"),
                ("EMBGATE__UPSTREAM__API_KEY", "sk-123"),
                ("EMBGATE__UPSTREAM__TIMEOUT_SECS", "7"),
                ("EMBGATE__PRICES__MY-MODEL", "1.5"),
            ]),
        )
        .expect("loads");
        assert_eq!(s.listen, "127.0.0.1:9999");
        assert_eq!(s.store.url, "redis://127.0.0.1:6380/3");
        assert_eq!(s.store.key_prefix, "t1");
        assert_eq!(s.upstream_api_key(), Some("sk-123"));
        assert_eq!(s.upstream.timeout_secs, 7);
        assert_eq!(s.prices["my-model"], 1.5);
        assert_eq!(s.prices["text-embedding-3-small"], 0.02);
    }

    #[test]
    fn rejects_bad_values() {
        let err = Settings::load_from(None, env(&[("EMBGATE__UPSTREAM__BASE_URL", "nope")]));
        assert!(matches!(err, Err(ConfigError::Invalid { .. })));
        let err = Settings::load_from(None, env(&[("EMBGATE__PRICES__X", "-1")]));
        assert!(matches!(err, Err(ConfigError::Invalid { .. })));
    }

    #[test]
    fn the_embedded_store_is_one_process_s() {
        let err = Settings::load_from(None, env(&[("EMBGATE__COALESCE__DISTRIBUTED", "true")]));
        assert!(
            matches!(
                err,
                Err(ConfigError::Invalid {
                    key: "coalesce.distributed",
                    ..
                })
            ),
            "{err:?}"
        );
        let redis = ("EMBGATE__STORE__URL", "redis://127.0.0.1:6379/0");
        let fleet = Settings::load_from(
            None,
            env(&[redis, ("EMBGATE__COALESCE__DISTRIBUTED", "true")]),
        )
        .expect("a fleet shares a Redis");
        assert!(!fleet.store.is_embedded());
        let err = Settings::load_from(None, env(&[redis, ("EMBGATE__STORE__MAX_BYTES", "1000")]));
        assert!(
            matches!(
                err,
                Err(ConfigError::Invalid {
                    key: "store.max_bytes",
                    ..
                })
            ),
            "{err:?}"
        );
    }
}

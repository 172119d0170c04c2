//! Settings: built-in defaults, then an optional TOML file, then `EMBGATE__*`
//! environment variables (`__` separates levels: `EMBGATE__STORE__URL`).
//! A key that none of these types knows is refused at start, so a typo never
//! silently leaves a default (say, an open door) in force.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::Limits;

/// The defaults, written as the TOML a user would write. Every key a user can
/// set has a value here, so `.env.example` and the README can be checked
/// against one place.
pub const DEFAULTS: &str = r#"
listen = "0.0.0.0:8080"

[server]
header_read_timeout_secs = 30
max_connections = 4096
max_requests_in_flight = 1024
drain_timeout_secs = 30

[store]
url = ""
path = "embgate-data/cache.redb"
max_bytes = 0
cache_bytes = 268435456
cluster_nodes = ""
read_from_replicas = false
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

[cache]
ttl_secs = 0
refresh_ttl_on_hit = false

[admin]
key_sha256 = ""

[auth]
mode = "auto"
verify_ttl_secs = 300

[coalesce]
distributed = false
lease_ms = 10000
poll_ms = 20

[passthrough]
allow = ""

[response]
cache_headers = true

[limits]
max_body_bytes = 67108864
max_inputs = 2048
max_input_bytes = 1048576
max_extra_fields = 16
max_model_bytes = 256

[batch_api]
max_requests_per_batch = 50000
max_file_bytes = 209715200
max_in_flight = 4
poll_min_ms = 5000
poll_max_ms = 300000

[prices]
batch_discount = 0.5
"text-embedding-3-small" = 0.02
"text-embedding-3-large" = 0.13
"text-embedding-ada-002" = 0.10
"#;

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Address the HTTP server binds.
    pub listen: String,
    pub server: ServerSettings,
    pub store: StoreSettings,
    pub upstream: UpstreamSettings,
    pub limits: LimitSettings,
    pub coalesce: CoalesceSettings,
    pub auth: AuthSettings,
    pub ledger: LedgerSettings,
    pub metrics: MetricsSettings,
    pub l1: L1Settings,
    pub cache: CacheSettings,
    pub admin: AdminSettings,
    pub passthrough: PassthroughSettings,
    pub response: ResponseSettings,
    /// More vendors, by name, each serving the models it lists.
    #[serde(default)]
    pub upstreams: HashMap<String, NamedUpstream>,
    /// `embgate warm --batch-api`: how misses go through the vendor's Batch API.
    pub batch_api: BatchApiSettings,
    /// USD per 1M input tokens, by model name; and what the Batch API takes off.
    pub prices: Prices,
    /// USD per 1M input tokens through the Batch API, by model name (default:
    /// `prices.<model>` times `prices.batch_discount`).
    #[serde(default)]
    pub batch_prices: HashMap<String, f64>,
}

/// Synchronous prices by model, and the Batch API's discount on them.
#[derive(Debug, Clone, Deserialize)]
pub struct Prices {
    /// A batch-priced token costs this fraction of a synchronous one.
    pub batch_discount: f64,
    #[serde(flatten)]
    pub models: HashMap<String, f64>,
}

/// Reads as the per-model prices: what every price lookup wants.
impl std::ops::Deref for Prices {
    type Target = HashMap<String, f64>;
    fn deref(&self) -> &HashMap<String, f64> {
        &self.models
    }
}

impl Settings {
    /// USD per 1M tokens of `model` through the Batch API (0 when unpriced).
    pub fn batch_price(&self, model: &str) -> f64 {
        match self.batch_prices.get(model) {
            Some(price) => *price,
            None => self.prices.get(model).copied().unwrap_or(0.0) * self.prices.batch_discount,
        }
    }
}

/// Limits of one Batch API job and how it is followed.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchApiSettings {
    /// Requests (one input each) in one vendor batch.
    pub max_requests_per_batch: usize,
    /// Bytes of one batch input file.
    pub max_file_bytes: u64,
    /// Vendor batches submitted and not yet collected at once.
    pub max_in_flight: usize,
    /// The first wait between two looks at a batch; doubled up to...
    pub poll_min_ms: u64,
    /// ...this.
    pub poll_max_ms: u64,
}

/// How long entries live. An embedding never changes, so by default they
/// never expire; a TTL trades paying again for memory.
#[derive(Debug, Clone, Deserialize)]
pub struct CacheSettings {
    /// Seconds an entry lives once written; 0: forever.
    pub ttl_secs: u64,
    /// Per model, overriding `ttl_secs` (0: forever).
    #[serde(default)]
    pub model_ttl_secs: HashMap<String, u64>,
    /// A hit extends the entry's life again (at most once per tenth of it).
    pub refresh_ttl_on_hit: bool,
}

impl CacheSettings {
    /// How long entries of `model` live once written; `None`: forever.
    pub fn ttl(&self, model: &str) -> Option<Duration> {
        let secs = self
            .model_ttl_secs
            .get(model)
            .copied()
            .unwrap_or(self.ttl_secs);
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// The shortest life any entry gets; `None` when every entry lives forever.
    pub fn shortest_ttl(&self) -> Option<Duration> {
        std::iter::once(self.ttl_secs)
            .chain(self.model_ttl_secs.values().copied())
            .filter(|s| *s > 0)
            .min()
            .map(Duration::from_secs)
    }
}

/// The operators' API (`/admin/*`).
#[derive(Debug, Clone, Deserialize)]
pub struct AdminSettings {
    /// Hex SHA-256 of the admin key (`embgate hash-key KEY`); empty: the
    /// admin API refuses every request.
    pub key_sha256: String,
}

/// Bounds on what clients can hold of the HTTP server.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    /// A connection that has not sent a request's headers this long after
    /// it opened, or after its previous answer, is closed: idle keep-alive
    /// connections included.
    pub header_read_timeout_secs: u64,
    /// Open client connections; more wait to be accepted.
    pub max_connections: usize,
    /// Embeddings and passthrough requests being handled at once; more are
    /// answered 503 at once. Health and metrics routes are not counted.
    pub max_requests_in_flight: usize,
    /// After a shutdown signal, how long open requests and the fetches they
    /// started may take before they are dropped.
    pub drain_timeout_secs: u64,
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
    /// Comma-separated seed node URLs of a Redis Cluster; set, the store is
    /// that cluster instead of `url`.
    pub cluster_nodes: String,
    /// In a cluster, look entries up on replicas (they may lag their master
    /// by the last writes: such an entry is a miss, paid again).
    pub read_from_replicas: bool,
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
    /// `forward` when the gateway holds no vendor key, `gateway` when it
    /// holds one and tenants are configured; never `open`.
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
    /// What this tenant's requests may do with the cache.
    #[serde(default)]
    pub cache: TenantCache,
}

/// A tenant's use of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TenantCache {
    /// Hits are served and misses stored; the tenant's own `Cache-Control`
    /// applies.
    #[default]
    ReadWrite,
    /// Hits are served; nothing is stored (bulk ingestion that should not
    /// fill the cache).
    ReadOnly,
    /// Every input is fetched from the vendor and nothing is stored.
    Off,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// OpenAI and compatible APIs (Mistral, Together, Ollama, TEI...).
    #[default]
    Openai,
    /// Azure OpenAI: deployment paths, `api-version`, `api-key` header.
    Azure,
    /// Cohere's own API (`POST {base_url}/v2/embed`), bearer key.
    Cohere,
    /// Voyage AI's own fields (`POST {base_url}/embeddings`), bearer key.
    Voyage,
    /// The Gemini API (`POST {base_url}/models/{model}:batchEmbedContents`),
    /// `x-goog-api-key`.
    Gemini,
    /// Amazon Bedrock InvokeModel (`POST {base_url}/model/{id}/invoke`),
    /// signed with SigV4 from the AWS environment variables.
    Bedrock,
}

impl Flavour {
    /// Whether the vendor speaks its own embeddings API rather than OpenAI's.
    pub fn is_native(self) -> bool {
        !matches!(self, Flavour::Openai | Flavour::Azure)
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Openai => "openai",
            Flavour::Azure => "azure",
            Flavour::Cohere => "cohere",
            Flavour::Voyage => "voyage",
            Flavour::Gemini => "gemini",
            Flavour::Bedrock => "bedrock",
        }
    }
}

/// Routes other than `/v1/embeddings`, forwarded to the upstream of the
/// model their JSON body names, else to the default one.
#[derive(Debug, Clone, Deserialize)]
pub struct PassthroughSettings {
    /// Comma-separated path prefixes (`/v1/models`, or `models`) that may
    /// pass when the gateway's own vendor key would pay; empty: none.
    /// Callers whose own key is forwarded may use every route.
    pub allow: String,
}

/// What embeddings responses tell the caller beyond the vendor's answer.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseSettings {
    /// Send `x-embgate-cache` and `x-embgate-upstream-tokens`. They tell a
    /// caller whether someone else already embedded a text; off hides that.
    pub cache_headers: bool,
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
    /// Request fields besides OpenAI's five. Vendors define a handful each
    /// (`input_type`, `truncate`, `output_dtype`...); every one is forwarded
    /// and hashed into each input's key, so thousands are refused up front.
    pub max_extra_fields: usize,
    /// Longest model name, in bytes: it travels into keys, entry tags, logs
    /// and labels.
    pub max_model_bytes: usize,
}

impl LimitSettings {
    /// The limits a request body is parsed under.
    pub fn request(&self) -> Limits {
        Limits {
            max_inputs: self.max_inputs,
            max_input_bytes: self.max_input_bytes,
            max_extra_fields: self.max_extra_fields,
            max_model_bytes: self.max_model_bytes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// Keys no setting has, as TOML paths (`store.timout_ms`).
    #[error("configuration: unknown {}:{}", if .0.len() == 1 { "key" } else { "keys" }, unknown_list(.0))]
    Unknown(Vec<String>),
}

/// One line per unknown key, naming it both ways it may have been written.
fn unknown_list(paths: &[String]) -> String {
    paths
        .iter()
        .map(|p| format!("\n  {p} (environment: {})", env_name(p)))
        .collect()
}

/// The `EMBGATE__` variable that sets the TOML path `path`.
pub fn env_name(path: &str) -> String {
    format!("EMBGATE__{}", path.replace('.', "__").to_uppercase())
}

/// Why `auto` does not choose when the gateway holds a vendor key and no
/// tenants are configured: every choice decides who spends that key.
const AUTO_REFUSED: &str = "`auto` does not choose who may spend the vendor key set in \
upstream.api_key (or upstreams.<name>.api_key) when no tenants are configured. \
Set auth.mode (EMBGATE__AUTH__MODE) to one of:
  forward  callers present their own vendor key, checked with the vendor (leave the api_key \
settings empty so that their keys pay);
  gateway  callers present client keys listed as auth.tenants.<name>.key_sha256 \
(EMBGATE__AUTH__TENANTS__<NAME>__KEY_SHA256, from `embgate hash-key KEY`); the gateway's key pays;
  open     no caller authentication: anyone who reaches the port spends the gateway's key \
(only behind access control of your own).";

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
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
        let merged = builder.add_source(environment).build()?;
        let mut unknown = Vec::new();
        let settings: Settings =
            serde_ignored::deserialize(merged, |path| unknown.push(path.to_string()))?;
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ConfigError::Unknown(unknown));
        }
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
        if self.server.header_read_timeout_secs == 0
            || self.server.max_connections == 0
            || self.server.max_requests_in_flight == 0
            || self.server.drain_timeout_secs == 0
        {
            return invalid("server", "limits and timeouts must be positive");
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
        self.validate_cluster()?;
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
            // A caller's key means nothing to AWS: forwarded, any key
            // would spend the gateway's credentials.
            if u.flavour == Flavour::Bedrock && self.auth_mode().ok() == Some(AuthMode::Forward) {
                return Err(ConfigError::Invalid {
                    key: "upstreams",
                    reason: format!(
                        "{name}: a bedrock upstream is paid by the gateway's AWS credentials; \
                         use auth mode gateway or open"
                    ),
                });
            }
            if u.flavour == Flavour::Azure && u.api_version.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "upstreams",
                    reason: format!("{name}: an azure upstream needs api_version"),
                });
            }
        }
        if !self.admin.key_sha256.is_empty() {
            if !is_sha256_hex(&self.admin.key_sha256) {
                return invalid("admin.key_sha256", "must be 64 hex digits");
            }
            if self
                .auth
                .tenants
                .values()
                .any(|t| t.key_sha256.eq_ignore_ascii_case(&self.admin.key_sha256))
            {
                return invalid(
                    "admin.key_sha256",
                    "must not be a tenant's key: client keys never reach the admin API",
                );
            }
        }
        if let Err(reason) = crate::passthrough::Allowlist::parse(&self.passthrough.allow) {
            return invalid("passthrough.allow", &reason);
        }
        // An undecided `auto` is refused when serving (`auth_mode`), not
        // here: `hash-key`, `warm` and the other commands serve no one.
        if self.auth_mode().ok() == Some(AuthMode::Gateway) {
            if self.auth.tenants.is_empty() {
                return invalid("auth.tenants", "gateway mode needs at least one tenant key");
            }
            if self.upstream.api_key.is_empty()
                || self
                    .upstreams
                    .values()
                    .any(|u| u.api_key.is_empty() && u.flavour != Flavour::Bedrock)
            {
                return invalid(
                    "upstream.api_key",
                    "gateway mode needs the gateway's own vendor key on every upstream",
                );
            }
            if let Some((name, _)) = self
                .auth
                .tenants
                .iter()
                .find(|(_, t)| !is_sha256_hex(&t.key_sha256))
            {
                return Err(ConfigError::Invalid {
                    key: "auth.tenants",
                    reason: format!("{name}: key_sha256 must be 64 hex digits"),
                });
            }
        }
        if self.limits.max_inputs == 0
            || self.limits.max_body_bytes == 0
            || self.limits.max_model_bytes == 0
        {
            return invalid("limits", "limits must be positive");
        }
        for (key, prices) in [
            ("prices", &self.prices.models),
            ("batch_prices", &self.batch_prices),
        ] {
            if let Some((model, _)) = prices.iter().find(|(_, p)| !(p.is_finite() && **p >= 0.0)) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("price of {model} must be a non-negative number"),
                });
            }
        }
        let discount = self.prices.batch_discount;
        if !(discount.is_finite() && (0.0..=1.0).contains(&discount)) {
            return invalid("prices.batch_discount", "must be between 0 and 1");
        }
        let b = &self.batch_api;
        if b.max_requests_per_batch == 0
            || b.max_file_bytes == 0
            || b.max_in_flight == 0
            || b.poll_min_ms == 0
            || b.poll_max_ms < b.poll_min_ms
        {
            return invalid(
                "batch_api",
                "limits must be positive, poll_max_ms at least poll_min_ms",
            );
        }
        Ok(())
    }

    /// A cluster's seeds must be Redis URLs, and name the store alone.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let seeds = self.store.cluster_seeds();
        let invalid = |reason: String| ConfigError::Invalid {
            key: "store.cluster_nodes",
            reason,
        };
        if seeds.is_empty() {
            return Ok(());
        }
        if !self.store.url.trim().is_empty() {
            return Err(invalid(
                "set either store.url (one Redis) or store.cluster_nodes (a cluster), not both"
                    .to_owned(),
            ));
        }
        for seed in &seeds {
            let url =
                reqwest::Url::parse(seed).map_err(|_| invalid(format!("{seed:?} is not a URL")))?;
            if !matches!(url.scheme(), "redis" | "rediss") || url.host_str().is_none() {
                return Err(invalid(format!(
                    "{seed:?}: a node URL is redis://host:port (or rediss://)"
                )));
            }
        }
        // A hash tag in the prefix would put every entry in one slot.
        if self.store.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::Invalid {
                key: "store.key_prefix",
                reason: "must not contain `{` or `}` on a cluster".to_owned(),
            });
        }
        Ok(())
    }

    /// The mode in force, with `auto` resolved: `forward` when the gateway
    /// holds no vendor key, `gateway` when it holds one and tenants are
    /// configured, and refused otherwise: `open` is never guessed.
    pub fn auth_mode(&self) -> Result<AuthMode, ConfigError> {
        match self.auth.mode {
            AuthMode::Auto if !self.holds_vendor_key() => Ok(AuthMode::Forward),
            AuthMode::Auto if !self.auth.tenants.is_empty() => Ok(AuthMode::Gateway),
            AuthMode::Auto => Err(ConfigError::Invalid {
                key: "auth.mode",
                reason: AUTO_REFUSED.to_owned(),
            }),
            mode => Ok(mode),
        }
    }

    /// Whether any upstream, the default or a named one, has a key of the
    /// gateway's own.
    fn holds_vendor_key(&self) -> bool {
        !self.upstream.api_key.is_empty() || self.upstreams.values().any(|u| !u.api_key.is_empty())
    }

    /// The vendor key the gateway itself holds, if any.
    pub fn upstream_api_key(&self) -> Option<&str> {
        Some(self.upstream.api_key.as_str()).filter(|k| !k.is_empty())
    }
}

impl ServerSettings {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

impl StoreSettings {
    /// No Redis named: the gateway keeps its cache in its own file.
    /// Neither a Redis nor a cluster is named: the embedded store.
    pub fn is_embedded(&self) -> bool {
        self.url.trim().is_empty() && self.cluster_seeds().is_empty()
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// The seed URLs of `cluster_nodes`; empty without a cluster.
    pub fn cluster_seeds(&self) -> Vec<String> {
        self.cluster_nodes
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
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
        assert_eq!(s.server.header_read_timeout_secs, 30);
        assert_eq!(
            s.l1.max_bytes,
            128 << 20,
            "L1 on by default (BENCHMARKS.md)"
        );
        assert_eq!(s.auth_mode().ok(), Some(AuthMode::Forward));
        assert_eq!(
            s.passthrough.allow, "",
            "nothing passes on the gateway's key"
        );
        assert!(s.response.cache_headers);
        let limits = s.limits.request();
        assert_eq!((limits.max_extra_fields, limits.max_model_bytes), (16, 256));
    }

    fn refused_auto(s: &Settings) -> String {
        match s.auth_mode() {
            Err(
                e @ ConfigError::Invalid {
                    key: "auth.mode", ..
                },
            ) => e.to_string(),
            other => panic!("auto should be refused, got {other:?}"),
        }
    }

    #[test]
    fn auto_never_opens_the_gateways_key() {
        let keyed = Settings::load_from(None, env(&[("EMBGATE__UPSTREAM__API_KEY", "sk-1")]))
            .expect("loads: only serving refuses");
        let message = refused_auto(&keyed);
        for choice in [
            "forward",
            "gateway",
            "open",
            "EMBGATE__AUTH__MODE",
            "auth.tenants.<name>.key_sha256",
        ] {
            assert!(message.contains(choice), "{choice} missing from: {message}");
        }
        // A key on a named upstream is the gateway's money too.
        let named = Settings::load_from(
            None,
            env(&[
                ("EMBGATE__UPSTREAMS__ACME__BASE_URL", "http://acme.test/v1"),
                ("EMBGATE__UPSTREAMS__ACME__MODELS", "acme-*"),
                ("EMBGATE__UPSTREAMS__ACME__API_KEY", "sk-acme"),
            ]),
        )
        .expect("loads");
        refused_auto(&named);
        // With tenants, `auto` is gateway mode.
        let tenants = Settings::load_from(
            None,
            env(&[
                ("EMBGATE__UPSTREAM__API_KEY", "sk-1"),
                ("EMBGATE__AUTH__TENANTS__T__KEY_SHA256", &"a".repeat(64)),
            ]),
        )
        .expect("loads");
        assert_eq!(tenants.auth_mode().ok(), Some(AuthMode::Gateway));
        // Open only when written.
        let open = Settings::load_from(
            None,
            env(&[
                ("EMBGATE__UPSTREAM__API_KEY", "sk-1"),
                ("EMBGATE__AUTH__MODE", "open"),
            ]),
        )
        .expect("loads");
        assert_eq!(open.auth_mode().ok(), Some(AuthMode::Open));
    }

    #[test]
    fn unknown_keys_are_all_reported_with_their_variable_names() {
        let path = std::env::temp_dir().join(format!(
            "embgate-config-test-{}-{}.toml",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:1"
lisen = "typo at the top"

[store]
timout_ms = 5

[auth]
mod = "open"

[auth.tenants.search]
key_sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
isolatd = true

[upstreams.acme]
base_url = "http://acme.test/v1"
models = "acme-*"
modles = "typo"
deployments = { "any-model" = "any-deployment" }

[prices]
"my-own-model" = 0.5
"#,
        )
        .expect("write config");
        let loaded = Settings::load_from(
            Some(&path),
            env(&[
                ("EMBGATE__LIMITS__MAX_INPUT", "3"),
                ("EMBGATE__PRICES__ANOTHER-MODEL", "1"),
                ("EMBGATE__UPSTREAMS__ACME__DEPLOYMENTS__ACME-X", "dep"),
            ]),
        );
        let _ = std::fs::remove_file(&path);
        let Err(ConfigError::Unknown(keys)) = loaded else {
            panic!("unknown keys not refused: {loaded:?}");
        };
        assert_eq!(
            keys,
            [
                "auth.mod",
                "auth.tenants.search.isolatd",
                "limits.max_input",
                "lisen",
                "store.timout_ms",
                "upstreams.acme.modles",
            ]
        );
        let message = ConfigError::Unknown(keys).to_string();
        for name in [
            "store.timout_ms (environment: EMBGATE__STORE__TIMOUT_MS)",
            "limits.max_input (environment: EMBGATE__LIMITS__MAX_INPUT)",
            "upstreams.acme.modles (environment: EMBGATE__UPSTREAMS__ACME__MODLES)",
        ] {
            assert!(message.contains(name), "{name} missing from: {message}");
        }
    }

    #[test]
    fn bedrock_is_paid_by_the_gateway_only() {
        let bedrock = [
            ("EMBGATE__UPSTREAMS__AWS__BASE_URL", "http://bedrock.test"),
            ("EMBGATE__UPSTREAMS__AWS__FLAVOUR", "bedrock"),
            ("EMBGATE__UPSTREAMS__AWS__MODELS", "amazon.titan-embed-*"),
        ];
        let with = |mode: &'static str| {
            let mut pairs = bedrock.to_vec();
            pairs.push(("EMBGATE__AUTH__MODE", mode));
            Settings::load_from(None, env(&pairs))
        };
        assert!(matches!(
            with("forward"),
            Err(ConfigError::Invalid {
                key: "upstreams",
                ..
            })
        ));
        let s = with("open").expect("open mode takes a bedrock upstream");
        assert_eq!(s.upstreams["aws"].flavour, Flavour::Bedrock);
    }

    #[test]
    fn user_chosen_names_are_not_unknown_keys() {
        let s = Settings::load_from(
            None,
            env(&[
                ("EMBGATE__PRICES__MY-MODEL", "1.5"),
                ("EMBGATE__UPSTREAMS__AZ__BASE_URL", "http://az.test"),
                ("EMBGATE__UPSTREAMS__AZ__FLAVOUR", "azure"),
                ("EMBGATE__UPSTREAMS__AZ__API_VERSION", "2024-06-01"),
                ("EMBGATE__UPSTREAMS__AZ__MODELS", "az-*"),
                ("EMBGATE__UPSTREAMS__AZ__DEPLOYMENTS__AZ-SMALL", "dep"),
                ("EMBGATE__AUTH__TENANTS__ADS__KEY_SHA256", &"b".repeat(64)),
                ("EMBGATE__AUTH__TENANTS__ADS__ISOLATED", "true"),
                ("EMBGATE__PASSTHROUGH__ALLOW", "/v1/models"),
                ("EMBGATE__RESPONSE__CACHE_HEADERS", "false"),
            ]),
        )
        .expect("loads");
        assert_eq!(s.upstreams["az"].deployments["az-small"], "dep");
        assert!(s.auth.tenants["ads"].isolated);
        assert!(!s.response.cache_headers);
        let err = Settings::load_from(None, env(&[("EMBGATE__PASSTHROUGH__ALLOW", "/v1/../x")]));
        assert!(matches!(
            err,
            Err(ConfigError::Invalid {
                key: "passthrough.allow",
                ..
            })
        ));
    }

    #[test]
    fn batch_prices_default_to_the_discount() {
        let s = Settings::load_from(
            None,
            env(&[
                ("EMBGATE__PRICES__BATCH_DISCOUNT", "0.4"),
                ("EMBGATE__BATCH_PRICES__TEXT-EMBEDDING-3-LARGE", "0.05"),
                ("EMBGATE__BATCH_API__MAX_IN_FLIGHT", "2"),
            ]),
        )
        .expect("loads");
        assert!(!s.prices.contains_key("batch_discount"), "not a model");
        assert!((s.batch_price("text-embedding-3-small") - 0.008).abs() < 1e-12);
        assert_eq!(s.batch_price("text-embedding-3-large"), 0.05);
        assert_eq!(s.batch_price("unpriced"), 0.0);
        assert_eq!(s.batch_api.max_in_flight, 2);
        assert_eq!(
            Settings::load_from(None, None)
                .expect("defaults")
                .prices
                .batch_discount,
            0.5
        );
        for (key, value) in [
            ("EMBGATE__PRICES__BATCH_DISCOUNT", "1.5"),
            ("EMBGATE__BATCH_PRICES__X", "-1"),
            ("EMBGATE__BATCH_API__MAX_REQUESTS_PER_BATCH", "0"),
            ("EMBGATE__BATCH_API__POLL_MAX_MS", "1"),
        ] {
            let loaded = Settings::load_from(None, env(&[(key, value)]));
            assert!(
                matches!(loaded, Err(ConfigError::Invalid { .. })),
                "{key}={value}"
            );
        }
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
    fn cluster_nodes_are_checked() {
        let s = Settings::load_from(
            None,
            env(&[(
                "EMBGATE__STORE__CLUSTER_NODES",
                "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
            )]),
        )
        .expect("loads");
        assert_eq!(
            s.store.cluster_seeds(),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert!(!s.store.read_from_replicas);
        for bad in [
            vec![("EMBGATE__STORE__CLUSTER_NODES", "127.0.0.1:7000")],
            vec![("EMBGATE__STORE__CLUSTER_NODES", "http://h:1")],
            vec![
                ("EMBGATE__STORE__CLUSTER_NODES", "redis://h:1"),
                ("EMBGATE__STORE__URL", "redis://other:6379/0"),
            ],
            vec![
                ("EMBGATE__STORE__CLUSTER_NODES", "redis://h:1"),
                ("EMBGATE__STORE__KEY_PREFIX", "p{x}"),
            ],
        ] {
            let err = Settings::load_from(None, env(&bad));
            assert!(matches!(err, Err(ConfigError::Invalid { .. })), "{bad:?}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        let err = Settings::load_from(None, env(&[("EMBGATE__UPSTREAM__BASE_URL", "nope")]));
        assert!(matches!(err, Err(ConfigError::Invalid { .. })));
        let err = Settings::load_from(None, env(&[("EMBGATE__PRICES__X", "-1")]));
        assert!(matches!(err, Err(ConfigError::Invalid { .. })));
        for key in [
            "EMBGATE__SERVER__HEADER_READ_TIMEOUT_SECS",
            "EMBGATE__SERVER__MAX_CONNECTIONS",
            "EMBGATE__SERVER__MAX_REQUESTS_IN_FLIGHT",
            "EMBGATE__SERVER__DRAIN_TIMEOUT_SECS",
        ] {
            let err = Settings::load_from(None, env(&[(key, "0")]));
            assert!(matches!(err, Err(ConfigError::Invalid { .. })), "{key}");
        }
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

//! A deterministic, in-process fake of OpenAI's HTTP API.
//!
//! It stands in for the paid vendor in embgate's integration tests,
//! benchmarks and SDK-driven CI scripts: embeddings are a pure function of
//! (model, dimensions, input) so tests can predict every vector, and faults
//! can be queued to exercise the gateway's error handling. The Files and
//! Batch APIs are there too (OpenAI's and Azure OpenAI's paths), with
//! batches whose pace and end tests decide.

mod batches;
mod embeddings;
mod error;
mod faults;
mod native;
mod passthrough;
mod server;
mod vectors;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::JoinHandle;

pub use batches::{BatchFate, BatchLine, MAX_BATCH_REQUESTS, MAX_FILE_BYTES};
pub use faults::Fault;
pub use native::{native_embedding, native_tokens, quantize};
pub use vectors::{default_dimensions, embedding, tokens};

/// Server configuration.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `None`: any non-empty bearer key is accepted; `Some`: only these.
    pub valid_keys: Option<Vec<String>>,
    /// Delay added to every embeddings response.
    pub latency: Duration,
}

/// One embeddings input, as sent on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum InputItem {
    Text(String),
    Tokens(Vec<u32>),
}

impl InputItem {
    fn is_empty(&self) -> bool {
        match self {
            InputItem::Text(s) => s.is_empty(),
            InputItem::Tokens(t) => t.is_empty(),
        }
    }
}

/// A `POST /v1/embeddings` as received, parsed leniently so that rejected
/// requests are recorded too.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub model: Option<String>,
    /// Empty when `input` was not a well-formed input list.
    pub inputs: Vec<InputItem>,
    pub dimensions: Option<u32>,
    pub encoding_format: Option<String>,
    /// The raw `Authorization` header.
    pub authorization: Option<String>,
    /// Status sent; 0 when the connection was closed without a response.
    pub status: u16,
}

type EmbeddedKey = (String, Option<u32>, InputItem);

#[derive(Default)]
struct Records {
    /// Every request line, any route, as received.
    seen: Vec<String>,
    requests: Vec<RecordedRequest>,
    key_checks: Vec<RecordedRequest>,
    embedded: HashMap<EmbeddedKey, u64>,
    total: u64,
}

/// State shared by the handle and the request handlers.
pub(crate) struct Shared {
    valid_keys: Option<Vec<String>>,
    latency: Mutex<Duration>,
    faults: Mutex<VecDeque<Fault>>,
    records: Mutex<Records>,
    requests_served: AtomicU64,
    batches: Mutex<batches::Batches>,
}

/// Locks ignoring poisoning: the guarded data stays consistent because no
/// critical section can panic halfway through an update.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn new(opts: Options) -> Self {
        Shared {
            valid_keys: opts.valid_keys,
            latency: Mutex::new(opts.latency),
            faults: Mutex::new(VecDeque::new()),
            records: Mutex::new(Records::default()),
            requests_served: AtomicU64::new(0),
            batches: Mutex::new(batches::Batches::default()),
        }
    }

    pub(crate) fn valid_keys(&self) -> Option<&[String]> {
        self.valid_keys.as_deref()
    }

    pub(crate) fn latency(&self) -> Duration {
        *lock(&self.latency)
    }

    /// A vendor-style `req_<32 hex>` id, unique within this server.
    pub(crate) fn next_request_id(&self) -> axum::http::HeaderValue {
        let n = self.requests_served.fetch_add(1, Ordering::Relaxed);
        let hash = blake3::hash(&n.to_le_bytes()).to_hex();
        let id = format!("req_{}", &hash.as_str()[..32]);
        axum::http::HeaderValue::from_str(&id)
            .unwrap_or_else(|_| axum::http::HeaderValue::from_static("req_0"))
    }

    pub(crate) fn pop_fault(&self) -> Option<Fault> {
        lock(&self.faults).pop_front()
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        lock(&self.records).requests.push(request);
    }

    pub(crate) fn record_key_check(&self, request: RecordedRequest) {
        lock(&self.records).key_checks.push(request);
    }

    pub(crate) fn record_seen(&self, line: String) {
        lock(&self.records).seen.push(line);
    }

    /// Counts inputs that were delivered in a correct successful response.
    pub(crate) fn count_embedded(
        &self,
        model: &str,
        dimensions: Option<u32>,
        inputs: &[InputItem],
    ) {
        let mut records = lock(&self.records);
        for input in inputs {
            *records
                .embedded
                .entry((model.to_owned(), dimensions, input.clone()))
                .or_default() += 1;
        }
        records.total += inputs.len() as u64;
    }
}

/// A running fake vendor; the server stops when this is dropped.
pub struct FakeVendor {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FakeVendor {
    /// Starts on 127.0.0.1 with an ephemeral port and default options.
    pub async fn start() -> FakeVendor {
        Self::start_with(Options::default()).await
    }

    /// Starts on 127.0.0.1 with an ephemeral port.
    pub async fn start_with(opts: Options) -> FakeVendor {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        match Self::bind(addr, opts).await {
            Ok(vendor) => vendor,
            Err(e) => panic!("fake-vendor: cannot bind {addr}: {e}"),
        }
    }

    /// Starts on a given address (the binary's `--listen`).
    pub async fn bind(addr: SocketAddr, opts: Options) -> std::io::Result<FakeVendor> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts));
        let task = tokio::spawn(server::serve(listener, server::router(shared.clone())));
        Ok(FakeVendor { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, the value for an SDK's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Where Cohere's API is served (`{this}/v2/embed`).
    pub fn cohere_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where Voyage's API is served (`{this}/embeddings`).
    pub fn voyage_url(&self) -> String {
        format!("http://{}/voyage/v1", self.addr)
    }

    /// Where Bedrock's runtime API is served (`{this}/model/{id}/invoke`).
    pub fn bedrock_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the Gemini API is served (`{this}/models/{model}:...`).
    pub fn gemini_url(&self) -> String {
        format!("http://{}/v1beta", self.addr)
    }

    /// Queues a fault; each embeddings request that carries inputs pops one
    /// (FIFO) before normal handling, authentication included. Key checks
    /// (see [`FakeVendor::key_checks`]) leave the queue alone.
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.shared.faults).push_back(fault);
    }

    /// Sets the delay added to every embeddings response.
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.shared.latency) = d;
    }

    /// Every `POST /v1/embeddings` received, faulted and rejected ones
    /// included, in arrival order, except key checks.
    pub fn embedding_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.records).requests.clone()
    }

    /// `POST /v1/embeddings` requests whose `input` is empty (`""` or `[]`),
    /// in arrival order. The vendor refuses them (400) once the key is
    /// authenticated and bills nothing, which makes them the gateway's way
    /// to check a caller's key; kept apart so that counts of embedding work
    /// and queued faults are not disturbed by them.
    pub fn key_checks(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.records).key_checks.clone()
    }

    /// Every request received, any route, as `METHOD /path?query` exactly
    /// as it arrived: what reached the vendor at all.
    pub fn requests_seen(&self) -> Vec<String> {
        lock(&self.shared.records).seen.clone()
    }

    /// How many times this exact input was embedded in successful, unfaulted
    /// responses. `dimensions` is matched as sent: `None` and
    /// `Some(native)` are counted separately.
    pub fn times_embedded(&self, model: &str, dimensions: Option<u32>, input: &InputItem) -> u64 {
        let key = (model.to_owned(), dimensions, input.clone());
        lock(&self.shared.records)
            .embedded
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Number of inputs embedded across all successful, unfaulted responses.
    pub fn total_inputs_embedded(&self) -> u64 {
        lock(&self.shared.records).total
    }

    /// The next batch created ends this way (FIFO; batches without a queued
    /// fate complete).
    pub fn push_batch_fate(&self, fate: BatchFate) {
        lock(&self.shared.batches).push_fate(fate);
    }

    /// The next `POST /v1/batches` is answered with `status` (an
    /// OpenAI-shaped error) and creates nothing (FIFO).
    pub fn push_batch_create_error(&self, status: u16) {
        lock(&self.shared.batches).push_create_error(status);
    }

    /// Every batch line carrying `input` fails (500, in the error file).
    pub fn fail_batch_input(&self, input: InputItem) {
        lock(&self.shared.batches).fail_input(input);
    }

    /// While held, batches stay where they are however often they are
    /// polled; released, each poll moves a batch one step on.
    pub fn hold_batches(&self, held: bool) {
        lock(&self.shared.batches).hold(held);
    }

    /// Moves every batch that has not ended to its end at once.
    pub fn finish_batches(&self) {
        batches::finish_all(&self.shared);
    }

    /// Batch ids, in creation order.
    pub fn batch_ids(&self) -> Vec<String> {
        lock(&self.shared.batches).ids()
    }

    /// A batch's status (`validating`, `in_progress`, ... `cancelled`).
    pub fn batch_status(&self, id: &str) -> Option<&'static str> {
        lock(&self.shared.batches).status(id)
    }

    /// The lines of every batch that has ended with its lines read, in
    /// the order they were answered.
    pub fn batch_lines(&self) -> Vec<BatchLine> {
        lock(&self.shared.batches).lines()
    }

    /// Forgets recorded requests and embedding counts (not queued faults).
    pub fn reset_records(&self) {
        *lock(&self.shared.records) = Records::default();
    }
}

impl Drop for FakeVendor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

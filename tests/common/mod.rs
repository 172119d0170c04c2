//! Shared harness: a gateway served on a free loopback port, against a real
//! store (Redis with its own key prefix per test, or an embedded store in a
//! temporary directory) and the fake vendor; and the real binary.
#![allow(dead_code)]

pub mod cluster;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use embgate::cache::key::{KeyHash, KeyLayout, KeyScope};
use embgate::cache::store::{self, Cursor, Store};
use embgate::config::Settings;
use embgate::metrics::Metrics;
use embgate::protocol::Input;
use fake_vendor::{FakeVendor, InputItem, Options};
use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::sync::oneshot;

pub const KEY: &str = "sk-test-0001";
pub const SMALL: &str = "text-embedding-3-small";

/// A fake vendor that accepts only `keys`.
pub async fn vendor_accepting(keys: &[&str]) -> FakeVendor {
    FakeVendor::start_with(Options {
        valid_keys: Some(keys.iter().map(|k| k.to_string()).collect()),
        ..Options::default()
    })
    .await
}

/// POST /v1/embeddings with `key` as the bearer token, or with none.
pub async fn post_with_key(gw: &TestGateway, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = gw.http.post(format!("{}/v1/embeddings", gw.url)).json(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.expect("answer")
}

pub fn redis_url() -> String {
    std::env::var("EMBGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "embgate-test-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// The stores the suite runs against: tests that hold for any store take
/// a `Backend` (`#[case]`s of rstest), the rest use Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Redis,
    Embedded,
}

/// Where a test keeps its cache: a key prefix of its own on the shared
/// Redis, or a file in a fresh temporary directory. Removed on drop.
pub struct TestStore {
    pub backend: Backend,
    pub prefix: String,
    dir: Option<tempfile::TempDir>,
}

impl TestStore {
    pub fn new(backend: Backend) -> TestStore {
        let dir = match backend {
            Backend::Redis => None,
            Backend::Embedded => Some(
                tempfile::Builder::new()
                    .prefix("embgate-test-")
                    .tempdir()
                    .expect("temp dir"),
            ),
        };
        TestStore {
            backend,
            prefix: unique_prefix(),
            dir,
        }
    }

    /// The embedded store's file.
    pub fn path(&self) -> Option<std::path::PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("cache.redb"))
    }

    /// The `EMBGATE__STORE__*` settings naming this store.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("EMBGATE__STORE__KEY_PREFIX", self.prefix.clone())];
        match self.path() {
            None => env.push(("EMBGATE__STORE__URL", redis_url())),
            Some(path) => {
                env.push(("EMBGATE__STORE__URL", String::new()));
                env.push(("EMBGATE__STORE__PATH", path.display().to_string()));
            }
        }
        env
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if self.backend == Backend::Redis {
            delete_prefix(&self.prefix);
        }
    }
}

/// Opens the store `settings` name; waits while another gateway of this
/// test still holds an embedded one (its connections close after it shut
/// down, and the last of them closes the store).
pub async fn open_store(settings: &Settings) -> Arc<dyn Store> {
    for _ in 0..200 {
        match store::open(&settings.store) {
            Err(store::StoreError::InUse { .. }) => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            opened => return opened.expect("store"),
        }
    }
    panic!("the store is still held by another gateway");
}

pub struct TestGateway {
    pub url: String,
    pub vendor: FakeVendor,
    pub prefix: String,
    pub settings: Settings,
    /// The gateway's own store, for looking at what it holds.
    pub store: Arc<dyn Store>,
    pub cache: Arc<embgate::cache::Cache>,
    pub http: reqwest::Client,
    serving: Serving,
    /// Last: removed once the gateway is gone.
    pub home: Arc<TestStore>,
}

/// The gateway's serving task: stopped on drop.
struct Serving {
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl Serving {
    /// Starts graceful shutdown; returns when serving has finished.
    async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.served.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.served.take() {
            task.abort();
        }
    }
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(FakeVendor::start().await, &[]).await
    }

    /// Starts a gateway on Redis in front of `vendor`; `env` overrides
    /// settings as `EMBGATE__*` variables would.
    pub async fn start_with(vendor: FakeVendor, env: &[(&str, &str)]) -> TestGateway {
        Self::start_on(Backend::Redis, vendor, env).await
    }

    /// A gateway on a fresh store of `backend`, in front of a new vendor.
    pub async fn on(backend: Backend) -> TestGateway {
        Self::start_on(backend, FakeVendor::start().await, &[]).await
    }

    /// Starts a gateway on a fresh store of `backend`.
    pub async fn start_on(
        backend: Backend,
        vendor: FakeVendor,
        env: &[(&str, &str)],
    ) -> TestGateway {
        Self::start_in(Arc::new(TestStore::new(backend)), vendor, env).await
    }

    /// Starts a gateway on `home`, in front of `vendor`.
    pub async fn start_in(
        home: Arc<TestStore>,
        vendor: FakeVendor,
        env: &[(&str, &str)],
    ) -> TestGateway {
        let mut vars: HashMap<String, String> = HashMap::from([
            ("EMBGATE__LISTEN".into(), "127.0.0.1:0".into()),
            // Generous: the shared test machine may be busy.
            ("EMBGATE__STORE__TIMEOUT_MS".into(), "2000".into()),
            ("EMBGATE__STORE__MAX_WAIT_MS".into(), "2000".into()),
            ("EMBGATE__STORE__WRITE_TIMEOUT_MS".into(), "5000".into()),
            ("EMBGATE__UPSTREAM__BASE_URL".into(), vendor.base_url()),
            // Tests exercise the store; the L1 test turns it on.
            ("EMBGATE__L1__MAX_BYTES".into(), "0".into()),
        ]);
        for (k, v) in home.env() {
            vars.insert(k.into(), v);
        }
        for (k, v) in env {
            vars.insert((*k).into(), (*v).into());
        }
        let settings = Settings::load_from(None, Some(vars)).expect("test settings");
        let prefix = settings.store.key_prefix.clone();
        let store = open_store(&settings).await;
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let engine =
            embgate::Engine::with_store(&settings, Arc::clone(&store), metrics).expect("engine");
        let cache = Arc::clone(&engine.cache);
        let gateway = embgate::Gateway::on(&settings, engine).expect("gateway");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            gateway
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await;
        });
        TestGateway {
            url,
            vendor,
            prefix,
            settings,
            store,
            cache,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
            serving: Serving {
                shutdown: Some(tx),
                served: Some(served),
            },
            home,
        }
    }

    /// Waits until the entries of the answers so far are stored (they are
    /// written after the answer has gone out): the next lookup finds them.
    pub async fn settled(&self) {
        self.cache.settled().await;
    }

    pub fn backend(&self) -> Backend {
        self.home.backend
    }

    /// Starts graceful shutdown; returns when serving has finished.
    pub async fn shutdown(&mut self) {
        self.serving.stop().await;
    }

    /// Shuts down and starts a new gateway on the same store and vendor,
    /// as a restarted process would (`env` as in [`TestGateway::start_in`]).
    pub async fn restart(self, env: &[(&str, &str)]) -> TestGateway {
        let (vendor, home) = self.stop().await;
        Self::start_in(home, vendor, env).await
    }

    /// Shuts down and closes the store (the embedded one can then be
    /// opened by another process); the data stays in `home`.
    pub async fn stop(self) -> (FakeVendor, Arc<TestStore>) {
        let TestGateway {
            vendor,
            mut serving,
            store,
            cache,
            home,
            ..
        } = self;
        serving.stop().await;
        // The embedded store closes with its last handle.
        drop((store, cache));
        (vendor, home)
    }

    /// POST /v1/embeddings with the test key.
    pub async fn post(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/embeddings", self.url))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    /// GET `path` (no key).
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("gateway answers")
    }

    /// POST and expect 200; returns (cache header, body).
    pub async fn embed(&self, body: &Value) -> (String, Value) {
        let response = self.post(body).await;
        let status = response.status();
        let cache = header(&response, "x-embgate-cache");
        let json: Value = response.json().await.expect("json body");
        assert_eq!(status, 200, "unexpected answer: {json}");
        (cache, json)
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one sample, e.g. `embgate_cache_saved_tokens_total{model="m"}`;
    /// 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    /// The key the gateway uses for `input` at the fake vendor.
    pub fn key(&self, model: &str, dimensions: Option<u32>, input: &Input) -> KeyHash {
        key_hash(&self.vendor.base_url(), model, dimensions, input)
    }

    /// The name the entry of `key` has in Redis.
    pub fn redis_key(&self, key: &KeyHash) -> String {
        KeyLayout::new(&self.prefix).entry(key)
    }

    /// The keys of every entry the store holds, once the writes in flight
    /// are done (entries are stored after the answer goes out).
    pub async fn entries(&self) -> Vec<KeyHash> {
        self.cache.settled().await;
        let mut keys = Vec::new();
        let mut cursor = Cursor::start();
        loop {
            let (next, heads) = self.store.scan_heads(&cursor, 1000, 0).await.expect("scan");
            keys.extend(heads.into_iter().map(|h| h.hash));
            if next.is_start() {
                keys.sort();
                return keys;
            }
            cursor = next;
        }
    }

    /// The stored bytes of one entry.
    pub async fn raw(&self, key: &KeyHash) -> Option<Bytes> {
        self.cache.settled().await;
        let (_, values) = self
            .store
            .get_many(std::slice::from_ref(key), Duration::from_secs(5))
            .next()
            .await
            .expect("one chunk");
        values.expect("store answers").pop().flatten()
    }

    /// Stores `bytes` as the entry of `key`, bypassing the gateway.
    pub async fn put_raw(&self, key: KeyHash, bytes: impl Into<Bytes>) {
        self.store
            .put_many(vec![(key, bytes.into())], None)
            .await
            .expect("stored");
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(redis_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    /// Every Redis key under this gateway's prefix (entries, ledger, leases, meta).
    pub async fn all_keys(&self) -> Vec<String> {
        let pattern = format!("{}:*", self.prefix);
        let mut conn = self.redis().await;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            keys.extend(batch);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }
}

/// Removes a test's keys (never FLUSHALL: other tests share the server).
pub fn delete_prefix(prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut conn) = client.get_connection() else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
    }
}

pub fn key_hash(namespace: &str, model: &str, dimensions: Option<u32>, input: &Input) -> KeyHash {
    KeyScope {
        namespace: namespace.trim_end_matches('/'),
        model,
        dimensions,
        extra: &[],
    }
    .hasher()
    .key(input)
}

pub fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or(0.0)
}

/// The vendor's vector for a text input.
pub fn vendor_vector(model: &str, dimensions: Option<u32>, input: &InputItem) -> Vec<f32> {
    fake_vendor::embedding(model, dimensions, input).expect("known model")
}

pub fn text(s: &str) -> InputItem {
    InputItem::Text(s.to_owned())
}

/// Reads one response item as f32s, whichever encoding it came in.
pub fn vector_of(item: &Value) -> Vec<f32> {
    match &item["embedding"] {
        Value::String(b64) => {
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64");
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        Value::Array(values) => values
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect(),
        other => panic!("not an embedding: {other}"),
    }
}

pub fn vectors(body: &Value) -> Vec<Vec<f32>> {
    let data = body["data"].as_array().expect("data array");
    data.iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i, "items in order");
            vector_of(item)
        })
        .collect()
}

/// A redis-server of the test's own, on a free loopback port, so it can be
/// killed and restarted without touching the shared one.
pub struct OwnRedis {
    pub port: u16,
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        Self::start_with(&[])
    }

    /// With more `redis-server` arguments (e.g. `--maxmemory 2mb`).
    pub fn start_with(args: &[&str]) -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut redis = OwnRedis {
            port,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        redis.restart();
        redis
    }

    /// Sends a signal to the server (`STOP` freezes it, `CONT` resumes it).
    pub fn signal(&self, signal: &str) {
        let Some(child) = &self.child else { return };
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A connection for inspecting this server.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connects")
    }

    /// Starts (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        for _ in 0..100 {
            if redis::Client::open(self.url())
                .and_then(|c| c.get_connection())
                .is_ok()
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// `embgate` (the real binary) with `args`, without any `EMBGATE*`
/// variable of the test's own environment: only what the test sets.
pub fn embgate(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_embgate"));
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EMBGATE") {
            command.env_remove(name);
        }
    }
    command
}

/// The real binary, serving on a free port.
pub struct Binary {
    pub child: tokio::process::Child,
    pub base: String,
    pub http: reqwest::Client,
}

impl Binary {
    /// `embgate serve` with `env`, in `dir` (the working directory) if
    /// given; returns once it answers /healthz.
    pub async fn serve(
        env: &[(&str, String)],
        dir: Option<&std::path::Path>,
        stderr: std::process::Stdio,
    ) -> Binary {
        let port = free_port();
        let mut command = embgate(&["serve"]);
        command
            .env("EMBGATE__LISTEN", format!("127.0.0.1:{port}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(stderr)
            .kill_on_drop(true);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child = command.spawn().expect("starts");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..200 {
            if http
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return Binary { child, base, http };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the binary exited at start: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the binary did not come up");
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("pid")
    }

    /// POST /v1/embeddings with the test key.
    pub async fn post(&self, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(format!("{}/v1/embeddings", self.base))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .await
    }

    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        metric_value(&text, sample)
    }

    /// SIGTERM, then the exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("stops after SIGTERM")
            .expect("status")
    }

    /// SIGKILL: the process gets no chance to finish anything.
    pub async fn kill9(mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("reaped");
    }
}

/// A scratch directory for input files, and a store; both removed on drop.
pub struct Scratch {
    pub dir: std::path::PathBuf,
    pub home: Arc<TestStore>,
}

impl Scratch {
    pub fn new(backend: Backend) -> Scratch {
        let home = Arc::new(TestStore::new(backend));
        let dir = std::env::temp_dir().join(&home.prefix);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch { dir, home }
    }

    pub fn write(&self, name: &str, lines: &[String]) -> std::path::PathBuf {
        let path = self.dir.join(name);
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&path, text).expect("write input file");
        path
    }

    /// Settings for a run on this scratch's store; `store` overrides it.
    pub fn settings(&self, vendor: &FakeVendor, store: &[(&str, String)]) -> Settings {
        let env: HashMap<String, String> = [
            ("EMBGATE__STORE__TIMEOUT_MS", "2000".to_owned()),
            ("EMBGATE__UPSTREAM__BASE_URL", vendor.base_url()),
            ("EMBGATE__AUTH__MODE", "open".to_owned()),
            ("EMBGATE__UPSTREAM__API_KEY", "sk-test".to_owned()),
        ]
        .into_iter()
        .chain(self.home.env())
        .chain(store.iter().cloned())
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Settings::load_from(None, Some(env)).expect("test settings")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! The gateway on a real Redis Cluster the tests start themselves (three
//! masters, three replicas): the core contract, the torture test, a master
//! killed and a slot range resharded in the middle of a load, a fleet of
//! gateway processes coalescing through it, and the operations.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::cluster::LocalCluster;
use common::*;
use embgate::migrate;
use embgate::migrations::LATEST;
use embgate::migrations::m0001_entry_format_2::encode_v1;
use embgate::protocol::Input;
use fake_vendor::{FakeVendor, InputItem};
use serde_json::{Value, json};

async fn on_cluster(
    cluster: &LocalCluster,
    vendor: FakeVendor,
    env: &[(&str, &str)],
) -> TestGateway {
    let seeds = cluster.seeds();
    let mut all = vec![
        // The harness names the single Redis; a cluster gateway names none.
        ("EMBGATE__STORE__URL", ""),
        ("EMBGATE__STORE__CLUSTER_NODES", seeds.as_str()),
    ];
    all.extend_from_slice(env);
    TestGateway::start_with(vendor, &all).await
}

const ROUND_TRIPS: &str = "embgate_store_round_trips_total{op=\"get\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_contract_holds_on_a_cluster() {
    let cluster = LocalCluster::start();
    let gw = on_cluster(&cluster, FakeVendor::start().await, &[]).await;

    // Exact vectors, miss then hit.
    let body = json!({"model": SMALL, "input": ["alpha", "beta", "gamma"]});
    let (cache, first) = gw.embed(&body).await;
    assert_eq!(cache, "miss");
    for (v, t) in vectors(&first).iter().zip(["alpha", "beta", "gamma"]) {
        assert_eq!(*v, vendor_vector(SMALL, None, &text(t)));
    }
    let (cache, second) = gw.embed(&body).await;
    assert_eq!(cache, "hit");
    assert_eq!(second, first);

    // A partial batch: only the misses go upstream, in the caller's order.
    let dims = 8;
    let all: Vec<String> = (0..2048).map(|i| format!("document number {i}")).collect();
    gw.embed(&json!({"model": SMALL, "input": &all[..2000], "dimensions": dims}))
        .await;
    gw.vendor.reset_records();
    let mut order: Vec<&String> = all.iter().collect();
    order.reverse();
    let (cache, body) = gw
        .embed(&json!({"model": SMALL, "input": order, "dimensions": dims, "encoding_format": "base64"}))
        .await;
    assert_eq!(cache, "partial");
    let calls = gw.vendor.embedding_requests();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].inputs.len(), 48, "only the misses go upstream");
    for (v, t) in vectors(&body).iter().zip(&order) {
        assert_eq!(*v, vendor_vector(SMALL, Some(dims), &text(t)));
    }

    // One round trip per node touched, not per key: 64 keys on 3 masters.
    let before = gw.metric(ROUND_TRIPS).await;
    let (cache, _) = gw
        .embed(&json!({"model": SMALL, "input": &all[..64], "dimensions": dims}))
        .await;
    assert_eq!(cache, "hit");
    let trips = gw.metric(ROUND_TRIPS).await - before;
    assert!(
        (1.0..=3.0).contains(&trips),
        "{trips} round trips for 64 keys"
    );
    let before = gw.metric(ROUND_TRIPS).await;
    gw.embed(&json!({"model": SMALL, "input": &all, "dimensions": dims}))
        .await;
    let trips = gw.metric(ROUND_TRIPS).await - before;
    assert!(
        (1.0..=3.0).contains(&trips),
        "{trips} round trips for 2048 keys"
    );

    // Token arrays, apart from text; float and base64 carry the same bits.
    let tokens = vec![15339u32, 1917];
    let (_, one) = gw.embed(&json!({"model": SMALL, "input": tokens})).await;
    assert_eq!(
        vectors(&one)[0],
        vendor_vector(SMALL, None, &InputItem::Tokens(tokens.clone()))
    );
    let (cache, b64) = gw
        .embed(&json!({"model": SMALL, "input": [tokens], "encoding_format": "base64"}))
        .await;
    assert_eq!(cache, "hit");
    assert_eq!(vectors(&b64), vectors(&one));

    // Entries never expire, and are spread over every master.
    let key = gw.key(SMALL, None, &Input::Text("alpha".into()));
    let name = gw.redis_key(&key);
    let ttl = cluster.cli(0, &["-c", "TTL", &name]);
    assert_eq!(ttl.trim(), "-1", "no expiry");
    let entries = gw.entries().await;
    assert_eq!(entries.len(), 3 + 2048 + 1);
    let masters: HashSet<String> = cluster
        .addresses()
        .iter()
        .enumerate()
        .filter(|(i, _)| cluster.cli(*i, &["ROLE"]).starts_with("master"))
        .map(|(_, a)| a.clone())
        .collect();
    assert_eq!(masters.len(), 3);
    for (i, _) in cluster.addresses().iter().enumerate() {
        if cluster.cli(i, &["ROLE"]).starts_with("master") {
            let held = cluster.cli(i, &["--scan", "--pattern", &format!("{}:v1:*", gw.prefix)]);
            assert!(
                held.lines().count() > 500,
                "entries spread over the masters"
            );
        }
    }

    // Ready, with every node named.
    let ready = gw.get("/readyz").await;
    let status = ready.status();
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["store"], "redis-cluster");
    assert_eq!(
        ready["nodes"].as_object().map(|n| n.len()),
        Some(6),
        "{ready}"
    );

    // With store.read_from_replicas, lookups are answered by the replicas.
    let replicas_gets = || -> u64 {
        (0..6)
            .filter(|i| cluster.cli(*i, &["ROLE"]).starts_with("slave"))
            .map(|i| {
                let stats = cluster.cli(i, &["INFO", "commandstats"]);
                stats
                    .lines()
                    .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
                    .and_then(|v| v.split(',').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    let before = replicas_gets();
    let reader = on_cluster(
        &cluster,
        FakeVendor::start().await,
        &[
            ("EMBGATE__STORE__READ_FROM_REPLICAS", "true"),
            ("EMBGATE__STORE__KEY_PREFIX", &gw.prefix),
            ("EMBGATE__UPSTREAM__BASE_URL", &gw.vendor.base_url()),
        ],
    )
    .await;
    let (cache, body) = reader
        .embed(&json!({"model": SMALL, "input": &all[..64], "dimensions": dims}))
        .await;
    assert_eq!(cache, "hit");
    assert_eq!(
        vectors(&body)[3],
        vendor_vector(SMALL, Some(dims), &text(&all[3]))
    );
    assert!(
        replicas_gets() >= before + 64,
        "the replicas answered the lookups"
    );
}

/// The torture test of `resilience.rs`, on the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_random_overlapping_batches_on_a_cluster() {
    let cluster = LocalCluster::start();
    let vendor = FakeVendor::start().await;
    vendor.set_latency(Duration::from_millis(5));
    let gw = Arc::new(on_cluster(&cluster, vendor, &[]).await);
    let variants: [(&str, Option<u32>); 4] = [
        (SMALL, Some(16)),
        (SMALL, Some(32)),
        ("text-embedding-3-large", Some(16)),
        ("text-embedding-ada-002", None),
    ];
    let pool: Arc<Vec<InputItem>> = Arc::new(
        (0..120)
            .map(|i| {
                if i % 4 == 0 {
                    InputItem::Tokens(vec![1000 + i, 42, i * 3 + 1])
                } else {
                    InputItem::Text(format!("torture item {i}: {}", "x".repeat(i as usize % 7)))
                }
            })
            .collect(),
    );
    let requests = 3000usize;
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..300)
        .map(|_| {
            let (gw, pool, next) = (Arc::clone(&gw), Arc::clone(&pool), Arc::clone(&next));
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    let (model, dims) = variants[rand::random_range(0..variants.len())];
                    let tokens = rand::random_bool(0.5);
                    let picks: Vec<&InputItem> = (0..rand::random_range(1..12))
                        .map(|_| &pool[rand::random_range(0..pool.len())])
                        .filter(|i| matches!(i, InputItem::Tokens(_)) == tokens)
                        .collect();
                    if picks.is_empty() {
                        continue;
                    }
                    let input: Vec<Value> = picks
                        .iter()
                        .map(|i| match i {
                            InputItem::Text(t) => json!(t),
                            InputItem::Tokens(t) => json!(t),
                        })
                        .collect();
                    let mut body = json!({"model": model, "input": input});
                    if let Some(d) = dims {
                        body["dimensions"] = json!(d);
                    }
                    if rand::random_bool(0.5) {
                        body["encoding_format"] = json!("base64");
                    }
                    let (_, answer) = gw.embed(&body).await;
                    for (v, item) in vectors(&answer).iter().zip(&picks) {
                        assert_eq!(*v, vendor_vector(model, dims, item), "{model} {item:?}");
                    }
                    seen.extend(picks.into_iter().map(|i| (model, dims, i.clone())));
                }
                seen
            })
        })
        .collect();
    let mut distinct = HashSet::new();
    for w in workers {
        distinct.extend(w.await.expect("worker"));
    }
    assert!(distinct.len() > 100);
    for (model, dims, item) in &distinct {
        assert_eq!(
            gw.vendor.times_embedded(model, *dims, item),
            1,
            "{model} {item:?}"
        );
    }
    assert_eq!(gw.vendor.total_inputs_embedded(), distinct.len() as u64);
}

/// Workers posting overlapping batches of a pool of 60 inputs until told
/// to stop; each checks every status and vector. Returns how many
/// requests each answered.
fn load(gw: &Arc<TestGateway>, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u32>> {
    (0..8u64)
        .map(|w| {
            let (gw, stop) = (Arc::clone(gw), Arc::clone(stop));
            tokio::spawn(async move {
                let (mut done, mut n) = (0u32, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let inputs: Vec<String> = (0..6)
                        .map(|k| format!("load item {}", (n * 7 + k * 13 + w) % 60))
                        .collect();
                    let response = gw
                        .post(&json!({"model": SMALL, "input": inputs, "dimensions": 8}))
                        .await;
                    assert_eq!(response.status(), 200, "no request fails");
                    let body: Value = response.json().await.expect("json");
                    for (v, t) in vectors(&body).iter().zip(&inputs) {
                        assert_eq!(*v, vendor_vector(SMALL, Some(8), &text(t)), "right vector");
                    }
                    done += 1;
                }
                done
            })
        })
        .collect()
}

async fn finish(workers: Vec<tokio::task::JoinHandle<u32>>, stop: &AtomicBool) -> u32 {
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        total += w.await.expect("a worker failed");
    }
    total
}

/// Whether a new input, asked twice, is a hit the second time (retried a
/// while: the store may still be settling).
async fn caching_works(gw: &TestGateway, tag: &str) -> bool {
    for i in 0..100 {
        let body = json!({"model": SMALL, "input": format!("{tag} {i}"), "dimensions": 8});
        gw.embed(&body).await;
        gw.cache.settled().await;
        if gw.embed(&body).await.0 == "hit" {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_load_fails_no_request_and_caching_resumes() {
    let mut cluster = LocalCluster::start();
    let gw = Arc::new(
        on_cluster(
            &cluster,
            FakeVendor::start().await,
            &[
                ("EMBGATE__STORE__TIMEOUT_MS", "200"),
                ("EMBGATE__STORE__MAX_WAIT_MS", "500"),
            ],
        )
        .await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&gw, &stop);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let victim = cluster.master();
    let address = cluster.addresses()[victim].clone();
    cluster.kill(victim);
    // While it is down, /readyz names it and the gateway still serves.
    let mut named = false;
    for _ in 0..50 {
        let ready = gw.get("/readyz").await;
        let status = ready.status();
        let body: Value = ready.json().await.expect("json");
        if status == 503 && body["failing_nodes"].to_string().contains(&address) {
            named = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(named, "/readyz names the killed node {address}");
    tokio::task::block_in_place(|| cluster.wait_for_failover(victim));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let answered = finish(workers, &stop).await;
    assert!(answered > 0);

    assert!(
        caching_works(&gw, "after the failover").await,
        "caching resumed"
    );
    // Every input of the load is served right, from the promoted replica or fetched again.
    let inputs: Vec<String> = (0..60).map(|i| format!("load item {i}")).collect();
    let (_, body) = gw
        .embed(&json!({"model": SMALL, "input": inputs, "dimensions": 8}))
        .await;
    for (v, t) in vectors(&body).iter().zip(&inputs) {
        assert_eq!(*v, vendor_vector(SMALL, Some(8), &text(t)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_mid_load_costs_no_error_and_no_wrong_vector() {
    let cluster = LocalCluster::start();
    let gw = Arc::new(on_cluster(&cluster, FakeVendor::start().await, &[]).await);
    // Enough entries that the moved slots hold some.
    let many: Vec<String> = (0..1500).map(|i| format!("resharded entry {i}")).collect();
    gw.embed(&json!({"model": SMALL, "input": many, "dimensions": 8}))
        .await;
    gw.cache.settled().await;

    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&gw, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = cluster.master();
    let to = (0..6)
        .find(|i| *i != from && cluster.cli(*i, &["ROLE"]).starts_with("master"))
        .expect("another master");
    tokio::task::block_in_place(|| cluster.reshard(from, to, 2000));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(finish(workers, &stop).await > 0);

    // The moved entries are still hits, from their new master.
    gw.vendor.reset_records();
    let (cache, body) = gw
        .embed(&json!({"model": SMALL, "input": many, "dimensions": 8}))
        .await;
    assert_eq!(cache, "hit");
    for (v, t) in vectors(&body).iter().zip(&many) {
        assert_eq!(*v, vendor_vector(SMALL, Some(8), &text(t)));
    }
    // With the slot map read again, a lookup is one round trip per node.
    let before = gw.metric(ROUND_TRIPS).await;
    gw.embed(&json!({"model": SMALL, "input": &many[..64], "dimensions": 8}))
        .await;
    let trips = gw.metric(ROUND_TRIPS).await - before;
    assert!(
        (1.0..=3.0).contains(&trips),
        "{trips} round trips after the reshard"
    );
}

/// The real binary, on the cluster.
struct Process {
    child: tokio::process::Child,
    base: String,
}

impl Process {
    async fn serve(seeds: &str, prefix: &str, vendor_url: &str) -> Process {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_embgate"))
            .arg("serve")
            .env("EMBGATE__LISTEN", format!("127.0.0.1:{port}"))
            .env("EMBGATE__STORE__CLUSTER_NODES", seeds)
            .env("EMBGATE__STORE__KEY_PREFIX", prefix)
            .env("EMBGATE__STORE__TIMEOUT_MS", "2000")
            .env("EMBGATE__STORE__MAX_WAIT_MS", "2000")
            .env("EMBGATE__COALESCE__DISTRIBUTED", "true")
            .env("EMBGATE__UPSTREAM__BASE_URL", vendor_url)
            .env("EMBGATE__L1__MAX_BYTES", "0")
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        for _ in 0..200 {
            if http
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return Process { child, base };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the binary did not come up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateway_processes_pay_each_input_once_fleet_wide() {
    let cluster = LocalCluster::start();
    let vendor = FakeVendor::start().await;
    vendor.set_latency(Duration::from_millis(200));
    let prefix = unique_prefix();
    let seeds = cluster.seeds();
    let fleet = [
        Process::serve(&seeds, &prefix, &vendor.base_url()).await,
        Process::serve(&seeds, &prefix, &vendor.base_url()).await,
        Process::serve(&seeds, &prefix, &vendor.base_url()).await,
    ];
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let pool: Vec<String> = (0..30).map(|i| format!("fleet input {i}")).collect();
    let asked = (0..60).map(|r| {
        let base = fleet[r % 3].base.clone();
        let inputs: Vec<String> = (0..8)
            .map(|k| pool[(r * 5 + k * 3) % pool.len()].clone())
            .collect();
        let http = http.clone();
        async move {
            let response = http
                .post(format!("{base}/v1/embeddings"))
                .bearer_auth(KEY)
                .json(&json!({"model": SMALL, "input": inputs, "dimensions": 8}))
                .send()
                .await
                .expect("answer");
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.expect("json");
            for (v, t) in vectors(&body).iter().zip(&inputs) {
                assert_eq!(*v, vendor_vector(SMALL, Some(8), &text(t)));
            }
            inputs
        }
    });
    let mut distinct = HashSet::new();
    for inputs in futures_util::future::join_all(asked).await {
        distinct.extend(inputs);
    }
    for t in &distinct {
        assert_eq!(
            vendor.times_embedded(SMALL, Some(8), &text(t)),
            1,
            "{t} paid once"
        );
    }
    assert_eq!(vendor.total_inputs_embedded(), distinct.len() as u64);
    for mut p in fleet {
        let _ = p.child.kill().await;
    }
    assert!(
        cluster.keys(&format!("{prefix}:lease:*")).is_empty(),
        "leases released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_stats_and_moving_from_one_redis_work_on_a_cluster() {
    let cluster = LocalCluster::start();
    let gw = on_cluster(&cluster, FakeVendor::start().await, &[]).await;
    let store = gw.store.as_ref();

    // Entries of the first layout, migrated in resumable steps.
    let texts: Vec<String> = (0..300).map(|i| format!("legacy entry {i}")).collect();
    for t in &texts {
        let hash = gw.key(SMALL, Some(8), &Input::Text(t.clone()));
        let vector = vendor_vector(SMALL, Some(8), &text(t));
        let tokens = fake_vendor::tokens(SMALL, &text(t)).expect("tokens");
        gw.put_raw(hash, encode_v1(&hash, &vector, tokens)).await;
    }
    // The gateway stamped the empty keyspace at start: these entries came
    // after, as if written by an older embgate.
    store
        .meta_delete(migrate::VERSION_FIELD)
        .await
        .expect("meta");
    // Two steps cannot cover three masters.
    let partial = migrate::run_pending(store, 10, Some(2))
        .await
        .expect("partial");
    assert!(!partial.complete);
    let rest = migrate::run_pending(store, 40, None).await.expect("rest");
    assert!(rest.complete);
    assert_eq!(rest.to_version, LATEST);
    assert_eq!(
        partial.rewritten + rest.rewritten,
        300,
        "each entry once, on every master"
    );
    let (cache, body) = gw
        .embed(&json!({"model": SMALL, "input": &texts[..100], "dimensions": 8}))
        .await;
    assert_eq!(cache, "hit");
    assert_eq!(
        vectors(&body)[7],
        vendor_vector(SMALL, Some(8), &text(&texts[7]))
    );

    let stats = embgate::stats::collect(store, [SMALL])
        .await
        .expect("stats");
    assert_eq!(stats.total.entries, 300);
    assert_eq!(stats.by_model.values().map(|b| b.entries).sum::<u64>(), 300);

    // A walk in small steps sees every entry once, across the masters.
    let mut seen = HashSet::new();
    let mut cursor = embgate::cache::store::Cursor::start();
    loop {
        let (next, heads) = store.scan_heads(&cursor, 7, 0).await.expect("scan");
        for h in heads {
            assert!(seen.insert(h.hash), "seen twice");
        }
        if next.is_start() {
            break;
        }
        cursor = next;
    }
    assert_eq!(seen.len(), 300);

    // The README's move from one Redis: entries written by a gateway on a
    // single server, imported with `redis-cli --cluster import`, are hits.
    let single = OwnRedis::start();
    let old = TestGateway::start_with(
        FakeVendor::start().await,
        &[("EMBGATE__STORE__URL", &single.url())],
    )
    .await;
    let moved: Vec<String> = (0..200).map(|i| format!("moved entry {i}")).collect();
    old.embed(&json!({"model": SMALL, "input": moved, "dimensions": 8}))
        .await;
    old.cache.settled().await;
    let status = std::process::Command::new("redis-cli")
        .args([
            "--cluster",
            "import",
            &cluster.addresses()[cluster.master()],
        ])
        .args(["--cluster-from", &format!("127.0.0.1:{}", single.port)])
        .args(["--cluster-copy", "--cluster-replace"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("redis-cli runs");
    assert!(status.success(), "redis-cli --cluster import");
    let paid = old.vendor.total_inputs_embedded();
    let vendor_url = old.vendor.base_url();
    let new = on_cluster(
        &cluster,
        FakeVendor::start().await,
        &[
            ("EMBGATE__STORE__KEY_PREFIX", &old.prefix),
            // Keys name the vendor: the same one as before the move.
            ("EMBGATE__UPSTREAM__BASE_URL", &vendor_url),
        ],
    )
    .await;
    let (cache, body) = new
        .embed(&json!({"model": SMALL, "input": moved, "dimensions": 8}))
        .await;
    assert_eq!(cache, "hit", "every entry came along");
    for (v, t) in vectors(&body).iter().zip(&moved) {
        assert_eq!(*v, vendor_vector(SMALL, Some(8), &text(t)));
    }
    assert_eq!(
        old.vendor.total_inputs_embedded(),
        paid,
        "nothing paid again"
    );
}

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;

use super::*;

fn options(max_bytes: u64) -> Options {
    Options {
        max_bytes,
        cache_bytes: 16 << 20,
        write_timeout: Duration::from_secs(10),
    }
}

fn open(dir: &tempfile::TempDir, prefix: &str, max_bytes: u64) -> EmbeddedStore {
    EmbeddedStore::open(
        &dir.path().join("store").join("cache.redb"),
        KeyLayout::new(prefix),
        options(max_bytes),
    )
    .expect("opens")
}

fn key(i: u32) -> KeyHash {
    KeyHash(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn value(i: u32, len: usize) -> Bytes {
    Bytes::from(vec![i as u8; len])
}

async fn get(store: &EmbeddedStore, keys: &[KeyHash]) -> Vec<Option<Bytes>> {
    let chunks: Vec<Chunk> = store
        .get_many(keys, Duration::from_secs(10))
        .collect()
        .await;
    let mut next = 0;
    let mut values = Vec::new();
    for (range, chunk) in chunks {
        assert_eq!(range.start, next, "chunks in order, without gaps");
        next = range.end;
        values.extend(chunk.expect("read"));
    }
    assert_eq!(next, keys.len());
    values
}

async fn all_keys(store: &EmbeddedStore, step: usize) -> Vec<KeyHash> {
    let mut cursor = Cursor::start();
    let mut keys = Vec::new();
    loop {
        let (next, heads) = store.scan_heads(&cursor, step, 4).await.expect("scan");
        keys.extend(heads.into_iter().map(|h| h.hash));
        if next.is_start() {
            return keys;
        }
        cursor = next;
    }
}

#[tokio::test]
async fn entries_sizes_and_scans() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir, "t", 0);
    let n = 300;
    let items: Vec<(KeyHash, Bytes)> = (0..n).map(|i| (key(i), value(i, 100))).collect();
    store.put_many(items.clone(), None).await.expect("put");
    // Small and large lookups, absent keys as None.
    let mut wanted: Vec<KeyHash> = (0..n).map(key).collect();
    wanted.push(key(10_000));
    let values = get(&store, &wanted).await;
    for (i, v) in values.iter().take(n as usize).enumerate() {
        assert_eq!(v.as_ref(), Some(&value(i as u32, 100)));
    }
    assert_eq!(values[n as usize], None);
    assert_eq!(
        get(&store, &[key(1), key(10_000)]).await,
        vec![Some(value(1, 100)), None]
    );
    assert_eq!(
        store
            .exist_many(&[key(2), key(10_001)])
            .await
            .expect("exist"),
        [true, false]
    );

    // Replacing a value counts its new size only.
    store
        .put_many(vec![(key(0), value(0, 50))], None)
        .await
        .expect("put");
    let size = store.size().await.expect("size");
    assert_eq!(size.entries, u64::from(n));
    assert_eq!(size.bytes, u64::from(n) * (32 + 100) - 50);

    // A walk in steps sees every entry once.
    let mut keys = all_keys(&store, 7).await;
    keys.sort();
    let mut expected: Vec<KeyHash> = (0..n).map(key).collect();
    expected.sort();
    assert_eq!(keys, expected);
    let (_, heads) = store
        .scan_heads(&Cursor::start(), 1, 4)
        .await
        .expect("scan");
    assert_eq!(heads[0].head.len(), 4);
    assert!(heads[0].len == 100 || heads[0].len == 50);
    assert!(
        store
            .scan_entries(&Cursor("nonsense".into()), 5)
            .await
            .is_err(),
        "a foreign cursor is refused"
    );
}

#[tokio::test]
async fn meta_ledger_and_compare_and_set() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir, "t", 0);
    assert_eq!(store.meta_get("f").await.expect("get"), None);
    assert!(store.meta_set_new("f", "1").await.expect("set new"));
    assert!(!store.meta_set_new("f", "2").await.expect("set new"));
    assert_eq!(
        store.meta_get("f").await.expect("get").as_deref(),
        Some("1")
    );
    store.meta_set("f", "3").await.expect("set");
    assert_eq!(
        store.meta_get("f").await.expect("get").as_deref(),
        Some("3")
    );
    store.meta_delete("f").await.expect("delete");
    assert_eq!(store.meta_get("f").await.expect("get"), None);

    let add = |tokens, usd| {
        vec![
            ("tokens".to_owned(), Increment::Int(tokens)),
            ("usd".to_owned(), Increment::Float(usd)),
        ]
    };
    store.ledger_add(add(5, 0.25)).await.expect("add");
    store.ledger_add(add(7, 0.5)).await.expect("add");
    let ledger = store.ledger_read().await.expect("read");
    assert_eq!(
        ledger,
        vec![
            ("tokens".into(), "12".into()),
            ("usd".into(), "0.75".into())
        ]
    );

    store
        .put_many(vec![(key(1), value(1, 8)), (key(2), value(2, 8))], None)
        .await
        .expect("put");
    let replaced = store
        .compare_and_set(vec![
            (key(1), value(1, 8), value(9, 16)),
            (key(2), value(7, 8), value(9, 16)),
            (key(3), value(3, 8), value(9, 16)),
        ])
        .await
        .expect("cas");
    assert_eq!(replaced, 1, "only the value still as read");
    assert_eq!(
        get(&store, &[key(1), key(2), key(3)]).await,
        vec![Some(value(9, 16)), Some(value(2, 8)), None]
    );
    assert_eq!(
        store.size().await.expect("size").bytes,
        (32 + 16) + (32 + 8)
    );
}

#[tokio::test]
async fn prefixes_keep_keyspaces_apart_in_one_file_and_data_outlives_the_process() {
    let dir = tempfile::tempdir().expect("dir");
    {
        let store = open(&dir, "one", 0);
        store
            .put_many(vec![(key(1), value(1, 8))], None)
            .await
            .expect("put");
        store.meta_set("v", "1").await.expect("meta");
    }
    let other = open(&dir, "two", 0);
    assert_eq!(get(&other, &[key(1)]).await, vec![None]);
    assert_eq!(other.meta_get("v").await.expect("meta"), None);
    drop(other);
    let again = open(&dir, "one", 0);
    assert_eq!(get(&again, &[key(1)]).await, vec![Some(value(1, 8))]);
    assert_eq!(again.size().await.expect("size").entries, 1);
}

#[tokio::test]
async fn a_second_opener_is_refused_with_the_holder_named() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir, "t", 0);
    let path = dir.path().join("store").join("cache.redb");
    let Err(StoreError::InUse {
        path: named,
        holder,
    }) = EmbeddedStore::open(&path, KeyLayout::new("t"), options(0))
    else {
        panic!("a second open must be refused");
    };
    assert_eq!(named, path);
    assert!(holder.contains(&std::process::id().to_string()), "{holder}");
    let message = StoreError::InUse {
        path: named,
        holder,
    }
    .to_string();
    assert!(message.contains("cache.redb"), "{message}");
    drop(store);
    open(&dir, "t", 0);
}

/// Fills a store bounded to three entries of 100 bytes with `first`, then
/// uses `used`, closes it, and adds one more entry: what is left.
async fn survivors_after_using(used: &[u32]) -> (Vec<bool>, u64) {
    let dir = tempfile::tempdir().expect("dir");
    let bound = 3 * (32 + 100);
    let store = open(&dir, "t", bound);
    for i in 0..3 {
        store
            .put_many(vec![(key(i), value(i, 100))], None)
            .await
            .expect("put");
        // Distinct ticks (milliseconds) for distinct writes.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for i in used {
        assert!(get(&store, &[key(*i)]).await[0].is_some());
    }
    // Closing writes the marks gathered since the last write of them.
    drop(store);
    tokio::time::sleep(Duration::from_millis(3)).await;
    let store = open(&dir, "t", bound);
    store
        .put_many(vec![(key(3), value(3, 100))], None)
        .await
        .expect("put");
    let left = store
        .exist_many(&[key(0), key(1), key(2), key(3)])
        .await
        .expect("exist");
    let size = store.size().await.expect("size");
    assert!(size.bytes <= bound, "{size:?}");
    assert_eq!(size.entries, 3);
    (left, size.evicted.unwrap_or(0))
}

#[tokio::test]
async fn past_the_bound_the_least_recently_used_entry_goes() {
    let (left, evicted) = survivors_after_using(&[]).await;
    assert_eq!(left, [false, true, true, true], "the oldest write goes");
    assert_eq!(evicted, 1);
    let (left, _) = survivors_after_using(&[0]).await;
    assert_eq!(left, [true, false, true, true], "a use keeps it");
}

#[tokio::test]
async fn uses_answered_elsewhere_count_too_and_a_lowered_bound_applies_at_open() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir, "t", 10_000);
    assert!(store.tracks_use());
    for i in 0..4 {
        store
            .put_many(vec![(key(i), value(i, 100))], None)
            .await
            .expect("put");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Entry 0, used through the L1 only, is the most recent now.
    store.note_use(&[key(0)]);
    drop(store);
    let store = open(&dir, "t", 2 * (32 + 100));
    assert_eq!(
        store
            .exist_many(&[key(0), key(1), key(2), key(3)])
            .await
            .expect("exist"),
        [true, false, false, true]
    );
    assert_eq!(store.size().await.expect("size").evicted, Some(2));
    assert!(!open_unbounded_tracks_use().await);
}

async fn open_unbounded_tracks_use() -> bool {
    let dir = tempfile::tempdir().expect("dir");
    open(&dir, "t", 0).tracks_use()
}

#[tokio::test]
async fn leases_and_probes() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir, "t", 0);
    store.ping().await.expect("ping");
    store.probe_write().await.expect("probe");
    assert!(store.meta_get(PROBE_FIELD).await.expect("meta").is_some());
    let ttl = Duration::from_secs(10);
    assert_eq!(
        store.try_leases(&[key(1)], "a", ttl).await.expect("lease"),
        [true]
    );
    assert_eq!(
        store.try_leases(&[key(1)], "b", ttl).await.expect("lease"),
        [false]
    );
    assert_eq!(store.leases_held(&[key(1)]).await.expect("held"), [true]);
    store.release_leases(&[key(1)], "a").await.expect("release");
    assert_eq!(store.leases_held(&[key(1)]).await.expect("held"), [false]);
}

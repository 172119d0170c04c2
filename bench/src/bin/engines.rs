//! The embedded store's engine, measured on this workload: redb (what
//! embgate ships) next to fjall (an LSM tree), each in a fresh directory.
//!
//!   target/release/engines [--entries N] [--dir DIR] [--out FILE]
//!
//! The workload is the gateway's: 32-byte content hashes as keys, entries of
//! one 1536-dimension vector (the 40-byte header and 6 KiB of f32 that
//! embgate stores), written in durable groups of 64 (one 64-input miss
//! request, synced before it is acknowledged, as the gateway's writer does),
//! then read back at random one key at a time (1-input hits) and 2048 keys
//! at a time (the largest batch). Both engines get the same cache budget,
//! the gateway's default `store.cache_bytes`. Prints a Markdown section that
//! `bench/run.sh` puts into BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use fjall::{KeyspaceCreateOptions, PersistMode};
use redb::{ReadableDatabase as _, TableDefinition};

/// The gateway's default `store.cache_bytes`.
const CACHE_BYTES: usize = 256 << 20;
const DIMENSIONS: u32 = 1536;
const GROUP: usize = 64;
const LARGE_READ: usize = 2048;
const ENTRIES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("entries");

#[derive(Parser)]
struct Args {
    /// Entries written (each about 6 KiB).
    #[arg(long, default_value_t = 20_000)]
    entries: usize,
    /// Where the two stores are created (removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the Markdown section here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// 1-key lookups timed.
    #[arg(long, default_value_t = 20_000)]
    point_reads: usize,
    /// 2048-key lookups timed.
    #[arg(long, default_value_t = 20)]
    large_reads: usize,
}

/// What one engine did.
struct Measured {
    engine: &'static str,
    written_per_second: f64,
    disk_bytes: u64,
    point_micros: f64,
    large_millis: f64,
}

/// The two operations measured, so both engines run the same code.
trait Engine {
    fn write_group(&self, group: &[([u8; 32], Vec<u8>)]) -> Result<(), String>;
    /// The total length of the values found (so nothing is optimised away).
    fn read(&self, keys: &[[u8; 32]]) -> Result<usize, String>;
}

struct Redb(redb::Database);

impl Engine for Redb {
    fn write_group(&self, group: &[([u8; 32], Vec<u8>)]) -> Result<(), String> {
        let txn = self.0.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(|e| e.to_string())?;
            for (key, value) in group {
                table
                    .insert(key, value.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        // Durability::Immediate is redb's default: synced on commit.
        txn.commit().map_err(|e| e.to_string())
    }

    fn read(&self, keys: &[[u8; 32]]) -> Result<usize, String> {
        let txn = self.0.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(ENTRIES).map_err(|e| e.to_string())?;
        let mut total = 0;
        for key in keys {
            if let Some(v) = table.get(key).map_err(|e| e.to_string())? {
                total += v.value().len();
            }
        }
        Ok(total)
    }
}

struct Fjall {
    db: fjall::Database,
    entries: fjall::Keyspace,
}

impl Engine for Fjall {
    fn write_group(&self, group: &[([u8; 32], Vec<u8>)]) -> Result<(), String> {
        let mut batch = self.db.batch();
        for (key, value) in group {
            batch.insert(&self.entries, key.as_slice(), value.as_slice());
        }
        batch.commit().map_err(|e| e.to_string())?;
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| e.to_string())
    }

    fn read(&self, keys: &[[u8; 32]]) -> Result<usize, String> {
        let mut total = 0;
        for key in keys {
            if let Some(v) = self.entries.get(key).map_err(|e| e.to_string())? {
                total += v.len();
            }
        }
        Ok(total)
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(markdown) => {
            let written = match &args.out {
                Some(path) => std::fs::write(path, &markdown).map_err(|e| e.to_string()),
                None => {
                    print!("{markdown}");
                    Ok(())
                }
            };
            match written {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("engines: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("engines: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<String, String> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("embgate-engines-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let keys: Vec<[u8; 32]> = (0..args.entries as u64)
        .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect();
    let result = (|| {
        let redb_path = dir.join("cache.redb");
        let redb = Redb(
            redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create(&redb_path)
                .map_err(|e| format!("redb: {e}"))?,
        );
        let redb = measure("redb", &redb, &keys, args, &redb_path)?;
        let fjall_path = dir.join("fjall");
        let db = fjall::Database::builder(&fjall_path)
            .cache_size(CACHE_BYTES as u64)
            .open()
            .map_err(|e| format!("fjall: {e}"))?;
        let entries = db
            .keyspace("entries", KeyspaceCreateOptions::default)
            .map_err(|e| format!("fjall: {e}"))?;
        let fjall = measure("fjall", &Fjall { db, entries }, &keys, args, &fjall_path)?;
        Ok(render(args, &[redb, fjall]))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(
    engine: &'static str,
    store: &dyn Engine,
    keys: &[[u8; 32]],
    args: &Args,
    path: &Path,
) -> Result<Measured, String> {
    eprintln!("engines: {engine}: writing {} entries", keys.len());
    let started = Instant::now();
    for (n, chunk) in keys.chunks(GROUP).enumerate() {
        let group: Vec<([u8; 32], Vec<u8>)> = chunk
            .iter()
            .enumerate()
            .map(|(i, key)| (*key, entry(n * GROUP + i)))
            .collect();
        store.write_group(&group)?;
    }
    let written_per_second = keys.len() as f64 / started.elapsed().as_secs_f64();

    // The same pseudo-random order for both engines.
    let mut at = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next_key = || {
        at ^= at << 13;
        at ^= at >> 7;
        at ^= at << 17;
        keys[(at % keys.len() as u64) as usize]
    };
    eprintln!("engines: {engine}: reading");
    let mut found = 0;
    let started = Instant::now();
    for _ in 0..args.point_reads {
        found += store.read(&[next_key()])?;
    }
    let point = started.elapsed();
    let mut large = Vec::with_capacity(args.large_reads);
    for _ in 0..args.large_reads {
        let batch: Vec<[u8; 32]> = (0..LARGE_READ).map(|_| next_key()).collect();
        let started = Instant::now();
        found += store.read(&batch)?;
        large.push(started.elapsed());
    }
    let expected = (args.point_reads + args.large_reads * LARGE_READ) * entry(0).len();
    if found != expected {
        return Err(format!(
            "{engine}: read {found} bytes back, expected {expected}"
        ));
    }
    large.sort();
    Ok(Measured {
        engine,
        written_per_second,
        disk_bytes: disk_usage(path),
        point_micros: point.as_secs_f64() * 1e6 / args.point_reads.max(1) as f64,
        large_millis: large
            .get(large.len() / 2)
            .copied()
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
            * 1e3,
    })
}

/// An entry as embgate stores it: a header and the vector's f32 bytes.
fn entry(i: usize) -> Vec<u8> {
    let vector = fake_vendor::embedding(
        "text-embedding-3-small",
        Some(DIMENSIONS),
        &fake_vendor::InputItem::Text(format!("input {i}")),
    )
    .unwrap_or_default();
    let mut bytes = vec![0u8; embgate::cache::entry::HEADER_LEN];
    for x in vector {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes
}

fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| disk_usage(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn render(args: &Args, rows: &[Measured]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from("## Embedded engine: redb vs fjall\n\n");
    let _ = writeln!(
        md,
        "`target/release/engines` (bench/src/bin/engines.rs), in this run: {} entries of one \
         {DIMENSIONS}-dimension vector as embgate stores them, written in durable groups of \
         {GROUP} (synced before the next, as the gateway's writer commits), then {} random \
         1-key reads and {} random {LARGE_READ}-key reads (p50); both engines with a \
         {} MiB cache. The store ships redb unless another engine is clearly better here.\n",
        args.entries,
        args.point_reads,
        args.large_reads,
        CACHE_BYTES >> 20,
    );
    md.push_str(
        "| Engine | Entries written / s | On disk MiB | 1-key read µs | 2048-key read ms |\n\
         |---|--:|--:|--:|--:|\n",
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.1} | {:.2} | {:.2} |",
            r.engine,
            r.written_per_second,
            r.disk_bytes as f64 / (1 << 20) as f64,
            r.point_micros,
            r.large_millis,
        );
    }
    if let [redb, fjall] = rows {
        let _ = writeln!(
            md,
            "\nfjall / redb: writes {:.2}x as fast, reads {:.2}x (1 key) and {:.2}x (2048 keys) \
             the time, {:.2}x the disk. Reads are what a cache serves over and over; each \
             entry is written once.",
            fjall.written_per_second / redb.written_per_second,
            fjall.point_micros / redb.point_micros,
            fjall.large_millis / redb.large_millis,
            fjall.disk_bytes as f64 / redb.disk_bytes.max(1) as f64,
        );
    }
    md.push('\n');
    md
}

//! Runs the keyspace migrations in `migrations/` and guards `serve` against
//! a keyspace it does not understand.
//!
//! The applied version lives in the hash `<prefix>:meta` (field
//! `keyspace_version`). A migration walks its keys with SCAN in batches;
//! after each batch the SCAN cursor is saved in the same hash, so an
//! interrupted run resumes where it stopped. Values are replaced with a
//! compare-and-set, so a value changed meanwhile is never overwritten.

use redis::aio::ConnectionManager;

use crate::migrations::{self, LATEST, Migration, Transform};
use crate::store::{Store, scan_page};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(
        "the keyspace under '{prefix}' is at version {found}, newer than this embgate \
         understands ({LATEST}); upgrade embgate"
    )]
    Newer { prefix: String, found: u32 },
    #[error(
        "the keyspace under '{prefix}' is at version {found}; this embgate needs version \
         {LATEST}: run `embgate migrate` first"
    )]
    Older { prefix: String, found: u32 },
}

/// What a migration run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub from_version: u32,
    pub to_version: u32,
    pub scanned: u64,
    pub rewritten: u64,
    pub unreadable: u64,
    /// False when stopped early by `max_batches` (run again to resume).
    pub complete: bool,
}

pub fn meta_key(prefix: &str) -> String {
    format!("{prefix}:meta")
}

const VERSION_FIELD: &str = "keyspace_version";

fn cursor_field(version: u32) -> String {
    format!("migration_{version:04}_cursor")
}

/// The keyspace version: recorded, or 0 for a keyspace written before
/// versioning, or `None` for an empty keyspace.
async fn current_version(
    conn: &mut ConnectionManager,
    prefix: &str,
) -> Result<Option<u32>, MigrateError> {
    let recorded: Option<u32> = redis::cmd("HGET")
        .arg(meta_key(prefix))
        .arg(VERSION_FIELD)
        .query_async(conn)
        .await?;
    if recorded.is_some() {
        return Ok(recorded);
    }
    Ok(has_entries(conn, prefix).await?.then_some(0))
}

async fn has_entries(conn: &mut ConnectionManager, prefix: &str) -> Result<bool, MigrateError> {
    let pattern = format!("{prefix}:v1:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys) = scan_page(conn, cursor, &pattern, 1000).await?;
        if !keys.is_empty() {
            return Ok(true);
        }
        if next == 0 {
            return Ok(false);
        }
        cursor = next;
    }
}

async fn set_version(
    conn: &mut ConnectionManager,
    prefix: &str,
    version: u32,
) -> Result<(), MigrateError> {
    redis::cmd("HSET")
        .arg(meta_key(prefix))
        .arg(VERSION_FIELD)
        .arg(version)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Before serving: a fresh keyspace is stamped with the latest version; an
/// older or newer one is refused with what to do.
pub async fn check(store: &Store, prefix: &str) -> Result<(), MigrateError> {
    let mut conn = store.connection();
    match current_version(&mut conn, prefix).await? {
        None => set_version(&mut conn, prefix, LATEST).await,
        Some(v) if v == LATEST => Ok(()),
        Some(v) if v > LATEST => Err(MigrateError::Newer {
            prefix: prefix.to_owned(),
            found: v,
        }),
        Some(v) => Err(MigrateError::Older {
            prefix: prefix.to_owned(),
            found: v,
        }),
    }
}

/// Applies every pending migration, `batch` keys per SCAN step. With
/// `max_batches`, stops after that many steps (the run can be resumed).
pub async fn run_pending(
    store: &Store,
    prefix: &str,
    batch: usize,
    max_batches: Option<u64>,
) -> Result<Report, MigrateError> {
    let mut conn = store.connection();
    let Some(from) = current_version(&mut conn, prefix).await? else {
        set_version(&mut conn, prefix, LATEST).await?;
        return Ok(Report {
            from_version: LATEST,
            to_version: LATEST,
            complete: true,
            ..Report::default()
        });
    };
    if from > LATEST {
        return Err(MigrateError::Newer {
            prefix: prefix.to_owned(),
            found: from,
        });
    }
    let mut report = Report {
        from_version: from,
        to_version: from,
        ..Report::default()
    };
    let mut budget = max_batches;
    for migration in migrations::all().iter().filter(|m| m.version() > from) {
        tracing::info!(
            version = migration.version(),
            name = migration.name(),
            "migrating"
        );
        if !apply(
            &mut conn,
            prefix,
            *migration,
            batch,
            &mut budget,
            &mut report,
        )
        .await?
        {
            return Ok(report);
        }
        set_version(&mut conn, prefix, migration.version()).await?;
        redis::cmd("HDEL")
            .arg(meta_key(prefix))
            .arg(cursor_field(migration.version()))
            .query_async::<()>(&mut conn)
            .await?;
        report.to_version = migration.version();
    }
    report.complete = true;
    Ok(report)
}

/// Replaces each key's value only if it is still the one read.
const COMPARE_AND_SET: &str = r"
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[2 * i - 1] then
    redis.call('SET', key, ARGV[2 * i])
    n = n + 1
  end
end
return n";

/// Runs one migration from its saved cursor; false if the budget ran out.
async fn apply(
    conn: &mut ConnectionManager,
    prefix: &str,
    migration: &dyn Migration,
    batch: usize,
    budget: &mut Option<u64>,
    report: &mut Report,
) -> Result<bool, MigrateError> {
    let field = cursor_field(migration.version());
    let saved: Option<u64> = redis::cmd("HGET")
        .arg(meta_key(prefix))
        .arg(&field)
        .query_async(conn)
        .await?;
    let mut cursor = saved.unwrap_or(0);
    let pattern = migration.pattern(prefix);
    loop {
        if let Some(left) = budget {
            if *left == 0 {
                return Ok(false);
            }
            *left -= 1;
        }
        let (next, keys) = scan_page(conn, cursor, &pattern, batch).await?;
        if !keys.is_empty() {
            let values: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(&keys).query_async(conn).await?;
            let mut cas = redis::cmd("EVAL");
            cas.arg(COMPARE_AND_SET);
            let mut changes: Vec<(&String, Vec<u8>, Vec<u8>)> = Vec::new();
            for (key, value) in keys.iter().zip(values) {
                let Some(value) = value else { continue };
                report.scanned += 1;
                match migration.transform(key, &value) {
                    Transform::Keep => {}
                    Transform::Unreadable => report.unreadable += 1,
                    Transform::Replace(new) => changes.push((key, value, new)),
                }
            }
            if !changes.is_empty() {
                cas.arg(changes.len());
                for (key, _, _) in &changes {
                    cas.arg(*key);
                }
                for (_, old, new) in &changes {
                    cas.arg(old.as_slice()).arg(new.as_slice());
                }
                let n: u64 = cas.query_async(conn).await?;
                report.rewritten += n;
            }
        }
        redis::cmd("HSET")
            .arg(meta_key(prefix))
            .arg(&field)
            .arg(next)
            .query_async::<()>(conn)
            .await?;
        if next == 0 {
            return Ok(true);
        }
        cursor = next;
    }
}

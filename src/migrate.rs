//! Runs the keyspace migrations in `migrations/` and guards `serve` against
//! a keyspace it does not understand.
//!
//! The applied version lives in the store's `meta` (field
//! `keyspace_version`). A migration walks the entries in batches; after each
//! batch the walk's cursor is saved in `meta` too, so an interrupted run
//! resumes where it stopped. Values are replaced with a compare-and-set, so
//! a value changed meanwhile is never overwritten.

use bytes::Bytes;

use crate::cache::entry;
use crate::cache::store::{Cursor, Store, StoreError};
use crate::migrations::{self, LATEST, Migration, Transform};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the keyspace is at version {found}, newer than this embgate understands ({LATEST}); \
         upgrade embgate"
    )]
    Newer { found: u32 },
    #[error(
        "the keyspace is at version {found}; this embgate needs version {LATEST}: run \
         `embgate migrate` first"
    )]
    Older { found: u32 },
    #[error("the keyspace version in the store is not a number: {0:?}")]
    BadVersion(String),
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

pub const VERSION_FIELD: &str = "keyspace_version";

fn cursor_field(version: u32) -> String {
    format!("migration_{version:04}_cursor")
}

/// Entries sampled to tell an unversioned keyspace's layout.
const SAMPLE: usize = 100;

/// The keyspace version: recorded; or the version before a migration
/// under way; or `None` for a keyspace that can take the latest version as
/// it is (empty, or whose entries are all in the current format: its
/// version was lost, e.g. evicted); or 0 for one written before versioning.
async fn current_version(store: &dyn Store) -> Result<Option<u32>, MigrateError> {
    if let Some(recorded) = store.meta_get(VERSION_FIELD).await? {
        return recorded
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| MigrateError::BadVersion(recorded));
    }
    for migration in migrations::all() {
        let version = migration.version();
        if store.meta_get(&cursor_field(version)).await?.is_some() {
            return Ok(Some(version - 1));
        }
    }
    let (_, heads) = store
        .scan_heads(&Cursor::start(), SAMPLE, entry::HEADER_LEN)
        .await?;
    let current = heads.iter().all(|h| entry::is_current_format(&h.head));
    Ok((!current).then_some(0))
}

async fn set_version(store: &dyn Store, version: u32) -> Result<(), MigrateError> {
    Ok(store.meta_set(VERSION_FIELD, &version.to_string()).await?)
}

/// Stamps the latest version unless another process recorded one since we
/// looked (another gateway, or a newer embgate, starting on the same store).
async fn stamp_latest(store: &dyn Store) -> Result<bool, MigrateError> {
    Ok(store
        .meta_set_new(VERSION_FIELD, &LATEST.to_string())
        .await?)
}

/// Before serving: a fresh keyspace is stamped with the latest version; an
/// older or newer one is refused with what to do.
pub async fn check(store: &dyn Store) -> Result<(), MigrateError> {
    match current_version(store).await? {
        None if stamp_latest(store).await? => Ok(()),
        // Stamped by someone else meanwhile: judge what they wrote.
        None => Box::pin(check(store)).await,
        Some(v) if v == LATEST => Ok(()),
        Some(v) if v > LATEST => Err(MigrateError::Newer { found: v }),
        Some(v) => Err(MigrateError::Older { found: v }),
    }
}

/// While serving: stamps the version again if the store lost it and the
/// keyspace can take it as it is. True if it stamped.
pub async fn stamp_if_missing(store: &dyn Store) -> Result<bool, MigrateError> {
    if store.meta_get(VERSION_FIELD).await?.is_some() {
        return Ok(false);
    }
    match current_version(store).await? {
        None => stamp_latest(store).await,
        Some(_) => Ok(false),
    }
}

/// Applies every pending migration, `batch` entries per step. With
/// `max_batches`, stops after that many steps (the run can be resumed).
pub async fn run_pending(
    store: &dyn Store,
    batch: usize,
    max_batches: Option<u64>,
) -> Result<Report, MigrateError> {
    let Some(from) = current_version(store).await? else {
        if !stamp_latest(store).await? {
            // Stamped by someone else meanwhile: migrate from what they wrote.
            return Box::pin(run_pending(store, batch, max_batches)).await;
        }
        return Ok(Report {
            from_version: LATEST,
            to_version: LATEST,
            complete: true,
            ..Report::default()
        });
    };
    if from > LATEST {
        return Err(MigrateError::Newer { found: from });
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
        if !apply(store, *migration, batch, &mut budget, &mut report).await? {
            return Ok(report);
        }
        set_version(store, migration.version()).await?;
        store
            .meta_delete(&cursor_field(migration.version()))
            .await?;
        report.to_version = migration.version();
    }
    report.complete = true;
    Ok(report)
}

/// Runs one migration from its saved cursor; false if the budget ran out.
async fn apply(
    store: &dyn Store,
    migration: &dyn Migration,
    batch: usize,
    budget: &mut Option<u64>,
    report: &mut Report,
) -> Result<bool, MigrateError> {
    let field = cursor_field(migration.version());
    let mut cursor = store
        .meta_get(&field)
        .await?
        .map_or_else(Cursor::start, Cursor);
    loop {
        if let Some(left) = budget {
            if *left == 0 {
                return Ok(false);
            }
            *left -= 1;
        }
        let (next, entries) = store.scan_entries(&cursor, batch).await?;
        let mut changes: Vec<(_, Bytes, Bytes)> = Vec::new();
        for (hash, value) in entries {
            report.scanned += 1;
            match migration.transform(&hash, &value) {
                Transform::Keep => {}
                Transform::Unreadable => report.unreadable += 1,
                Transform::Replace(new) => changes.push((hash, value, new.into())),
            }
        }
        report.rewritten += store.compare_and_set(changes).await?;
        store.meta_set(&field, &next.0).await?;
        if next.is_start() {
            return Ok(true);
        }
        cursor = next;
    }
}

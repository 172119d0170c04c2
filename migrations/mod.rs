//! Keyspace migrations: versioned, ordered rewrites of the cache's stored
//! entries, applied by `embgate migrate` on any store (see `src/migrate.rs`
//! for the runner: batches, resumable, idempotent).
//!
//! The keyspace version is the number of the last migration applied. To add
//! one: a new `mNNNN_name.rs` implementing [`Migration`], listed in [`all`]
//! with the next number. Each transform must be idempotent: it sees values
//! already migrated when a run resumes.

pub mod m0001_entry_format_2;
pub mod m0002_entry_format_3;

use crate::cache::key::KeyHash;

/// How one stored value fares under a migration.
#[derive(Debug, PartialEq, Eq)]
pub enum Transform {
    /// Already in the new layout (or not this migration's business).
    Keep,
    /// Rewrite the value.
    Replace(Vec<u8>),
    /// Unreadable in the old layout too: left as is; the gateway treats it
    /// as a miss and overwrites it.
    Unreadable,
}

pub trait Migration: Sync {
    /// 1-based; the keyspace version once this migration has run.
    fn version(&self) -> u32;
    fn name(&self) -> &'static str;
    /// The fate of the entry stored under `key`.
    fn transform(&self, key: &KeyHash, value: &[u8]) -> Transform;
}

/// Every migration, in order.
pub fn all() -> &'static [&'static dyn Migration] {
    &[
        &m0001_entry_format_2::EntryFormat2,
        &m0002_entry_format_3::EntryFormat3,
    ]
}

/// The keyspace version this build reads and writes.
pub const LATEST: u32 = 2;

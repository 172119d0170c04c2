//! Reading: every call reads one snapshot (the last commit) through one
//! read transaction, whatever the writer is doing meanwhile.

use bytes::Bytes;
use redb::{
    Database, ReadOnlyTable, ReadableDatabase as _, ReadableTable, ReadableTableMetadata as _,
};

use super::tables::{ENTRY_BYTES, Hash, Tables};
use super::writer::unix_millis;
use crate::cache::key::KeyHash;
use crate::cache::store::{Cursor, Scanned, StoreError};

/// The entries as of the last commit.
pub(super) struct Snapshot {
    entries: ReadOnlyTable<&'static Hash, &'static [u8]>,
    /// When some entry can expire: the expiries, and now (unix ms).
    expires: Option<(ReadOnlyTable<&'static Hash, u64>, u64)>,
}

impl Snapshot {
    /// `expiring`: whether any entry can expire (else expiries are not read).
    pub(super) fn take(
        db: &Database,
        tables: &Tables,
        expiring: bool,
    ) -> Result<Snapshot, redb::Error> {
        let txn = db.begin_read()?;
        let expires = match expiring {
            true => Some((txn.open_table(tables.expires())?, unix_millis())),
            false => None,
        };
        Ok(Snapshot {
            entries: txn.open_table(tables.entries())?,
            expires,
        })
    }

    /// Whether the entry of `key` has expired (and is gone for readers
    /// until the writer removes it).
    fn expired(&self, key: &KeyHash) -> Result<bool, redb::Error> {
        let Some((expires, now)) = &self.expires else {
            return Ok(false);
        };
        Ok(ReadableTable::get(expires, &key.0)?.is_some_and(|at| at.value() <= *now))
    }

    pub(super) fn values(&self, keys: &[KeyHash]) -> Result<Vec<Option<Bytes>>, redb::Error> {
        keys.iter()
            .map(|key| {
                let value = ReadableTable::get(&self.entries, &key.0)?;
                match value {
                    Some(v) if !self.expired(key)? => Ok(Some(Bytes::copy_from_slice(v.value()))),
                    _ => Ok(None),
                }
            })
            .collect()
    }

    pub(super) fn exist(&self, keys: &[KeyHash]) -> Result<Vec<bool>, redb::Error> {
        keys.iter()
            .map(|key| {
                Ok(ReadableTable::get(&self.entries, &key.0)?.is_some() && !self.expired(key)?)
            })
            .collect()
    }

    /// Up to `count` entries after `cursor`, each as `f` makes it of its
    /// key and value. The cursor is the last key returned, in hex.
    pub(super) fn scan<T>(
        &self,
        cursor: &Cursor,
        count: usize,
        f: impl Fn(KeyHash, &[u8]) -> T,
    ) -> Scanned<T> {
        let count = count.max(1);
        let after = match cursor.is_start() {
            true => None,
            false => Some(KeyHash::from_hex(&cursor.0).ok_or_else(|| {
                StoreError::Embedded(format!("{:?} is not a cursor of this store", cursor.0))
            })?),
        };
        let range = match &after {
            None => ReadableTable::range::<&Hash>(&self.entries, ..),
            Some(after) => ReadableTable::range::<&Hash>(
                &self.entries,
                (
                    std::ops::Bound::Excluded(&after.0),
                    std::ops::Bound::Unbounded,
                ),
            ),
        }
        .map_err(redb::Error::from)?;
        let mut found = Vec::with_capacity(count.min(4096));
        let mut last = None;
        for item in range.take(count) {
            let (key, value) = item.map_err(redb::Error::from)?;
            let hash = KeyHash(*key.value());
            found.push(f(hash, value.value()));
            last = Some(hash);
        }
        let next = match (found.len() < count, last) {
            (false, Some(last)) => Cursor(last.to_hex()),
            _ => Cursor::start(),
        };
        Ok((next, found))
    }
}

/// Whether any entry of the keyspace can expire.
pub(super) fn expiring(db: &Database, tables: &Tables) -> Result<bool, redb::Error> {
    let txn = db.begin_read()?;
    Ok(!txn.open_table(tables.by_expiry())?.is_empty()?)
}

/// Entries and their bytes, from the counts the writer keeps.
pub(super) fn size(db: &Database, tables: &Tables) -> Result<(u64, u64), redb::Error> {
    let txn = db.begin_read()?;
    let entries = txn.open_table(tables.entries())?.len()?;
    let sizes = txn.open_table(tables.sizes())?;
    let bytes = ReadableTable::get(&sizes, ENTRY_BYTES)?.map_or(0, |v| v.value());
    Ok((entries, bytes))
}

pub(super) fn meta_get(
    db: &Database,
    tables: &Tables,
    field: &str,
) -> Result<Option<String>, redb::Error> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(tables.meta())?;
    Ok(ReadableTable::get(&meta, field)?.map(|v| v.value().to_owned()))
}

pub(super) fn ledger_read(
    db: &Database,
    tables: &Tables,
) -> Result<Vec<(String, String)>, redb::Error> {
    let txn = db.begin_read()?;
    let ledger = txn.open_table(tables.ledger())?;
    ReadableTable::range::<&str>(&ledger, ..)?
        .map(|item| {
            let (field, value) = item?;
            Ok((field.value().to_owned(), value.value().to_owned()))
        })
        .collect()
}

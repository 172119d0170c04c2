//! The tables of one keyspace inside the file, named after the key prefix
//! so that keyspaces of different prefixes can share a file, and the
//! changes a write transaction makes to them.
//!
//! ```text
//! <prefix>:entries:v1  32-byte key hash -> entry bytes (see `entry.rs`)
//! <prefix>:last_use    32-byte key hash -> tick of its last use
//! <prefix>:by_use      tick (8 bytes, big-endian) + key hash -> ()
//! <prefix>:expires     32-byte key hash -> when it expires (unix ms)
//! <prefix>:by_expiry   unix ms (8 bytes, big-endian) + key hash -> ()
//! <prefix>:meta        field -> value (keyspace version, migration cursors)
//! <prefix>:ledger      field -> value (the all-time ledger)
//! <prefix>:sizes       "entry_bytes" -> bytes of entries (keys and values)
//! ```
//!
//! `by_use` orders entries by last use, so eviction finds the oldest
//! without a scan, and `by_expiry` by expiry, so reaping does too (only
//! entries written with a TTL are in `expires`); `sizes` keeps the byte count in the same transactions
//! that change it, so reporting it never walks the entries.

use redb::{ReadableTable as _, Table, TableDefinition, WriteTransaction};

use crate::cache::key::KeyLayout;
use crate::cache::store::Increment;

pub(super) type Hash = [u8; 32];

/// A `by_use` (or `by_expiry`) key: the tick, big-endian so keys sort by
/// it, then the hash.
pub(super) type UseKey = [u8; 40];

type Entries = &'static Hash;
type Text = &'static str;

pub(super) const ENTRY_BYTES: &str = "entry_bytes";

pub(super) struct Tables {
    entries: String,
    last_use: String,
    by_use: String,
    expires: String,
    by_expiry: String,
    meta: String,
    ledger: String,
    sizes: String,
}

impl Tables {
    pub(super) fn new(layout: &KeyLayout) -> Tables {
        let prefix = layout.prefix();
        Tables {
            entries: format!("{prefix}:entries:v1"),
            last_use: format!("{prefix}:last_use"),
            by_use: format!("{prefix}:by_use"),
            expires: format!("{prefix}:expires"),
            by_expiry: format!("{prefix}:by_expiry"),
            meta: layout.meta(),
            ledger: layout.ledger(),
            sizes: format!("{prefix}:sizes"),
        }
    }

    pub(super) fn entries(&self) -> TableDefinition<'_, Entries, &'static [u8]> {
        TableDefinition::new(&self.entries)
    }

    pub(super) fn last_use(&self) -> TableDefinition<'_, Entries, u64> {
        TableDefinition::new(&self.last_use)
    }

    pub(super) fn by_use(&self) -> TableDefinition<'_, &'static UseKey, ()> {
        TableDefinition::new(&self.by_use)
    }

    pub(super) fn expires(&self) -> TableDefinition<'_, Entries, u64> {
        TableDefinition::new(&self.expires)
    }

    pub(super) fn by_expiry(&self) -> TableDefinition<'_, &'static UseKey, ()> {
        TableDefinition::new(&self.by_expiry)
    }

    pub(super) fn meta(&self) -> TableDefinition<'_, Text, Text> {
        TableDefinition::new(&self.meta)
    }

    pub(super) fn ledger(&self) -> TableDefinition<'_, Text, Text> {
        TableDefinition::new(&self.ledger)
    }

    pub(super) fn sizes(&self) -> TableDefinition<'_, Text, u64> {
        TableDefinition::new(&self.sizes)
    }
}

/// What an entry counts against `store.max_bytes`: its key and value.
pub(super) fn entry_size(value_len: usize) -> u64 {
    32 + value_len as u64
}

pub(super) fn use_key(tick: u64, hash: &Hash) -> UseKey {
    let mut key = [0u8; 40];
    key[..8].copy_from_slice(&tick.to_be_bytes());
    key[8..].copy_from_slice(hash);
    key
}

/// Every table of a keyspace, open in one write transaction, and the byte
/// count as it changes.
pub(super) struct Open<'txn> {
    pub(super) entries: Table<'txn, Entries, &'static [u8]>,
    pub(super) last_use: Table<'txn, Entries, u64>,
    pub(super) by_use: Table<'txn, &'static UseKey, ()>,
    pub(super) expires: Table<'txn, Entries, u64>,
    pub(super) by_expiry: Table<'txn, &'static UseKey, ()>,
    pub(super) meta: Table<'txn, Text, Text>,
    pub(super) ledger: Table<'txn, Text, Text>,
    sizes: Table<'txn, Text, u64>,
    pub(super) bytes: u64,
}

impl<'txn> Open<'txn> {
    /// Opens (creating them if need be) every table of the keyspace.
    pub(super) fn tables(
        txn: &'txn WriteTransaction,
        tables: &Tables,
    ) -> Result<Self, redb::Error> {
        let sizes = txn.open_table(tables.sizes())?;
        let bytes = sizes.get(ENTRY_BYTES)?.map_or(0, |v| v.value());
        Ok(Open {
            entries: txn.open_table(tables.entries())?,
            last_use: txn.open_table(tables.last_use())?,
            by_use: txn.open_table(tables.by_use())?,
            expires: txn.open_table(tables.expires())?,
            by_expiry: txn.open_table(tables.by_expiry())?,
            meta: txn.open_table(tables.meta())?,
            ledger: txn.open_table(tables.ledger())?,
            sizes,
            bytes,
        })
    }

    /// Writes the byte count back; the last step of a transaction.
    pub(super) fn save_bytes(&mut self) -> Result<(), redb::Error> {
        self.sizes.insert(ENTRY_BYTES, self.bytes)?;
        Ok(())
    }

    /// Stores an entry, used at `tick`, to expire at `expires_at` (unix
    /// ms; `None`: never).
    pub(super) fn put(
        &mut self,
        hash: &Hash,
        value: &[u8],
        tick: u64,
        expires_at: Option<u64>,
    ) -> Result<(), redb::Error> {
        self.replace(hash, value)?;
        self.set_expiry(hash, expires_at)?;
        self.set_last_use(hash, tick)
    }

    /// Removes an entry and all that refers to it; whether it was there.
    pub(super) fn remove(&mut self, hash: &Hash) -> Result<bool, redb::Error> {
        let removed = self.entries.remove(hash)?.map(|v| v.value().len());
        if let Some(old) = self.last_use.remove(hash)?.map(|v| v.value()) {
            self.by_use.remove(&use_key(old, hash))?;
        }
        self.set_expiry(hash, None)?;
        match removed {
            Some(len) => {
                self.bytes = self.bytes.saturating_sub(entry_size(len));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Sets an entry's value, leaving its last use as it is.
    fn replace(&mut self, hash: &Hash, value: &[u8]) -> Result<(), redb::Error> {
        let old = self.entries.insert(hash, value)?.map(|v| v.value().len());
        if let Some(old) = old {
            self.bytes = self.bytes.saturating_sub(entry_size(old));
        }
        self.bytes += entry_size(value.len());
        Ok(())
    }

    /// Replaces each value only if it is still `old`; how many were.
    pub(super) fn compare_and_set(
        &mut self,
        changes: &[(Hash, &[u8], &[u8])],
    ) -> Result<u64, redb::Error> {
        let mut replaced = 0;
        for (hash, old, new) in changes {
            let current = self.entries.get(hash)?.is_some_and(|v| v.value() == *old);
            if current {
                self.replace(hash, new)?;
                replaced += 1;
            }
        }
        Ok(replaced)
    }

    /// Sets `field` unless it has a value; true if it set it.
    pub(super) fn meta_set_new(&mut self, field: &str, value: &str) -> Result<bool, redb::Error> {
        if self.meta.get(field)?.is_some() {
            return Ok(false);
        }
        self.meta.insert(field, value)?;
        Ok(true)
    }

    /// Adds to ledger fields, kept as text as Redis keeps its hash fields.
    pub(super) fn ledger_add(
        &mut self,
        increments: &[(String, Increment)],
    ) -> Result<(), redb::Error> {
        for (field, increment) in increments {
            let current = self
                .ledger
                .get(field.as_str())?
                .map(|v| v.value().to_owned());
            let next = add(current.as_deref(), *increment);
            self.ledger.insert(field.as_str(), next.as_str())?;
        }
        Ok(())
    }
}

/// `current + increment`, as text. A value that is not a number (damaged)
/// counts as zero rather than blocking every later addition.
fn add(current: Option<&str>, increment: Increment) -> String {
    match increment {
        Increment::Int(n) => match current.map(str::parse::<i64>) {
            None => n.to_string(),
            Some(Ok(c)) => c.saturating_add(n).to_string(),
            Some(Err(_)) => add(current, Increment::Float(n as f64)),
        },
        Increment::Float(x) => {
            let c = current.and_then(|c| c.parse::<f64>().ok()).unwrap_or(0.0);
            (c + x).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_values_add_up_as_text() {
        assert_eq!(add(None, Increment::Int(5)), "5");
        assert_eq!(add(Some("5"), Increment::Int(7)), "12");
        assert_eq!(add(None, Increment::Float(0.25)), "0.25");
        assert_eq!(add(Some("0.25"), Increment::Float(0.5)), "0.75");
        assert_eq!(add(Some("1.5"), Increment::Int(1)), "2.5");
        assert_eq!(add(Some("garbage"), Increment::Float(1.0)), "1");
        let tiny: f64 = add(None, Increment::Float(4e-7)).parse().expect("a number");
        assert_eq!(tiny, 4e-7, "read back exactly");
    }

    #[test]
    fn use_keys_sort_by_tick_first() {
        let (a, b) = ([0xff; 32], [0x00; 32]);
        assert!(use_key(1, &a) < use_key(2, &b));
        assert!(use_key(256, &b) > use_key(255, &a));
    }
}

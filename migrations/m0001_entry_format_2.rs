//! 0001: entries from format 1 to format 2 (written today in the current
//! format, which holds everything format 2 did).
//!
//! Format 1 (the gateway's first layout) had a 20-byte header: magic "EG",
//! version 1, flags, dimensions, tokens, then an xxh3-64 checksum of (key
//! hash, bytes 0..12, payload). Format 2 added the model tag and the write
//! time (see `src/cache/entry.rs`). The model is not recoverable from a
//! hashed key, so migrated entries get tag 0 ("unknown") and the migration
//! time. Vectors and token counts are kept bit for bit. Entries in any
//! other format are left to the migrations after this one.

use super::{Migration, Transform};
use crate::cache::entry::{self, Entry, Header, ValueType};
use crate::cache::key::KeyHash;

pub struct EntryFormat2;

const V1_HEADER: usize = 20;

impl Migration for EntryFormat2 {
    fn version(&self) -> u32 {
        1
    }

    fn name(&self) -> &'static str {
        "entry_format_2"
    }

    fn transform(&self, hash: &KeyHash, value: &[u8]) -> Transform {
        if value.len() < 3 || &value[..2] != entry::MAGIC || value[2] != 1 {
            return Transform::Keep;
        }
        match decode_v1(hash, value) {
            Some((payload, tokens)) => {
                let header = Header {
                    value_type: ValueType::F32,
                    tokens,
                    model_tag: 0,
                    written_at: entry::unix_now(),
                    upstream_tag: 0,
                    tenant_tag: 0,
                };
                let upgraded = Entry::from_parts(hash, &header, payload);
                Transform::Replace(upgraded.as_bytes().to_vec())
            }
            None => Transform::Unreadable,
        }
    }
}

/// A verified format-1 value: (payload, tokens).
fn decode_v1<'a>(key: &KeyHash, value: &'a [u8]) -> Option<(&'a [u8], u32)> {
    if value.len() < V1_HEADER || &value[..2] != entry::MAGIC || value[2] != 1 {
        return None;
    }
    let dims = u32::from_le_bytes(value[4..8].try_into().ok()?) as usize;
    let payload = &value[V1_HEADER..];
    if dims == 0 || payload.len() != dims * 4 {
        return None;
    }
    let stored = u64::from_le_bytes(value[12..20].try_into().ok()?);
    (stored == entry::checksum(key, &value[..12], payload)).then(|| {
        (
            payload,
            u32::from_le_bytes([value[8], value[9], value[10], value[11]]),
        )
    })
}

/// Writes a value in format 1, as the first layout did (for tests of this
/// migration).
pub fn encode_v1(key: &KeyHash, values: &[f32], tokens: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(V1_HEADER + values.len() * 4);
    buf.extend_from_slice(entry::MAGIC);
    buf.push(1);
    buf.push(0);
    buf.extend_from_slice(&(values.len() as u32).to_le_bytes());
    buf.extend_from_slice(&tokens.to_le_bytes());
    buf.extend_from_slice(&[0; 8]);
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let sum = entry::checksum(key, &buf[..12], &buf[V1_HEADER..]);
    buf[12..20].copy_from_slice(&sum.to_le_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_format_1_bit_for_bit_and_is_idempotent() {
        let hash = KeyHash([9; 32]);
        let old = encode_v1(&hash, &[0.5, -0.25, 1e-9], 17);
        let Transform::Replace(new) = EntryFormat2.transform(&hash, &old) else {
            panic!("format 1 is rewritten");
        };
        let entry = Entry::decode(&hash, new.clone().into(), Some(3)).expect("current format");
        assert_eq!(entry.payload(), &old[V1_HEADER..]);
        assert_eq!(entry.tokens(), 17);
        assert_eq!(entry.header().model_tag, 0);
        assert_eq!(EntryFormat2.transform(&hash, &new), Transform::Keep);
        let mut corrupt = old.clone();
        corrupt[V1_HEADER] ^= 1;
        assert_eq!(
            EntryFormat2.transform(&hash, &corrupt),
            Transform::Unreadable
        );
        assert_eq!(
            EntryFormat2.transform(&KeyHash([8; 32]), &old),
            Transform::Unreadable,
            "a format-1 value is bound to its key too"
        );
    }
}

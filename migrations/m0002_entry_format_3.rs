//! 0002: entries from format 2 to format 3.
//!
//! Format 2 had a 32-byte header: magic "EG", version 2, flags (0),
//! dimensions, tokens, model tag, write time, 4 reserved bytes, then an
//! xxh3-64 checksum of (key hash, bytes 0..24, payload); its values were
//! always f32. Format 3 (see `src/cache/entry.rs`) adds the value type and
//! the upstream and tenant tags, so entries can be purged by them. Which
//! upstream and tenant an old entry belongs to is not recoverable from its
//! hashed key: migrated entries get tag 0 ("unknown"), and keep their model
//! tag, write time, tokens and vector bit for bit.

use super::{Migration, Transform};
use crate::cache::entry::{self, Entry, Header, ValueType};
use crate::cache::key::KeyHash;

pub struct EntryFormat3;

const V2_HEADER: usize = 32;
const V2_CHECKED: usize = 24;

impl Migration for EntryFormat3 {
    fn version(&self) -> u32 {
        2
    }

    fn name(&self) -> &'static str {
        "entry_format_3"
    }

    fn transform(&self, hash: &KeyHash, value: &[u8]) -> Transform {
        if value.len() < 3 || &value[..2] != entry::MAGIC || value[2] != 2 {
            return Transform::Keep;
        }
        match decode_v2(hash, value) {
            Some((header, payload)) => {
                let upgraded = Entry::from_parts(hash, &header, payload);
                Transform::Replace(upgraded.as_bytes().to_vec())
            }
            None => Transform::Unreadable,
        }
    }
}

fn read_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A verified format-2 value: its fields as a current header, and its payload.
fn decode_v2<'a>(key: &KeyHash, value: &'a [u8]) -> Option<(Header, &'a [u8])> {
    if value.len() < V2_HEADER {
        return None;
    }
    let dims = read_u32(&value[4..8]) as usize;
    let payload = &value[V2_HEADER..];
    if dims == 0 || payload.len() != dims * 4 {
        return None;
    }
    let stored = u64::from_le_bytes(value[V2_CHECKED..V2_HEADER].try_into().ok()?);
    if stored != entry::checksum(key, &value[..V2_CHECKED], payload) {
        return None;
    }
    let header = Header {
        value_type: ValueType::F32,
        tokens: read_u32(&value[8..12]),
        model_tag: read_u32(&value[12..16]),
        written_at: read_u32(&value[16..20]),
        upstream_tag: 0,
        tenant_tag: 0,
    };
    Some((header, payload))
}

/// Writes a value in format 2, as that layout did (for tests of this
/// migration).
pub fn encode_v2(key: &KeyHash, values: &[f32], tokens: u32, model: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(V2_HEADER + values.len() * 4);
    buf.extend_from_slice(entry::MAGIC);
    buf.push(2);
    buf.push(0);
    buf.extend_from_slice(&(values.len() as u32).to_le_bytes());
    buf.extend_from_slice(&tokens.to_le_bytes());
    buf.extend_from_slice(&entry::tag(model).to_le_bytes());
    buf.extend_from_slice(&1_700_000_000u32.to_le_bytes());
    buf.extend_from_slice(&[0; 12]);
    for v in values {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    let sum = entry::checksum(key, &buf[..V2_CHECKED], &buf[V2_HEADER..]);
    buf[V2_CHECKED..V2_HEADER].copy_from_slice(&sum.to_le_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_format_2_bit_for_bit_and_is_idempotent() {
        let hash = KeyHash([5; 32]);
        let old = encode_v2(&hash, &[0.5, -0.25, 1e-9], 17, "m");
        let Transform::Replace(new) = EntryFormat3.transform(&hash, &old) else {
            panic!("format 2 is rewritten");
        };
        let entry = Entry::decode(&hash, new.clone().into(), Some(3)).expect("current format");
        assert_eq!(entry.payload(), &old[V2_HEADER..]);
        assert_eq!(entry.tokens(), 17);
        let header = entry.header();
        assert_eq!(header.model_tag, entry::tag("m"));
        assert_eq!(header.written_at, 1_700_000_000);
        assert_eq!((header.upstream_tag, header.tenant_tag), (0, 0));
        assert_eq!(EntryFormat3.transform(&hash, &new), Transform::Keep);
        let mut corrupt = old.clone();
        corrupt[V2_HEADER] ^= 1;
        assert_eq!(
            EntryFormat3.transform(&hash, &corrupt),
            Transform::Unreadable
        );
        assert_eq!(
            EntryFormat3.transform(&KeyHash([6; 32]), &old),
            Transform::Unreadable,
            "bound to its key"
        );
    }
}

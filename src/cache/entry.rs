//! The stored form of one vector: a 32-byte header and the raw little-endian
//! f32 values, so a hit is served (as base64 or floats) straight from the
//! bytes the store returned.
//!
//! ```text
//! 0..2   magic "EG"
//! 2      format version (2)
//! 3      flags (0)
//! 4..8   dimensions, u32 LE
//! 8..12  tokens the vendor bills for this input, u32 LE
//! 12..16 model tag: first 4 bytes of blake3(model), LE (0: unknown)
//! 16..20 written at, unix seconds, u32 LE
//! 20..24 reserved (0)
//! 24..32 xxh3-64 of (key hash, bytes 0..24, payload), u64 LE
//! 32..   dimensions x f32 LE
//! ```
//!
//! The model tag and write time let operators see and purge entries by
//! model and age (`embgate stats`). Format 1 (20-byte header, no tag or
//! time) is upgraded by `embgate migrate` (migrations/m0001_entry_format_2.rs).
//!
//! The checksum binds the value to its key: a corrupted value, or a valid
//! value copied under another key, fails to decode and is treated as a miss.

use std::hash::Hasher;

use bytes::Bytes;
use twox_hash::XxHash3_64;

use crate::cache::key::KeyHash;

pub const HEADER_LEN: usize = 32;
pub const MAGIC: &[u8; 2] = b"EG";
pub const FORMAT_VERSION: u8 = 2;
const CHECKED: usize = 24;

/// A decoded, verified entry. Cheap to clone: it shares the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    bytes: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("entry too short ({0} bytes)")]
    Short(usize),
    #[error("not an embgate entry, or an unknown format version")]
    Foreign,
    #[error("entry length does not match its dimensions")]
    Length,
    #[error("entry has {found} dimensions, the request wants {wanted}")]
    Dimensions { found: u32, wanted: u32 },
    #[error("entry checksum mismatch")]
    Checksum,
}

impl Entry {
    /// Encodes a vector of `model` for `key`, written now. `values` must be
    /// finite (checked upstream).
    pub fn encode(key: &KeyHash, model: &str, values: &[f32], tokens: u32) -> Entry {
        let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::from_parts(key, &payload, tokens, model_tag(model), unix_now())
    }

    /// Assembles an entry from its parts; `payload` is LE f32 bytes.
    pub fn from_parts(
        key: &KeyHash,
        payload: &[u8],
        tokens: u32,
        model_tag: u32,
        written_at: u32,
    ) -> Entry {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(MAGIC);
        buf.push(FORMAT_VERSION);
        buf.push(0);
        buf.extend_from_slice(&((payload.len() / 4) as u32).to_le_bytes());
        buf.extend_from_slice(&tokens.to_le_bytes());
        buf.extend_from_slice(&model_tag.to_le_bytes());
        buf.extend_from_slice(&written_at.to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(payload);
        let sum = checksum(key, &buf[..CHECKED], &buf[HEADER_LEN..]);
        buf[CHECKED..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
        Entry { bytes: buf.into() }
    }

    /// Verifies `bytes` as the entry stored under `key`.
    pub fn decode(
        key: &KeyHash,
        bytes: Bytes,
        wanted_dimensions: Option<u32>,
    ) -> Result<Entry, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::Short(bytes.len()));
        }
        if !is_current_format(&bytes) {
            return Err(DecodeError::Foreign);
        }
        let dims = read_u32(&bytes[4..8]);
        if dims == 0 || (bytes.len() - HEADER_LEN) != dims as usize * 4 {
            return Err(DecodeError::Length);
        }
        if let Some(wanted) = wanted_dimensions.filter(|w| *w != dims) {
            return Err(DecodeError::Dimensions {
                found: dims,
                wanted,
            });
        }
        let stored = u64::from_le_bytes(
            bytes[CHECKED..HEADER_LEN]
                .try_into()
                .map_err(|_| DecodeError::Length)?,
        );
        if stored != checksum(key, &bytes[..CHECKED], &bytes[HEADER_LEN..]) {
            return Err(DecodeError::Checksum);
        }
        Ok(Entry { bytes })
    }

    pub fn dimensions(&self) -> u32 {
        read_u32(&self.bytes[4..8])
    }

    pub fn tokens(&self) -> u32 {
        read_u32(&self.bytes[8..12])
    }

    pub fn model_tag(&self) -> u32 {
        read_u32(&self.bytes[12..16])
    }

    /// Unix seconds when the vendor's answer was stored.
    pub fn written_at(&self) -> u32 {
        read_u32(&self.bytes[16..20])
    }

    /// The vector as little-endian f32 bytes.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole stored value.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// Whether `bytes` start like an entry of the current format (without
/// verifying it).
pub fn is_current_format(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && &bytes[..2] == MAGIC && bytes[2] == FORMAT_VERSION
}

/// The model tag in the first bytes of a current-format entry (its header,
/// as `embgate stats` reads it); `None` for others and for entries without
/// a tag.
pub fn model_tag_of_head(head: &[u8]) -> Option<u32> {
    if head.len() < 16 || !is_current_format(head) {
        return None;
    }
    Some(read_u32(&head[12..16])).filter(|t| *t != 0)
}

/// The tag identifying `model` in entry headers.
pub fn model_tag(model: &str) -> u32 {
    let hash = blake3::hash(model.as_bytes());
    let b = hash.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

fn read_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// XXH3-64 (seed 0) of the key, the header's first 24 bytes and the
/// payload, as one message: stored entries (format 1 too) depend on
/// exactly this value.
pub(crate) fn checksum(key: &KeyHash, header: &[u8], payload: &[u8]) -> u64 {
    let mut h = XxHash3_64::with_seed(0);
    h.write(&key.0);
    h.write(header);
    h.write(payload);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: KeyHash = KeyHash([7; 32]);

    /// Entries already stored were summed by another XXH3 implementation:
    /// the checksum must stay the same function, whatever the payload size
    /// (short inputs, stripe and block boundaries, a 1536-dimension vector).
    #[test]
    fn checksum_is_xxh3_64_of_key_header_and_payload() {
        let header: Vec<u8> = (0..CHECKED as u8).collect();
        for len in [0usize, 1, 3, 64, 200, 240, 1023, 1024, 1025, 6144, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let whole = [&KEY.0[..], &header, &payload].concat();
            assert_eq!(
                checksum(&KEY, &header, &payload),
                xxhash_rust::xxh3::xxh3_64(&whole),
                "payload of {len} bytes"
            );
        }
        // The reference value of XXH3-64 for no input at all.
        assert_eq!(XxHash3_64::oneshot(b""), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn round_trips_and_stays_compact() {
        let values = [0.25f32, -1.0, 3.5e-8];
        let e = Entry::encode(&KEY, "m", &values, 42);
        assert!(e.as_bytes().len() <= 4 * values.len() + 64);
        let d = Entry::decode(&KEY, e.as_bytes().clone(), Some(3)).expect("decodes");
        assert_eq!(d.dimensions(), 3);
        assert_eq!(d.tokens(), 42);
        assert_eq!(d.model_tag(), model_tag("m"));
        assert!(d.written_at() > 1_700_000_000);
        let back: Vec<f32> = d
            .payload()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, values);
    }

    #[test]
    fn detects_corruption_foreign_values_and_wrong_keys() {
        let e = Entry::encode(&KEY, "m", &[1.0, 2.0], 1);
        let bytes = e.as_bytes().clone();
        let mut flipped = bytes.to_vec();
        flipped[HEADER_LEN + 1] ^= 1;
        assert_eq!(
            Entry::decode(&KEY, flipped.into(), None),
            Err(DecodeError::Checksum)
        );
        assert_eq!(
            Entry::decode(&KeyHash([8; 32]), bytes.clone(), None),
            Err(DecodeError::Checksum)
        );
        assert_eq!(
            Entry::decode(&KEY, Bytes::from_static(b"[0.1, 0.2]"), None),
            Err(DecodeError::Short(10))
        );
        assert_eq!(
            Entry::decode(&KEY, Bytes::from(vec![b'x'; 40]), None),
            Err(DecodeError::Foreign)
        );
        assert_eq!(
            Entry::decode(&KEY, bytes.slice(..bytes.len() - 4), None),
            Err(DecodeError::Length)
        );
        assert!(matches!(
            Entry::decode(&KEY, bytes, Some(3)),
            Err(DecodeError::Dimensions {
                found: 2,
                wanted: 3
            })
        ));
    }
}

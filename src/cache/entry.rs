//! The stored form of one vector: a 40-byte header and the values exactly
//! as the vendor sent them (raw little-endian f32 for float vectors), so a
//! hit is served (as base64 or floats) straight from the bytes the store
//! returned.
//!
//! ```text
//! 0..2   magic "EG"
//! 2      format version (3)
//! 3      value type: 0 f32 LE, 1 int8, 2 uint8, 3 binary, 4 ubinary
//! 4..8   values (dimensions), u32 LE
//! 8..12  tokens the vendor bills for this input, u32 LE
//! 12..16 model tag \
//! 16..20 written at, unix seconds, u32 LE
//! 20..24 upstream tag   } tags: first 4 bytes of blake3(name), LE (0: unknown)
//! 24..28 tenant tag    /  (tenant: 0 for entries every tenant shares)
//! 28..32 reserved (0)
//! 32..40 xxh3-64 of (key hash, bytes 0..32, payload), u64 LE
//! 40..   values x value size (4 bytes for f32, 1 for the others)
//! ```
//!
//! The tags and write time let operators see and purge entries by model,
//! upstream, tenant and age (`embgate stats`, `embgate purge`). Older
//! formats are upgraded by `embgate migrate` (`migrations/`).
//!
//! The checksum binds the value to its key: a corrupted value, or a valid
//! value copied under another key, fails to decode and is treated as a miss.

use std::hash::Hasher;

use bytes::Bytes;
use twox_hash::XxHash3_64;

use crate::cache::key::KeyHash;

pub const HEADER_LEN: usize = 40;
pub const MAGIC: &[u8; 2] = b"EG";
pub const FORMAT_VERSION: u8 = 3;
const CHECKED: usize = 32;

/// How an entry's values are stored: as the vendor returned them, never
/// converted (the output type is part of the key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ValueType {
    #[default]
    F32 = 0,
    Int8 = 1,
    Uint8 = 2,
    /// Bits packed eight to a byte, as signed bytes.
    Binary = 3,
    /// Bits packed eight to a byte, as unsigned bytes.
    Ubinary = 4,
}

impl ValueType {
    fn from_byte(b: u8) -> Option<ValueType> {
        Some(match b {
            0 => ValueType::F32,
            1 => ValueType::Int8,
            2 => ValueType::Uint8,
            3 => ValueType::Binary,
            4 => ValueType::Ubinary,
            _ => return None,
        })
    }

    /// The name vendors give the type (`embedding_types`, `output_dtype`).
    pub fn name(self) -> &'static str {
        match self {
            ValueType::F32 => "float",
            ValueType::Int8 => "int8",
            ValueType::Uint8 => "uint8",
            ValueType::Binary => "binary",
            ValueType::Ubinary => "ubinary",
        }
    }

    pub fn from_name(name: &str) -> Option<ValueType> {
        [
            ValueType::F32,
            ValueType::Int8,
            ValueType::Uint8,
            ValueType::Binary,
            ValueType::Ubinary,
        ]
        .into_iter()
        .find(|t| t.name() == name)
    }

    /// Stored values for a vector of `dimensions`: packed bit types hold
    /// eight dimensions a byte.
    pub fn stored_values(self, dimensions: u32) -> u32 {
        match self {
            ValueType::Binary | ValueType::Ubinary => dimensions.div_ceil(8),
            _ => dimensions,
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            ValueType::F32 => 4,
            _ => 1,
        }
    }
}

/// Where an entry's vector came from, recorded as tags in its header.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub model: &'a str,
    /// The upstream's base URL.
    pub upstream: &'a str,
    /// The tenant, for entries kept apart for one tenant.
    pub tenant: Option<&'a str>,
}

/// Everything a header holds but the checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub value_type: ValueType,
    pub tokens: u32,
    pub model_tag: u32,
    pub written_at: u32,
    pub upstream_tag: u32,
    pub tenant_tag: u32,
}

/// A decoded, verified entry. Cheap to clone: it shares the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    bytes: Bytes,
    value_type: ValueType,
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
    /// Encodes a float vector for `key`, written now. `values` must be
    /// finite (checked upstream).
    pub fn encode(key: &KeyHash, origin: &Origin, values: &[f32], tokens: u32) -> Entry {
        let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::encode_raw(key, origin, ValueType::F32, &payload, tokens)
    }

    /// Encodes values of `value_type` given as their stored bytes.
    pub fn encode_raw(
        key: &KeyHash,
        origin: &Origin,
        value_type: ValueType,
        payload: &[u8],
        tokens: u32,
    ) -> Entry {
        let header = Header {
            value_type,
            tokens,
            model_tag: tag(origin.model),
            written_at: unix_now(),
            upstream_tag: tag(origin.upstream),
            tenant_tag: origin.tenant.map_or(0, tag),
        };
        Self::from_parts(key, &header, payload)
    }

    /// Assembles an entry from its header and payload.
    pub fn from_parts(key: &KeyHash, header: &Header, payload: &[u8]) -> Entry {
        let values = payload.len() / header.value_type.size();
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(MAGIC);
        buf.push(FORMAT_VERSION);
        buf.push(header.value_type as u8);
        buf.extend_from_slice(&u32::try_from(values).unwrap_or(u32::MAX).to_le_bytes());
        for field in [
            header.tokens,
            header.model_tag,
            header.written_at,
            header.upstream_tag,
            header.tenant_tag,
            0,
        ] {
            buf.extend_from_slice(&field.to_le_bytes());
        }
        buf.extend_from_slice(&[0; 8]);
        buf.extend_from_slice(payload);
        let sum = checksum(key, &buf[..CHECKED], &buf[HEADER_LEN..]);
        buf[CHECKED..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
        Entry {
            bytes: buf.into(),
            value_type: header.value_type,
        }
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
        let value_type = ValueType::from_byte(bytes[3]).ok_or(DecodeError::Foreign)?;
        let dims = read_u32(&bytes[4..8]);
        if dims == 0 || (bytes.len() - HEADER_LEN) != dims as usize * value_type.size() {
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
        Ok(Entry { bytes, value_type })
    }

    pub fn dimensions(&self) -> u32 {
        read_u32(&self.bytes[4..8])
    }

    pub fn tokens(&self) -> u32 {
        read_u32(&self.bytes[8..12])
    }

    pub fn value_type(&self) -> ValueType {
        self.value_type
    }

    /// The header's fields.
    pub fn header(&self) -> Header {
        header_fields(&self.bytes, self.value_type)
    }

    /// Unix seconds when the vendor's answer was stored.
    pub fn written_at(&self) -> u32 {
        read_u32(&self.bytes[16..20])
    }

    /// The values as stored (little-endian f32 for float vectors).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole stored value.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// The header fields at the start of a current-format entry, without
/// verifying its checksum (what `stats` and `purge` read from a scan).
pub fn read_header(head: &[u8]) -> Option<Header> {
    if head.len() < CHECKED || !is_current_format(head) {
        return None;
    }
    Some(header_fields(head, ValueType::from_byte(head[3])?))
}

/// `head` must hold at least the checked part of a header.
fn header_fields(head: &[u8], value_type: ValueType) -> Header {
    Header {
        value_type,
        tokens: read_u32(&head[8..12]),
        model_tag: read_u32(&head[12..16]),
        written_at: read_u32(&head[16..20]),
        upstream_tag: read_u32(&head[20..24]),
        tenant_tag: read_u32(&head[24..28]),
    }
}

/// Whether `bytes` start like an entry of the current format (without
/// verifying it).
pub fn is_current_format(bytes: &[u8]) -> bool {
    bytes.len() >= 3 && &bytes[..2] == MAGIC && bytes[2] == FORMAT_VERSION
}

/// The tag identifying `name` (a model, an upstream, a tenant) in entry
/// headers; never 0, which stands for unknown.
pub fn tag(name: &str) -> u32 {
    let hash = blake3::hash(name.as_bytes());
    let b = hash.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]).max(1)
}

/// Now, in unix seconds, as headers hold it.
pub fn unix_now() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

fn read_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// XXH3-64 (seed 0) of the key, the header before the checksum and the
/// payload, as one message: stored entries (of every format) depend on
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
    const ORIGIN: Origin = Origin {
        model: "m",
        upstream: "https://vendor/v1",
        tenant: None,
    };

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
        let e = Entry::encode(&KEY, &ORIGIN, &values, 42);
        assert_eq!(e.as_bytes().len(), HEADER_LEN + 4 * values.len());
        let d = Entry::decode(&KEY, e.as_bytes().clone(), Some(3)).expect("decodes");
        assert_eq!(d.dimensions(), 3);
        assert_eq!(d.tokens(), 42);
        let header = d.header();
        assert_eq!(header.model_tag, tag("m"));
        assert_eq!(header.upstream_tag, tag("https://vendor/v1"));
        assert_eq!(header.tenant_tag, 0);
        assert_eq!(header.value_type, ValueType::F32);
        assert_eq!(read_header(d.as_bytes()), Some(header));
        assert!(d.written_at() > 1_700_000_000);
        let back: Vec<f32> = d
            .payload()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, values);
    }

    #[test]
    fn other_value_types_are_kept_as_sent() {
        let tenant = Origin {
            tenant: Some("search"),
            ..ORIGIN
        };
        let e = Entry::encode_raw(&KEY, &tenant, ValueType::Int8, &[1, 255, 7], 5);
        let d = Entry::decode(&KEY, e.as_bytes().clone(), Some(3)).expect("decodes");
        assert_eq!(d.value_type(), ValueType::Int8);
        assert_eq!(d.payload(), &[1, 255, 7]);
        assert_eq!(d.header().tenant_tag, tag("search"));
        let mut retyped = e.as_bytes().to_vec();
        retyped[3] = ValueType::F32 as u8;
        assert_eq!(
            Entry::decode(&KEY, retyped.into(), None),
            Err(DecodeError::Length)
        );
        let mut unknown = e.as_bytes().to_vec();
        unknown[3] = 9;
        assert_eq!(
            Entry::decode(&KEY, unknown.into(), None),
            Err(DecodeError::Foreign)
        );
    }

    #[test]
    fn detects_corruption_foreign_values_and_wrong_keys() {
        let e = Entry::encode(&KEY, &ORIGIN, &[1.0, 2.0], 1);
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
            Entry::decode(&KEY, Bytes::from(vec![b'x'; 48]), None),
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

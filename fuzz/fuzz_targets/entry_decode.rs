//! Stored values: anything Redis could hand back decodes to an error or a
//! checked entry, and a valid entry changed in any way is refused.

#![no_main]

use bytes::Bytes;
use embgate::cache::entry::{Entry, Origin};
use embgate::cache::key::KeyHash;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const ORIGIN: Origin = Origin {
    model: "m",
    upstream: "https://vendor/v1",
    tenant: None,
};

#[derive(Debug, Arbitrary)]
enum Case {
    /// Any bytes under any key.
    Raw {
        key: [u8; 32],
        bytes: Vec<u8>,
        wanted: Option<u32>,
    },
    /// A valid entry of these f32 bit patterns, then one byte changed
    /// (`xor` at `at`) or the value cut at `at`.
    Damaged {
        key: [u8; 32],
        other: [u8; 32],
        values: Vec<u32>,
        tokens: u32,
        at: usize,
        xor: u8,
        cut: bool,
    },
}

fuzz_target!(|case: Case| match case {
    Case::Raw { key, bytes, wanted } => {
        if let Ok(entry) = Entry::decode(&KeyHash(key), Bytes::from(bytes), wanted) {
            assert_eq!(entry.payload().len(), entry.dimensions() as usize * entry.value_type().size());
        }
    }
    Case::Damaged {
        key,
        other,
        values,
        tokens,
        at,
        xor,
        cut,
    } => {
        // Stored vectors are never empty and hold finite values only.
        let values: Vec<f32> = values
            .into_iter()
            .map(f32::from_bits)
            .filter(|v| v.is_finite())
            .collect();
        if values.is_empty() {
            return;
        }
        let key = KeyHash(key);
        let stored = Entry::encode(&key, &ORIGIN, &values, tokens).as_bytes().clone();
        let entry = Entry::decode(&key, stored.clone(), Some(values.len() as u32))
            .expect("a fresh entry decodes");
        let bits = |vs: &[f32]| vs.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let back: Vec<f32> = entry
            .payload()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(bits(&back), bits(&values));
        assert_eq!(entry.tokens(), tokens);
        if other != key.0 {
            assert!(Entry::decode(&KeyHash(other), stored.clone(), None).is_err());
        }
        let at = at % stored.len();
        if cut {
            assert!(Entry::decode(&key, stored.slice(..at), None).is_err());
        } else if xor != 0 {
            let mut changed = stored.to_vec();
            changed[at] ^= xor;
            assert!(Entry::decode(&key, changed.into(), None).is_err());
        }
    }
});

//! Cache keys: one per input, a blake3 hash over everything that changes the
//! vector. The encoding is versioned and length-prefixed, so two different
//! requests can never encode to the same bytes.

use std::sync::LazyLock;

use crate::protocol::{EmbeddingRequest, Input};

/// Bumped whenever the encoding below changes; old keys then simply miss.
const KEY_CONTEXT: &str = "embgate cache key v1";

/// The hasher keyed by [`KEY_CONTEXT`]: deriving it costs two compressions,
/// copying it costs none.
static KEYED: LazyLock<blake3::Hasher> =
    LazyLock::new(|| blake3::Hasher::new_derive_key(KEY_CONTEXT));

/// The 32-byte content hash of one (upstream, model, parameters, input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

/// How in-memory maps hash a [`KeyHash`]. It is already a blake3 digest,
/// so the std default (SipHash) would spend time mixing it again; foldhash
/// is several times cheaper, and its per-process seed keeps inputs crafted
/// to collide from piling into one bucket.
pub type KeyHashState = foldhash::fast::RandomState;

/// A map keyed by [`KeyHash`].
pub type KeyHashMap<V> = std::collections::HashMap<KeyHash, V, KeyHashState>;

/// The parts of a request shared by all its inputs.
pub struct KeyScope<'a> {
    /// Identifies the upstream (its base URL): vendors differ for one model name.
    pub namespace: &'a str,
    pub model: &'a str,
    pub dimensions: Option<u32>,
    pub extra: &'a [(String, Box<serde_json::value::RawValue>)],
}

impl<'a> KeyScope<'a> {
    pub fn of(namespace: &'a str, request: &'a EmbeddingRequest) -> Self {
        KeyScope {
            namespace,
            model: &request.model,
            dimensions: request.dimensions,
            extra: &request.extra,
        }
    }

    /// A hasher with the shared parts already absorbed; cloned per input.
    pub fn hasher(&self) -> ScopedHasher {
        let mut h = KEYED.clone();
        field(&mut h, self.namespace.as_bytes());
        field(&mut h, self.model.as_bytes());
        match self.dimensions {
            None => h.update(&[0]),
            Some(d) => h.update(&[1]).update(&d.to_le_bytes()),
        };
        h.update(&(self.extra.len() as u64).to_le_bytes());
        for (name, value) in self.extra {
            field(&mut h, name.as_bytes());
            field(&mut h, value.get().as_bytes());
        }
        ScopedHasher(h)
    }
}

pub struct ScopedHasher(blake3::Hasher);

impl ScopedHasher {
    pub fn key(&self, input: &Input) -> KeyHash {
        let mut h = self.0.clone();
        match input {
            Input::Text(text) => {
                h.update(&[0]);
                field(&mut h, text.as_bytes());
            }
            Input::Tokens(tokens) => {
                h.update(&[1]);
                h.update(&(tokens.len() as u64).to_le_bytes());
                for t in tokens {
                    h.update(&t.to_le_bytes());
                }
            }
        }
        KeyHash(*h.finalize().as_bytes())
    }
}

fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

impl KeyHash {
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }

    /// The hash written as 64 hex digits, as [`KeyHash::to_hex`] writes it.
    pub fn from_hex(hex: &str) -> Option<KeyHash> {
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| KeyHash(*h.as_bytes()))
    }
}

/// Every name the gateway gives to what it stores, under one prefix:
///
/// ```text
/// <prefix>:v1:<64 hex>     an entry (see `entry.rs`)
/// <prefix>:lease:<64 hex>  the short lease of a gateway fetching that entry
/// <prefix>:ledger          the all-time savings ledger (a hash)
/// <prefix>:meta            the keyspace version and migration cursors (a hash)
/// ```
///
/// Redis uses these names as keys; other stores keep their own tables but
/// use the prefix to keep several keyspaces apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    prefix: String,
}

impl KeyLayout {
    pub fn new(prefix: &str) -> KeyLayout {
        KeyLayout {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of the entry for `hash`.
    pub fn entry(&self, hash: &KeyHash) -> String {
        let hex = blake3::Hash::from(hash.0).to_hex();
        let mut key = String::with_capacity(self.prefix.len() + 4 + hex.len());
        key.push_str(&self.prefix);
        key.push_str(":v1:");
        key.push_str(hex.as_str());
        key
    }

    /// The SCAN pattern matching every entry key.
    pub fn entry_pattern(&self) -> String {
        format!("{}:v1:*", self.prefix)
    }

    /// The hash of an entry key; `None` for any other key.
    pub fn parse_entry(&self, key: &str) -> Option<KeyHash> {
        let hex = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":v1:")?;
        KeyHash::from_hex(hex)
    }

    /// The key of the short lease a gateway holds while fetching `hash`.
    pub fn lease(&self, hash: &KeyHash) -> String {
        format!("{}:lease:{}", self.prefix, hash.to_hex())
    }

    pub fn ledger(&self) -> String {
        format!("{}:ledger", self.prefix)
    }

    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope<'a>(model: &'a str, dims: Option<u32>) -> KeyScope<'a> {
        KeyScope {
            namespace: "https://api.openai.com/v1",
            model,
            dimensions: dims,
            extra: &[],
        }
    }

    #[test]
    fn everything_that_changes_the_vector_changes_the_key() {
        let text = Input::Text("hello".into());
        let base = scope("m", None).hasher().key(&text);
        assert_eq!(base, scope("m", None).hasher().key(&text));
        assert_ne!(base, scope("m2", None).hasher().key(&text));
        assert_ne!(base, scope("m", Some(256)).hasher().key(&text));
        assert_ne!(
            base,
            scope("m", None).hasher().key(&Input::Text("hello ".into()))
        );
        let other_ns = KeyScope {
            namespace: "http://other/v1",
            ..scope("m", None)
        };
        assert_ne!(base, other_ns.hasher().key(&text));
        // A text and a token array with the same bytes are different inputs.
        let bytes = u32::from_le_bytes(*b"hell");
        assert_ne!(
            scope("m", None).hasher().key(&Input::Text("hell".into())),
            scope("m", None).hasher().key(&Input::Tokens(vec![bytes]))
        );
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        let a = scope("ab", None).hasher().key(&Input::Text("c".into()));
        let b = scope("a", None).hasher().key(&Input::Text("bc".into()));
        assert_ne!(a, b);
    }

    /// Keys already in Redis stay reachable only while this holds: a change
    /// here means a new `KEY_CONTEXT` (and every stored entry misses).
    #[test]
    fn derivation_is_stable() {
        let key = scope("text-embedding-3-small", Some(256))
            .hasher()
            .key(&Input::Text("hello".into()));
        assert_eq!(
            KeyLayout::new("p").entry(&key),
            "p:v1:27b9de639408f183c42bf7bd825a1ce1b9ff71ad20c914a735a9a21133b4b9e7"
        );
    }

    #[test]
    fn layout_names_round_trip() {
        let layout = KeyLayout::new("pfx");
        let hash = KeyHash([0xab; 32]);
        let k = layout.entry(&hash);
        assert!(k.starts_with("pfx:v1:abab"));
        assert_eq!(k.len(), "pfx:v1:".len() + 64);
        assert_eq!(layout.parse_entry(&k), Some(hash));
        assert_eq!(KeyLayout::new("pf").parse_entry(&k), None);
        assert_eq!(layout.parse_entry("pfx:v1:zz"), None);
        assert_eq!(layout.parse_entry(&layout.lease(&hash)), None);
    }
}

//! The deterministic vendor function: model table, tokenizer and vectors.
//!
//! Everything here is pure so that tests can compute the exact vector and
//! token count the server will return without talking to it.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::InputItem;

/// Size of the cl100k_base vocabulary (ordinary ranks plus special tokens).
pub(crate) const CL100K_VOCAB: u32 = 100_277;
/// Per-input context length of every embedding model served.
pub(crate) const MAX_INPUT_TOKENS: u64 = 8192;
/// Per-request token budget across all inputs.
pub(crate) const MAX_REQUEST_TOKENS: u64 = 300_000;
/// Maximum number of inputs in one request.
pub(crate) const MAX_INPUTS: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tokenizer {
    /// OpenAI's cl100k_base, used by every OpenAI embedding model.
    Cl100k,
    /// A stand-in for a vendor whose tokenizer nobody can reproduce locally:
    /// billed tokens are words + 1.
    Words,
}

#[derive(Debug)]
pub(crate) struct EmbeddingModel {
    pub id: &'static str,
    pub native_dims: u32,
    /// Whether the `dimensions` request parameter is accepted.
    pub shortening: bool,
    pub tokenizer: Tokenizer,
    pub created: u64,
    pub owned_by: &'static str,
}

pub(crate) const EMBEDDING_MODELS: &[EmbeddingModel] = &[
    EmbeddingModel {
        id: "text-embedding-3-small",
        native_dims: 1536,
        shortening: true,
        tokenizer: Tokenizer::Cl100k,
        created: 1_705_948_997,
        owned_by: "openai",
    },
    EmbeddingModel {
        id: "text-embedding-3-large",
        native_dims: 3072,
        shortening: true,
        tokenizer: Tokenizer::Cl100k,
        created: 1_705_953_180,
        owned_by: "openai",
    },
    EmbeddingModel {
        id: "text-embedding-ada-002",
        native_dims: 1536,
        shortening: false,
        tokenizer: Tokenizer::Cl100k,
        created: 1_671_217_299,
        owned_by: "openai",
    },
    EmbeddingModel {
        id: "acme-embed-v1",
        native_dims: 256,
        shortening: false,
        tokenizer: Tokenizer::Words,
        created: 1_700_000_000,
        owned_by: "acme",
    },
];

pub(crate) fn embedding_model(id: &str) -> Option<&'static EmbeddingModel> {
    EMBEDDING_MODELS.iter().find(|m| m.id == id)
}

/// Why an input cannot be tokenized for a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenError {
    /// A token id outside the model's vocabulary.
    InvalidTokenId(u32),
    /// The tokenizer itself failed (it panics on some pathological input).
    Tokenizer,
}

/// What the vector is derived from: token ids when the tokenizer is known,
/// raw text bytes otherwise.
pub(crate) enum Material<'a> {
    Tokens(Cow<'a, [u32]>),
    Text(&'a str),
}

/// An input prepared for embedding: its billed token count and the material
/// its vector is derived from.
pub(crate) struct Prepared<'a> {
    pub tokens: u64,
    pub material: Material<'a>,
}

pub(crate) fn prepare<'a>(
    model: &EmbeddingModel,
    input: &'a InputItem,
) -> Result<Prepared<'a>, TokenError> {
    match (model.tokenizer, input) {
        (Tokenizer::Cl100k, InputItem::Text(text)) => {
            let bpe = tiktoken_rs::cl100k_base_singleton();
            let ids = catch_unwind(AssertUnwindSafe(|| bpe.encode_ordinary(text)))
                .map_err(|_| TokenError::Tokenizer)?;
            Ok(Prepared {
                tokens: ids.len() as u64,
                material: Material::Tokens(Cow::Owned(ids)),
            })
        }
        (Tokenizer::Cl100k, InputItem::Tokens(ids)) => {
            if let Some(&bad) = ids.iter().find(|&&id| id >= CL100K_VOCAB) {
                return Err(TokenError::InvalidTokenId(bad));
            }
            Ok(Prepared {
                tokens: ids.len() as u64,
                material: Material::Tokens(Cow::Borrowed(ids)),
            })
        }
        (Tokenizer::Words, InputItem::Text(text)) => Ok(Prepared {
            tokens: text.split_whitespace().count() as u64 + 1,
            material: Material::Text(text),
        }),
        (Tokenizer::Words, InputItem::Tokens(ids)) => Ok(Prepared {
            tokens: ids.len() as u64,
            material: Material::Tokens(Cow::Borrowed(ids)),
        }),
    }
}

/// cl100k_base token count of free text (chat usage); falls back to a word
/// count if the tokenizer fails on pathological input.
pub(crate) fn count_cl100k(text: &str) -> u64 {
    let bpe = tiktoken_rs::cl100k_base_singleton();
    catch_unwind(AssertUnwindSafe(|| bpe.encode_ordinary(text).len() as u64))
        .unwrap_or_else(|_| text.split_whitespace().count() as u64)
}

/// Unit-length vector of `dims` values for `material`.
///
/// The blake3 XOF stream is keyed by a context string and fed length-prefixed
/// fields, so distinct (model, material) pairs never share a stream. A
/// shortened vector is the prefix of the native one, renormalised, which is
/// what OpenAI's `dimensions` parameter does; normalising only the prefix of
/// the raw values gives the same result without computing the rest.
pub(crate) fn vector(model: &EmbeddingModel, material: &Material<'_>, dims: u32) -> Vec<f32> {
    let mut hasher = blake3::Hasher::new_derive_key("embgate fake-vendor 2024 embedding vector v1");
    hasher.update(&(model.id.len() as u64).to_le_bytes());
    hasher.update(model.id.as_bytes());
    match material {
        Material::Tokens(ids) => {
            hasher.update(&[0]);
            hasher.update(&(ids.len() as u64).to_le_bytes());
            let mut bytes = Vec::with_capacity(ids.len() * 4);
            for id in ids.iter() {
                bytes.extend_from_slice(&id.to_le_bytes());
            }
            hasher.update(&bytes);
        }
        Material::Text(text) => {
            hasher.update(&[1]);
            hasher.update(&(text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
        }
    }
    let dims = dims.min(model.native_dims) as usize;
    let mut bytes = vec![0u8; dims * 4];
    hasher.finalize_xof().fill(&mut bytes);
    let raw: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|c| {
            let word = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            f64::from(word) / 2_147_483_648.0 - 1.0
        })
        .collect();
    normalise(&raw)
}

fn normalise(raw: &[f64]) -> Vec<f32> {
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        // Unreachable in practice (every value would have to be exactly 0),
        // but a unit vector is still the contract.
        let mut v = vec![0.0; raw.len()];
        if let Some(first) = v.first_mut() {
            *first = 1.0;
        }
        return v;
    }
    raw.iter().map(|x| (x / norm) as f32).collect()
}

/// Checks a `dimensions` request value against a model.
pub(crate) fn dims_allowed(model: &EmbeddingModel, dimensions: Option<u32>) -> bool {
    match dimensions {
        None => true,
        Some(d) => model.shortening && (1..=model.native_dims).contains(&d),
    }
}

/// The vector the vendor returns for `input`, or `None` when a request for it
/// would be rejected (unknown model, unsupported or out-of-range `dimensions`,
/// empty input, invalid token id, over the context length).
pub fn embedding(model: &str, dimensions: Option<u32>, input: &InputItem) -> Option<Vec<f32>> {
    let model = embedding_model(model)?;
    if !dims_allowed(model, dimensions) || input.is_empty() {
        return None;
    }
    let prepared = prepare(model, input).ok()?;
    if prepared.tokens > MAX_INPUT_TOKENS {
        return None;
    }
    Some(vector(
        model,
        &prepared.material,
        dimensions.unwrap_or(model.native_dims),
    ))
}

/// Tokens billed for one input, or `None` for an unknown model or an input
/// the model's tokenizer rejects.
pub fn tokens(model: &str, input: &InputItem) -> Option<u32> {
    let model = embedding_model(model)?;
    let prepared = prepare(model, input).ok()?;
    u32::try_from(prepared.tokens).ok()
}

/// Native vector length of an embedding model.
pub fn default_dimensions(model: &str) -> Option<u32> {
    embedding_model(model).map(|m| m.native_dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> InputItem {
        InputItem::Text(s.to_owned())
    }

    fn norm(v: &[f32]) -> f64 {
        v.iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn unit_length_and_native_size() {
        for m in EMBEDDING_MODELS {
            let v = embedding(m.id, None, &text("hello world")).expect("known model");
            assert_eq!(v.len(), m.native_dims as usize);
            assert!((norm(&v) - 1.0).abs() < 1e-5, "{}", m.id);
        }
    }

    #[test]
    fn deterministic_and_distinct() {
        let a = embedding("text-embedding-3-small", None, &text("a"));
        assert_eq!(a, embedding("text-embedding-3-small", None, &text("a")));
        assert_ne!(a, embedding("text-embedding-3-small", None, &text("b")));
        let large = embedding("text-embedding-3-large", None, &text("a")).expect("known model");
        let small = a.expect("known model");
        assert_ne!(&large[..1536], &small[..]);
    }

    #[test]
    fn text_and_its_tokens_agree() {
        let s = "The quick brown fox jumps over the lazy dog.";
        let ids = tiktoken_rs::cl100k_base_singleton().encode_ordinary(s);
        let as_tokens = InputItem::Tokens(ids.clone());
        for m in ["text-embedding-3-small", "text-embedding-ada-002"] {
            assert_eq!(embedding(m, None, &text(s)), embedding(m, None, &as_tokens));
            assert_eq!(tokens(m, &text(s)), Some(ids.len() as u32));
        }
    }

    #[test]
    fn special_token_text_is_ordinary() {
        let n = tokens("text-embedding-3-small", &text("<|endoftext|>")).expect("known model");
        assert!(n > 1);
    }

    #[test]
    fn shortening_is_renormalised_prefix() {
        let input = text("shorten me");
        let full = embedding("text-embedding-3-large", None, &input).expect("known model");
        let short = embedding("text-embedding-3-large", Some(256), &input).expect("valid dims");
        assert_eq!(short.len(), 256);
        assert!((norm(&short) - 1.0).abs() < 1e-5);
        let scale = norm(&full[..256]);
        for (a, b) in short.iter().zip(&full[..256]) {
            assert!((f64::from(*a) - f64::from(*b) / scale).abs() < 1e-6);
        }
        assert_eq!(
            embedding("text-embedding-3-large", Some(3072), &input),
            Some(full)
        );
    }

    #[test]
    fn rejected_requests_have_no_vector() {
        let input = text("x");
        assert!(embedding("text-embedding-ada-002", Some(512), &input).is_none());
        assert!(embedding("text-embedding-3-small", Some(0), &input).is_none());
        assert!(embedding("text-embedding-3-small", Some(1537), &input).is_none());
        assert!(embedding("nope", None, &input).is_none());
        assert!(embedding("text-embedding-3-small", None, &text("")).is_none());
        let bad = InputItem::Tokens(vec![CL100K_VOCAB]);
        assert!(embedding("text-embedding-3-small", None, &bad).is_none());
        assert_eq!(tokens("text-embedding-3-small", &bad), None);
    }

    #[test]
    fn acme_counts_words() {
        assert_eq!(tokens("acme-embed-v1", &text("one two  three")), Some(4));
        assert_eq!(
            tokens("acme-embed-v1", &InputItem::Tokens(vec![1, 2])),
            Some(2)
        );
        assert_eq!(default_dimensions("acme-embed-v1"), Some(256));
        assert_eq!(default_dimensions("nope"), None);
    }
}

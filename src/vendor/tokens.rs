//! Billed tokens per input, stored with each entry so hits can report usage
//! and savings.
//!
//! - OpenAI embedding models (`text-embedding-*`): exact, with cl100k_base
//!   (texts) or the array length (token arrays).
//! - Other models: the vendor's reported usage for the call is shared among
//!   its inputs in proportion to their size (UTF-8 bytes, or 4 per token id),
//!   with largest-remainder rounding so the parts add up to the billed total.
//!
//! Exact counts are taken once, before the vendor is paid: nothing that can
//! fail runs between paying and storing what was paid for.

use std::sync::Arc;

use crate::protocol::{EmbeddingRequest, Input};

/// Whether `model` is tokenised with cl100k_base, so counts are exact.
pub fn is_cl100k_model(model: &str) -> bool {
    model.starts_with("text-embedding-")
}

/// Exact count for an OpenAI model, `None` for others.
pub fn exact_count(model: &str, input: &Input) -> Option<u32> {
    match input {
        Input::Tokens(t) => Some(saturate(t.len())),
        Input::Text(text) if is_cl100k_model(model) => Some(saturate(
            tiktoken_rs::cl100k_base_singleton()
                .encode_ordinary(text)
                .len(),
        )),
        Input::Text(_) => None,
    }
}

/// Exact counts of the inputs at `indices` of `request`, tokenised on the
/// blocking pool (a large batch takes milliseconds of CPU). `None` for a
/// model without exact counts, or if tokenising failed: the vendor's
/// reported usage is shared out then ([`apportion`]).
pub async fn exact_counts(request: Arc<EmbeddingRequest>, indices: Vec<usize>) -> Option<Vec<u32>> {
    if !is_cl100k_model(&request.model) {
        return None;
    }
    let count = move || {
        indices
            .iter()
            .map(|i| exact_count(&request.model, request.inputs.get(*i)?))
            .collect::<Option<Vec<u32>>>()
    };
    match tokio::task::spawn_blocking(count).await {
        Ok(counts) => counts,
        Err(e) => {
            tracing::error!(error = %e, "token counting failed; sharing out the vendor's usage");
            None
        }
    }
}

/// Splits `total` in proportion to `weights`; the parts sum to `total`.
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u32> {
    let sum: u128 = weights.iter().map(|w| *w as u128).sum();
    if weights.is_empty() {
        return Vec::new();
    }
    if sum == 0 {
        let each = total / weights.len() as u64;
        let mut parts = vec![each; weights.len()];
        let rest = total - each * weights.len() as u64;
        for p in parts.iter_mut().take(rest as usize) {
            *p += 1;
        }
        return parts.into_iter().map(|p| saturate(p as usize)).collect();
    }
    let mut parts = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    let mut given: u128 = 0;
    for (i, w) in weights.iter().enumerate() {
        let exact = total as u128 * *w as u128;
        parts.push(exact / sum);
        remainders.push((exact % sum, i));
        given += exact / sum;
    }
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in remainders.iter().take((total as u128 - given) as usize) {
        parts[*i] += 1;
    }
    parts.into_iter().map(|p| saturate(p as usize)).collect()
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_for_openai_models() {
        let hello = Input::Text("hello world".into());
        assert_eq!(exact_count("text-embedding-3-small", &hello), Some(2));
        assert_eq!(exact_count("acme", &hello), None);
        assert_eq!(exact_count("acme", &Input::Tokens(vec![1, 2, 3])), Some(3));
    }

    #[test]
    fn apportion_adds_up() {
        assert_eq!(apportion(10, &[1, 1, 2]), vec![3, 2, 5]);
        assert_eq!(apportion(7, &[0, 0]), vec![4, 3]);
        assert_eq!(apportion(0, &[5]), vec![0]);
        let parts = apportion(1001, &[3, 7, 11, 13]);
        assert_eq!(parts.iter().map(|p| *p as u64).sum::<u64>(), 1001);
    }
}

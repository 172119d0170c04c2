//! Micro-benchmarks of the per-request work on the cache-hit path: parsing
//! the body, deriving one key per input, verifying the stored entries and
//! writing the response; and parsing a body of many unknown fields, whose
//! time per field should stay flat as their count grows. `bench/run.sh` runs them next to the end-to-end
//! load benchmark; alone: `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use embgate::cache::entry::{Entry, Origin};
use embgate::cache::key::{KeyHash, KeyLayout, KeyScope};
use embgate::protocol::{self, EncodingFormat, Input, Limits};

const MODEL: &str = "text-embedding-3-small";
const NAMESPACE: &str = "http://127.0.0.1:9/v1";
const DIMS: usize = 1536;
const LIMITS: Limits = Limits {
    max_inputs: 2048,
    max_input_bytes: 1 << 20,
    max_extra_fields: 16,
    max_model_bytes: 256,
};

/// The same shape of text the load benchmark sends (about 20 tokens).
fn text(i: usize) -> String {
    format!("benchmark sentence number {i}: the quick brown fox jumps over the lazy dog")
}

fn body(inputs: usize) -> Vec<u8> {
    let inputs: Vec<String> = (0..inputs).map(text).collect();
    serde_json::to_vec(&serde_json::json!({
        "model": MODEL,
        "input": inputs,
        "encoding_format": "base64",
    }))
    .expect("serialisable")
}

fn scope() -> KeyScope<'static> {
    KeyScope {
        namespace: NAMESPACE,
        model: MODEL,
        dimensions: None,
        extra: &[],
    }
}

/// A unit-length-ish vector with varied mantissas, like a real embedding.
fn vector(seed: usize) -> Vec<f32> {
    (0..DIMS)
        .map(|i| {
            let x = ((seed * 7919 + i * 104_729) % 20_011) as f32 / 20_011.0 - 0.5;
            x * 0.05
        })
        .collect()
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_request");
    for n in [1usize, 64, 2048] {
        let body = body(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &body, |b, body| {
            b.iter(|| protocol::parse_request(black_box(body), LIMITS).expect("valid"))
        });
    }
    group.finish();
}

/// Bodies of `n` distinct unknown fields in no particular order (the limit
/// raised to let them in): the time per field should stay about the same
/// from 10 to 1000 fields.
fn parse_extra_fields(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_extra_fields");
    for n in [10usize, 100, 1000] {
        let mut body = format!(r#"{{"model":"{MODEL}","input":"{}""#, text(0));
        for i in 0..n as u32 {
            let name = i.wrapping_mul(0x9E37_79B9);
            body.push_str(&format!(r#","vendor_param_{name:08x}":"query""#));
        }
        body.push('}');
        let body = body.into_bytes();
        let limits = Limits {
            max_extra_fields: n,
            ..LIMITS
        };
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &body, |b, body| {
            b.iter(|| protocol::parse_request(black_box(body), limits).expect("valid"))
        });
    }
    group.finish();
}

fn keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    let inputs: Vec<Input> = (0..64).map(|i| Input::Text(text(i))).collect();
    group.throughput(Throughput::Elements(inputs.len() as u64));
    group.bench_function("hash_and_redis_key/64", |b| {
        b.iter(|| {
            let hasher = scope().hasher();
            let layout = KeyLayout::new("embgate");
            inputs
                .iter()
                .map(|input| layout.entry(&hasher.key(black_box(input))))
                .collect::<Vec<String>>()
        })
    });
    group.bench_function("hash/64", |b| {
        b.iter(|| {
            let hasher = scope().hasher();
            inputs
                .iter()
                .map(|input| hasher.key(black_box(input)))
                .collect::<Vec<KeyHash>>()
        })
    });
    group.finish();
}

fn decode(c: &mut Criterion) {
    let key = scope().hasher().key(&Input::Text(text(0)));
    let origin = Origin {
        model: "text-embedding-3-small",
        upstream: "https://api.openai.com/v1",
        tenant: None,
    };
    let stored: Bytes = Entry::encode(&key, &origin, &vector(0), 20)
        .as_bytes()
        .clone();
    let mut group = c.benchmark_group("entry_decode");
    group.throughput(Throughput::Bytes(stored.len() as u64));
    group.bench_function("1x1536", |b| {
        b.iter(|| Entry::decode(black_box(&key), stored.clone(), Some(DIMS as u32)).expect("valid"))
    });
    group.finish();
}

fn write(c: &mut Criterion) {
    let vectors: Vec<Vec<u8>> = (0..64)
        .map(|s| vector(s).iter().flat_map(|f| f.to_le_bytes()).collect())
        .collect();
    let mut group = c.benchmark_group("write_response");
    group.throughput(Throughput::Elements(vectors.len() as u64));
    for (name, format) in [
        ("float", EncodingFormat::Float),
        ("base64", EncodingFormat::Base64),
    ] {
        let mut out = Vec::with_capacity(64 * DIMS * 12);
        group.bench_function(BenchmarkId::new(name, "64x1536"), |b| {
            b.iter(|| {
                out.clear();
                protocol::write_response(
                    &mut out,
                    MODEL,
                    vectors.iter().map(|v| v.as_slice()),
                    black_box(format),
                    1280,
                );
                out.len()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = hot_path;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = parse, parse_extra_fields, keys, decode, write
}
criterion_main!(hot_path);

//! Request shapes: the texts each scenario sends, their pre-serialised
//! bodies, and the Redis keys the gateway will look them up under.

use bytes::Bytes;
use embgate::cache::key::{KeyLayout, KeyScope};
use embgate::protocol::Input;

pub const MODEL: &str = "text-embedding-3-small";
pub const DIMS: usize = 1536;
/// Bytes of one stored entry: header + f32 payload.
pub const ENTRY_BYTES: usize = embgate::cache::entry::HEADER_LEN + DIMS * 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Float,
    Base64,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Float => "float",
            Format::Base64 => "base64",
        }
    }
}

/// A short sentence of about 20 tokens, distinct per (set, i).
pub fn text(set: &str, i: usize) -> String {
    format!("benchmark sentence {set} {i}: the quick brown fox jumps over the lazy dog")
}

/// A request body as an OpenAI SDK would send it (a lone input as a string).
pub fn body(inputs: &[String], format: Format) -> Bytes {
    let input = match inputs {
        [one] => serde_json::Value::String(one.clone()),
        many => serde_json::Value::from(many.to_vec()),
    };
    let body = serde_json::json!({
        "model": MODEL,
        "input": input,
        "encoding_format": format.name(),
    });
    Bytes::from(serde_json::to_vec(&body).expect("a JSON value serialises"))
}

/// Computes Redis keys exactly as the gateway does, with the embgate library.
pub struct Keys {
    /// The gateway's upstream base URL, as it normalises it.
    pub namespace: String,
    pub prefix: String,
}

impl Keys {
    pub fn redis_key(&self, text: &str) -> String {
        let key = KeyScope {
            namespace: &self.namespace,
            model: MODEL,
            dimensions: None,
            extra: &[],
        }
        .hasher()
        .key(&Input::Text(text.to_owned()));
        KeyLayout::new(&self.prefix).entry(&key)
    }
}

/// A fixed set of requests, cycled through by a scenario.
pub struct Pool {
    pub requests: Vec<Vec<String>>,
}

impl Pool {
    /// `count` requests of `inputs` distinct texts each, from text set `set`.
    pub fn distinct(set: &str, count: usize, inputs: usize) -> Pool {
        Pool {
            requests: (0..count)
                .map(|r| (0..inputs).map(|j| text(set, r * inputs + j)).collect())
                .collect(),
        }
    }

    pub fn bodies(&self, format: Format) -> Vec<Bytes> {
        self.requests.iter().map(|r| body(r, format)).collect()
    }

    /// The MGETs of each request over its distinct keys in first-seen
    /// order, as the gateway issues them.
    pub fn mgets(&self, keys: &Keys) -> Vec<Vec<redis::Cmd>> {
        self.requests
            .iter()
            .map(|texts| {
                let mut seen = std::collections::HashSet::new();
                let distinct: Vec<String> = texts
                    .iter()
                    .filter(|t| seen.insert(t.as_str()))
                    .map(|t| keys.redis_key(t))
                    .collect();
                // Chunked as the gateway's store chunks them.
                distinct
                    .chunks(embgate::cache::store::redis::MGET_CHUNK_KEYS)
                    .map(|chunk| {
                        let mut cmd = redis::cmd("MGET");
                        cmd.arg(chunk);
                        cmd
                    })
                    .collect()
            })
            .collect()
    }

    /// Every distinct text of the pool.
    pub fn texts(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.requests
            .iter()
            .flatten()
            .filter(|t| seen.insert(t.as_str()))
            .cloned()
            .collect()
    }
}

/// SplitMix64: a small, seeded, reproducible generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A skewed workload: ranks 0..keys drawn with probability proportional to
/// 1 / (rank + 1)^exponent.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(keys: usize, exponent: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(keys);
        let mut total = 0.0;
        for rank in 0..keys {
            total += 1.0 / ((rank + 1) as f64).powf(exponent);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf
            .partition_point(|c| *c < u)
            .min(self.cdf.len().saturating_sub(1))
    }

    /// Share of draws expected to fall on the `top` hottest ranks.
    pub fn mass_of_top(&self, top: usize) -> f64 {
        match top {
            0 => 0.0,
            n => self.cdf[n.min(self.cdf.len()) - 1],
        }
    }
}

/// What a Zipf pool looks like, for the report.
#[derive(Clone)]
pub struct ZipfShape {
    pub keys: usize,
    pub exponent: f64,
    pub inputs: usize,
    pub requests: usize,
    /// Distinct keys the pool touches (and the warm-up stores).
    pub touched: usize,
    pub top_1pct_share: f64,
    pub top_100_share: f64,
}

pub fn zipf_pool(
    keys: usize,
    exponent: f64,
    inputs: usize,
    requests: usize,
    seed: u64,
) -> (Pool, ZipfShape) {
    let zipf = Zipf::new(keys, exponent);
    let mut rng = Rng::new(seed);
    let pool = Pool {
        requests: (0..requests)
            .map(|_| {
                (0..inputs)
                    .map(|_| text("zipf", zipf.sample(&mut rng)))
                    .collect()
            })
            .collect(),
    };
    let shape = ZipfShape {
        keys,
        exponent,
        inputs,
        requests,
        touched: pool.texts().len(),
        top_1pct_share: zipf.mass_of_top(keys.div_ceil(100)),
        top_100_share: zipf.mass_of_top(100),
    };
    (pool, shape)
}

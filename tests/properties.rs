//! Properties of the two parsers that read bytes others control: request
//! bodies (`parse_request`) and stored entries (`Entry::decode`).
//!
//! The case counts keep this file to a few seconds in a debug build;
//! `PROPTEST_CASES=100000 cargo test --test properties` searches harder.

use bytes::Bytes;
use embgate::cache::entry::{Entry, Origin};
use embgate::cache::key::KeyHash;
use embgate::protocol::{EmbeddingRequest, EncodingFormat, Input, InvalidRequest, Limits};
use proptest::prelude::*;
use proptest::sample::Index;

const ORIGIN: Origin = Origin {
    model: "m",
    upstream: "https://vendor/v1",
    tenant: None,
};

const LIMITS: Limits = Limits {
    max_inputs: 64,
    max_input_bytes: 256,
    max_extra_fields: 8,
    max_model_bytes: 32,
};

const KNOWN: [&str; 5] = ["model", "input", "encoding_format", "dimensions", "user"];

/// `cases`, or `PROPTEST_CASES` when set (a config given in code would
/// otherwise override proptest's own variable).
fn cases(cases: u32) -> ProptestConfig {
    let wanted = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig::with_cases(wanted)
}

fn parse(body: &[u8]) -> Result<EmbeddingRequest, InvalidRequest> {
    embgate::protocol::parse_request(body, LIMITS)
}

// ---------------------------------------------------------------------------
// JSON documents, written by hand so that objects can repeat a key and
// numbers can be any text (serde_json's own `Value` allows neither).

#[derive(Debug, Clone)]
enum Json {
    /// A literal or a number, written as is.
    Raw(String),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn write(&self, out: &mut String) {
        match self {
            Json::Raw(r) => out.push_str(r),
            Json::Str(s) => out.push_str(&quote(s)),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Object(fields) => write_object(fields, out),
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }
}

fn write_object(fields: &[(String, Json)], out: &mut String) {
    out.push('{');
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&quote(name));
        out.push(':');
        value.write(out);
    }
    out.push('}');
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Any characters: controls, non-ASCII, astral.
fn any_text(len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), len).prop_map(String::from_iter)
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        // Token ids, in and out of range.
        (0u64..100).prop_map(|n| n.to_string()),
        (u64::from(u32::MAX) - 2..=u64::from(u32::MAX) + 2).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        prop::sample::select(vec![
            "-0",
            "0.0",
            "1e400",
            "-1e400",
            "1E-400",
            "123456789012345678901234567890",
            "-99999999999999999999",
            "1.5",
            "2e3",
            "0e0",
        ])
        .prop_map(str::to_owned),
    ]
}

fn leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        prop::sample::select(vec!["null", "true", "false"]).prop_map(|s| Json::Raw(s.into())),
        number().prop_map(Json::Raw),
        any_text(0..12).prop_map(Json::Str),
        prop::sample::select(vec!["float", "base64", "text-embedding-3-small", ""])
            .prop_map(|s| Json::Str(s.into())),
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KNOWN.to_vec()).prop_map(str::to_owned),
        // A few unknown names, so that they repeat.
        2 => prop::sample::select(vec!["input_type", "truncate", "é"]).prop_map(str::to_owned),
        1 => "[a-z_]{1,6}",
        1 => any_text(0..6),
    ]
}

fn json() -> impl Strategy<Value = Json> {
    leaf().prop_recursive(4, 48, 12, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..12).prop_map(Json::Array),
            prop::collection::vec((field_name(), inner), 0..12).prop_map(Json::Object),
        ]
    })
}

/// A value for the field `name`: often one of the kind it takes, else anything.
fn value_for(name: &str) -> BoxedStrategy<Json> {
    let token_ids = || prop::collection::vec(number().prop_map(Json::Raw), 0..6);
    let text = |len| any_text(len).prop_map(Json::Str);
    let plausible = match name {
        "model" => text(0..10).boxed(),
        "input" => prop_oneof![
            text(0..10),
            prop::collection::vec(text(0..6), 0..4).prop_map(Json::Array),
            token_ids().prop_map(Json::Array),
            prop::collection::vec(token_ids().prop_map(Json::Array), 0..4).prop_map(Json::Array),
        ]
        .boxed(),
        "encoding_format" => prop::sample::select(vec!["\"float\"", "\"base64\"", "null"])
            .prop_map(|s| Json::Raw(s.into()))
            .boxed(),
        "dimensions" => prop_oneof![
            (1u32..4096).prop_map(|d| Json::Raw(d.to_string())),
            number().prop_map(Json::Raw)
        ]
        .boxed(),
        "user" => text(0..10).boxed(),
        _ => leaf().boxed(),
    };
    prop_oneof![4 => plausible, 1 => json()].boxed()
}

/// A top-level object with the fields a request has and the kinds of
/// values they take, repeats and unknown fields included; it often starts
/// with a valid model and input, which later fields may override.
fn request_like() -> impl Strategy<Value = Vec<(String, Json)>> {
    let field = field_name().prop_flat_map(|name| (Just(name.clone()), value_for(&name)));
    (any::<bool>(), prop::collection::vec(field, 0..12)).prop_map(|(valid_start, fields)| {
        let start = [
            ("model".to_owned(), Json::Str("m".into())),
            ("input".to_owned(), Json::Str("x".into())),
        ];
        let start = if valid_start { &start[..] } else { &[] };
        start.iter().cloned().chain(fields).collect()
    })
}

// ---------------------------------------------------------------------------
// Requests parse or are refused, never panic.

/// What any parsed request satisfies, whatever the body.
fn assert_valid(r: &EmbeddingRequest) {
    assert!(!r.model.is_empty() && r.model.len() <= LIMITS.max_model_bytes);
    assert!(!r.inputs.is_empty() && r.inputs.len() <= LIMITS.max_inputs);
    for input in &r.inputs {
        assert!(input.byte_len() > 0 && input.byte_len() <= LIMITS.max_input_bytes);
    }
    assert_ne!(r.dimensions, Some(0));
    assert!(r.extra.len() <= LIMITS.max_extra_fields);
    assert!(
        r.extra.windows(2).all(|w| w[0].0 < w[1].0),
        "sorted, unique"
    );
    assert!(r.extra.iter().all(|(n, _)| !KNOWN.contains(&n.as_str())));
}

fn assert_refusal(e: &InvalidRequest) {
    assert!(!e.message.is_empty());
    assert!(e.param.is_none_or(|p| KNOWN.contains(&p)), "{e:?}");
}

fn check(body: &[u8]) {
    match parse(body) {
        Ok(r) => assert_valid(&r),
        Err(e) => assert_refusal(&e),
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check(&body);
    }

    #[test]
    fn arbitrary_json_never_panics(doc in json()) {
        check(doc.text().as_bytes());
    }

    /// Fields repeat, values are anything: a parsed request holds the last
    /// value of each field, its unknown fields sorted.
    #[test]
    fn request_like_objects_parse_as_json_would(fields in request_like()) {
        let mut body = String::new();
        write_object(&fields, &mut body);
        match parse(body.as_bytes()) {
            Err(e) => assert_refusal(&e),
            Ok(r) => {
                assert_valid(&r);
                let last = |name: &str| fields.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v);
                match last("model") {
                    Some(Json::Str(m)) => prop_assert_eq!(&r.model, m),
                    other => prop_assert!(false, "parsed with model {:?}", other),
                }
                let extra: Vec<(&str, String)> =
                    r.extra.iter().map(|(n, v)| (n.as_str(), v.get().to_owned())).collect();
                prop_assert_eq!(extra, expected_extra(&fields));
            }
        }
    }

    /// A valid body with bytes overwritten, inserted or removed.
    #[test]
    fn damaged_requests_never_panic(
        request in valid_request(),
        edits in prop::collection::vec((any::<Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut body = request.body().into_bytes();
        for (at, byte, how) in edits {
            let i = at.index(body.len() + 1);
            match how {
                0 if i < body.len() => body[i] = byte,
                1 => body.insert(i, byte),
                _ if i < body.len() => { body.remove(i); }
                _ => body.push(byte),
            }
        }
        check(&body);
    }
}

/// Each unknown field's last value, sorted by name.
fn expected_extra(fields: &[(String, Json)]) -> Vec<(&str, String)> {
    let mut last = std::collections::BTreeMap::new();
    for (name, value) in fields {
        if !KNOWN.contains(&name.as_str()) {
            last.insert(name.as_str(), value.text());
        }
    }
    last.into_iter().collect()
}

// ---------------------------------------------------------------------------
// Valid requests parse back to what was sent.

#[derive(Debug, Clone)]
enum InputShape {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenArrays(Vec<Vec<u32>>),
}

impl InputShape {
    fn json(&self) -> serde_json::Value {
        match self {
            InputShape::Text(t) => t.as_str().into(),
            InputShape::Texts(t) => t.as_slice().into(),
            InputShape::Tokens(t) => t.as_slice().into(),
            InputShape::TokenArrays(t) => serde_json::json!(t),
        }
    }

    fn inputs(&self) -> Vec<Input> {
        match self {
            InputShape::Text(t) => vec![Input::Text(t.clone())],
            InputShape::Texts(t) => t.iter().cloned().map(Input::Text).collect(),
            InputShape::Tokens(t) => vec![Input::Tokens(t.clone())],
            InputShape::TokenArrays(t) => t.iter().cloned().map(Input::Tokens).collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct ValidRequest {
    model: String,
    input: InputShape,
    /// `None`: absent; `Some(None)`: null.
    encoding_format: Option<Option<EncodingFormat>>,
    dimensions: Option<Option<u32>>,
    user: Option<Option<String>>,
    /// Distinct names, none of the five above.
    extra: Vec<(String, Json)>,
    /// The order fields are written in.
    order: Vec<usize>,
}

impl ValidRequest {
    fn body(&self) -> String {
        let value = |v: serde_json::Value| Json::Raw(v.to_string());
        let mut fields = vec![
            ("model".to_owned(), Json::Str(self.model.clone())),
            ("input".to_owned(), value(self.input.json())),
        ];
        if let Some(f) = self.encoding_format {
            let f = f.map(|f| match f {
                EncodingFormat::Float => "float",
                EncodingFormat::Base64 => "base64",
            });
            fields.push(("encoding_format".into(), value(serde_json::json!(f))));
        }
        if let Some(d) = self.dimensions {
            fields.push(("dimensions".into(), value(serde_json::json!(d))));
        }
        if let Some(u) = &self.user {
            fields.push(("user".into(), value(serde_json::json!(u))));
        }
        fields.extend(self.extra.iter().cloned());
        let mut ordered: Vec<(String, Json)> = Vec::with_capacity(fields.len());
        let mut slots: Vec<Option<(String, Json)>> = fields.into_iter().map(Some).collect();
        for &i in &self.order {
            if let Some(field) = slots.get_mut(i).and_then(Option::take) {
                ordered.push(field);
            }
        }
        ordered.extend(slots.into_iter().flatten());
        let mut out = String::new();
        write_object(&ordered, &mut out);
        out
    }
}

fn input_shape() -> impl Strategy<Value = InputShape> {
    let text = || any_text(1..40);
    let tokens = || prop::collection::vec(any::<u32>(), 1..16);
    prop_oneof![
        text().prop_map(InputShape::Text),
        prop::collection::vec(text(), 1..6).prop_map(InputShape::Texts),
        tokens().prop_map(InputShape::Tokens),
        prop::collection::vec(tokens(), 1..6).prop_map(InputShape::TokenArrays),
    ]
}

fn valid_request() -> impl Strategy<Value = ValidRequest> {
    let format = prop::option::of(prop::option::of(prop_oneof![
        Just(EncodingFormat::Float),
        Just(EncodingFormat::Base64)
    ]));
    let extra_name =
        any_text(0..10).prop_filter("an unknown field", |n| !KNOWN.contains(&n.as_str()));
    (
        any_text(1..9), // at most 32 bytes of UTF-8
        input_shape(),
        format,
        prop::option::of(prop::option::of(1u32..=u32::MAX)),
        prop::option::of(prop::option::of(any_text(0..12))),
        prop::collection::btree_map(extra_name, json(), 0..=LIMITS.max_extra_fields),
        Just((0..5 + LIMITS.max_extra_fields).collect::<Vec<_>>()).prop_shuffle(),
    )
        .prop_map(
            |(model, input, encoding_format, dimensions, user, extra, order)| ValidRequest {
                model,
                input,
                encoding_format,
                dimensions,
                user,
                extra: extra.into_iter().collect(),
                order,
            },
        )
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn valid_requests_parse_back_to_what_was_sent(request in valid_request()) {
        let body = request.body();
        let r = parse(body.as_bytes()).map_err(|e| TestCaseError::fail(format!("{body}: {e:?}")))?;
        prop_assert_eq!(&r.model, &request.model);
        prop_assert_eq!(&r.inputs, &request.input.inputs());
        prop_assert_eq!(
            r.encoding_format,
            request.encoding_format.flatten().unwrap_or(EncodingFormat::Float)
        );
        prop_assert_eq!(r.dimensions, request.dimensions.flatten());
        prop_assert_eq!(&r.user, &request.user.clone().flatten());
        let extra: Vec<(&str, String)> =
            r.extra.iter().map(|(n, v)| (n.as_str(), v.get().to_owned())).collect();
        prop_assert_eq!(extra, expected_extra(&request.extra));
    }

    /// The extra fields a request keys on depend on each name's last value
    /// only: not on how the distinct names are interleaved.
    #[test]
    fn extra_fields_do_not_depend_on_their_order(
        values in prop::collection::btree_map(
            "[a-z]{1,3}",
            prop::collection::vec(leaf(), 1..3),
            0..=LIMITS.max_extra_fields / 2,
        ),
        seeds in (any::<u64>(), any::<u64>()),
    ) {
        let occurrences: Vec<&String> =
            values.iter().flat_map(|(n, vs)| std::iter::repeat_n(n, vs.len())).collect();
        let parsed = |seed: u64| {
            // The names' slots shuffled; each name's values stay in order.
            let mut names = occurrences.clone();
            shuffle(&mut names, seed);
            let mut next = std::collections::HashMap::<&String, usize>::new();
            let fields: Vec<(String, Json)> = names
                .into_iter()
                .map(|n| {
                    let i = next.entry(n).or_default();
                    *i += 1;
                    (n.clone(), values[n][*i - 1].clone())
                })
                .collect();
            let mut body = String::from(r#"{"model":"m","input":"x""#);
            for (name, value) in &fields {
                body.push_str(&format!(",{}:{}", quote(name), value.text()));
            }
            body.push('}');
            parse(body.as_bytes()).map(|r| {
                r.extra.iter().map(|(n, v)| (n.clone(), v.get().to_owned())).collect::<Vec<_>>()
            })
        };
        let (a, b) = (parsed(seeds.0), parsed(seeds.1));
        prop_assert_eq!(&a, &b);
        let expected: Vec<(String, String)> = values
            .iter()
            .map(|(n, vs)| (n.clone(), vs.last().map(Json::text).unwrap_or_default()))
            .collect();
        prop_assert_eq!(a.ok(), Some(expected));
    }
}

/// Fisher-Yates with a small deterministic generator (splitmix64).
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

// ---------------------------------------------------------------------------
// Stored entries: anything decodes to an error or to a checked entry.

/// f32 bit patterns, often the ones that are easy to get wrong.
fn f32_bits() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        Just((-0.0f32).to_bits()),
        Just(0),
        1u32..0x0080_0000,           // positive subnormals
        0x8000_0001u32..0x8080_0000, // negative subnormals
        Just(f32::MAX.to_bits()),
        Just(f32::MIN_POSITIVE.to_bits()),
    ]
    .prop_filter("stored values are finite", |b| {
        f32::from_bits(*b).is_finite()
    })
}

fn vector() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(f32_bits().prop_map(f32::from_bits), 1..48)
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn payload_bits(entry: &Entry) -> Vec<u32> {
    entry
        .payload()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn arbitrary_bytes_never_decode_by_accident(
        key in any::<[u8; 32]>(),
        bytes in prop::collection::vec(any::<u8>(), 0..128),
        wanted in prop::option::of(0u32..40),
    ) {
        let decoded = Entry::decode(&KeyHash(key), Bytes::from(bytes), wanted);
        prop_assert!(decoded.is_err(), "{:?}", decoded);
    }

    /// Well-formed headers with any dimensions, tokens, tag, time and
    /// checksum: decoding checks, and does not panic.
    #[test]
    fn forged_headers_never_panic(
        key in any::<[u8; 32]>(),
        header in any::<[u8; 37]>(),
        payload in prop::collection::vec(any::<u8>(), 0..64),
        exact_dims in any::<bool>(),
        wanted in prop::option::of(0u32..20),
    ) {
        // Magic and version, then the value type (one past the known ones
        // too), dimensions, and the other 32 bytes.
        let mut bytes = b"EG\x03".to_vec();
        let value_type = header[0] % 6;
        bytes.push(value_type);
        let size = if value_type == 0 { 4 } else { 1 };
        let dims = match exact_dims {
            true => (payload.len() / size) as u32,
            false => u32::from_le_bytes([header[1], header[2], header[3], header[4]]),
        };
        bytes.extend_from_slice(&dims.to_le_bytes());
        bytes.extend_from_slice(&header[5..]);
        prop_assert_eq!(bytes.len(), embgate::cache::entry::HEADER_LEN);
        bytes.extend_from_slice(&payload);
        if let Ok(entry) = Entry::decode(&KeyHash(key), Bytes::from(bytes), wanted) {
            prop_assert_eq!(entry.payload().len(), entry.dimensions() as usize * entry.value_type().size());
        }
    }

    #[test]
    fn entries_round_trip_bit_for_bit(
        key in any::<[u8; 32]>(),
        values in vector(),
        tokens in any::<u32>(),
    ) {
        let key = KeyHash(key);
        let encoded = Entry::encode(&key, &ORIGIN, &values, tokens);
        let dims = values.len() as u32;
        for wanted in [None, Some(dims)] {
            let decoded = Entry::decode(&key, encoded.as_bytes().clone(), wanted)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(payload_bits(&decoded), bits(&values));
            prop_assert_eq!(decoded.dimensions(), dims);
            prop_assert_eq!(decoded.tokens(), tokens);
        }
        prop_assert!(Entry::decode(&key, encoded.as_bytes().clone(), Some(dims + 1)).is_err());
    }

    #[test]
    fn any_damage_to_an_entry_is_detected(
        key in any::<[u8; 32]>(),
        other in any::<[u8; 32]>(),
        values in vector(),
        at in any::<Index>(),
        xor in 1u8..=255,
        extra in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let key = KeyHash(key);
        let bytes = Entry::encode(&key, &ORIGIN, &values, 7).as_bytes().clone();
        let len = bytes.len();
        let mut changed = bytes.to_vec();
        changed[at.index(len)] ^= xor;
        prop_assert!(Entry::decode(&key, changed.into(), None).is_err());
        prop_assert!(Entry::decode(&key, bytes.slice(..at.index(len)), None).is_err());
        let longer = [&bytes[..], &extra].concat();
        prop_assert!(Entry::decode(&key, longer.into(), None).is_err());
        if other != key.0 {
            prop_assert!(Entry::decode(&KeyHash(other), bytes.clone(), None).is_err());
        }
        prop_assert!(Entry::decode(&key, bytes, None).is_ok());
    }
}

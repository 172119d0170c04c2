//! OpenAI's embeddings wire format: parsing and validating requests the way
//! the vendor does, and writing responses without an intermediate JSON tree.

pub mod bedrock;
pub mod cohere;
mod floats;
pub mod gemini;
pub mod native;
pub mod vendor;

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

pub use self::vendor::VendorParams;
use crate::cache::entry::ValueType;

/// One input to embed, exactly as the caller sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
}

impl Input {
    /// Size used for limits and as an upper bound of its token count
    /// (a cl100k token is at least one byte).
    pub fn byte_len(&self) -> usize {
        match self {
            Input::Text(t) => t.len(),
            Input::Tokens(t) => t.len() * 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// A validated `POST /v1/embeddings` body.
#[derive(Debug)]
pub struct EmbeddingRequest {
    pub model: String,
    pub inputs: Vec<Input>,
    pub encoding_format: EncodingFormat,
    pub dimensions: Option<u32>,
    pub user: Option<String>,
    /// Fields OpenAI does not define but other vendors do (e.g. `input_type`).
    /// They are forwarded and, since they may change the vector, keyed on.
    /// Sorted by name; a repeated name keeps its last value, as in JSON.
    /// For a native vendor: its [`VendorParams`], as canonical fields.
    pub extra: Vec<(String, Box<RawValue>)>,
    /// What a native vendor is asked for (default for OpenAI's API).
    pub vendor: VendorParams,
}

impl EmbeddingRequest {
    /// The values an entry of this request holds: the dimensions, packed
    /// eight a byte for bit outputs.
    pub fn stored_dimensions(&self) -> Option<u32> {
        self.dimensions.map(|d| self.vendor.output.stored_values(d))
    }
}

/// Request-size limits enforced while parsing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_inputs: usize,
    pub max_input_bytes: usize,
    /// Fields besides the five OpenAI defines, counted as they are read
    /// (a repeated name counts each time): each is kept, forwarded and
    /// hashed into every input's key.
    pub max_extra_fields: usize,
    /// Longest model name, in bytes of UTF-8.
    pub max_model_bytes: usize,
}

/// Limits for the parsers' unit tests.
#[cfg(test)]
pub(crate) const TEST_LIMITS: Limits = Limits {
    max_inputs: 96,
    max_input_bytes: 1024,
    max_extra_fields: 16,
    max_model_bytes: 64,
};

/// A request the vendor would refuse; becomes a 400 `invalid_request_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    pub message: String,
    pub param: Option<&'static str>,
}

fn invalid(param: Option<&'static str>, message: impl Into<String>) -> InvalidRequest {
    InvalidRequest {
        message: message.into(),
        param,
    }
}

/// Checks a model name against the limits; requests and `embgate warm`
/// lines both go through it.
pub fn check_model(model: &str, limits: &Limits) -> Result<(), InvalidRequest> {
    if model.len() > limits.max_model_bytes {
        return Err(invalid(
            Some("model"),
            format!(
                "The model name is too long: {} bytes, at most {} are allowed \
                 (limits.max_model_bytes).",
                model.len(),
                limits.max_model_bytes
            ),
        ));
    }
    Ok(())
}

/// Parses and validates a request body.
pub fn parse_request(body: &[u8], limits: Limits) -> Result<EmbeddingRequest, InvalidRequest> {
    let mut too_many_extra = false;
    let mut json = serde_json::Deserializer::from_slice(body);
    let parsed = FieldsSeed {
        max_extra: limits.max_extra_fields,
        too_many_extra: &mut too_many_extra,
    }
    .deserialize(&mut json)
    .and_then(|fields| json.end().map(|()| fields));
    let fields = match parsed {
        Ok(fields) => fields,
        Err(_) if too_many_extra => {
            return Err(invalid(
                None,
                format!(
                    "Too many fields: at most {} besides 'model', 'input', 'encoding_format', \
                     'dimensions' and 'user' are accepted (limits.max_extra_fields).",
                    limits.max_extra_fields
                ),
            ));
        }
        Err(e) => {
            return Err(invalid(
                None,
                format!(
                    "We could not parse the JSON body of your request. The API expects a JSON \
                     object with 'model' and 'input' ({e})."
                ),
            ));
        }
    };

    let model = match fields.model {
        Some(raw) => match serde_json::from_str::<Option<String>>(raw.get()) {
            Ok(Some(m)) if !m.is_empty() => {
                check_model(&m, &limits)?;
                m
            }
            Ok(Some(_)) | Ok(None) => {
                return Err(invalid(Some("model"), "you must provide a model parameter"));
            }
            Err(_) => return Err(invalid(Some("model"), "'model' must be a string")),
        },
        None => return Err(invalid(Some("model"), "you must provide a model parameter")),
    };

    let inputs = match fields.input {
        Some(raw) => parse_inputs(&raw)?,
        None => return Err(invalid(Some("input"), "'input' is a required property")),
    };
    if inputs.len() > limits.max_inputs {
        return Err(invalid(
            Some("input"),
            format!(
                "Too many inputs: {} given, at most {} are allowed per request.",
                inputs.len(),
                limits.max_inputs
            ),
        ));
    }
    if let Some((i, _)) = inputs
        .iter()
        .enumerate()
        .find(|(_, input)| input.byte_len() > limits.max_input_bytes)
    {
        return Err(invalid(
            Some("input"),
            format!(
                "Input {i} is too long: at most {} bytes per input are allowed.",
                limits.max_input_bytes
            ),
        ));
    }

    let encoding_format = match fields.encoding_format {
        None => EncodingFormat::Float,
        Some(raw) => match serde_json::from_str::<Option<&str>>(raw.get()) {
            Ok(None) | Ok(Some("float")) => EncodingFormat::Float,
            Ok(Some("base64")) => EncodingFormat::Base64,
            _ => {
                return Err(invalid(
                    Some("encoding_format"),
                    format!(
                        "{} is not one of ['float', 'base64'] - 'encoding_format'",
                        raw.get()
                    ),
                ));
            }
        },
    };

    let dimensions = match fields.dimensions {
        None => None,
        Some(raw) => match serde_json::from_str::<Option<u32>>(raw.get()) {
            Ok(Some(0)) | Err(_) => {
                return Err(invalid(
                    Some("dimensions"),
                    format!(
                        "Invalid 'dimensions': {} is not a positive integer.",
                        raw.get()
                    ),
                ));
            }
            Ok(d) => d,
        },
    };

    let user = match fields.user {
        None => None,
        Some(raw) => serde_json::from_str::<Option<String>>(raw.get())
            .map_err(|_| invalid(Some("user"), "'user' must be a string"))?,
    };

    Ok(EmbeddingRequest {
        model,
        inputs,
        encoding_format,
        dimensions,
        user,
        extra: sorted_last_wins(fields.extra),
        vendor: VendorParams::default(),
    })
}

/// Sorts fields by name and keeps the last value of a repeated name: the
/// sort is stable, so repeats stay in the order they came in, and each run
/// of them collapses into its first slot holding the last value.
fn sorted_last_wins(mut extra: Vec<(String, Box<RawValue>)>) -> Vec<(String, Box<RawValue>)> {
    extra.sort_by(|a, b| a.0.cmp(&b.0));
    extra.dedup_by(|later, kept| {
        let repeated = later.0 == kept.0;
        if repeated {
            std::mem::swap(&mut later.1, &mut kept.1);
        }
        repeated
    });
    extra
}

/// The top-level object, each field kept raw so that every field gets its
/// own precise error, and unknown fields survive untouched.
#[derive(Default)]
struct Fields {
    model: Option<Box<RawValue>>,
    input: Option<Box<RawValue>>,
    encoding_format: Option<Box<RawValue>>,
    dimensions: Option<Box<RawValue>>,
    user: Option<Box<RawValue>>,
    /// Unknown fields in the order they came, repeats included.
    extra: Vec<(String, Box<RawValue>)>,
}

/// Reads [`Fields`], stopping at the first unknown field past `max_extra`
/// (and saying so in `too_many_extra`) rather than collecting them all.
struct FieldsSeed<'a> {
    max_extra: usize,
    too_many_extra: &'a mut bool,
}

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_> {
    type Value = Fields;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_> {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields::default();
        while let Some(name) = map.next_key::<String>()? {
            let slot = match name.as_str() {
                "model" => &mut fields.model,
                "input" => &mut fields.input,
                "encoding_format" => &mut fields.encoding_format,
                "dimensions" => &mut fields.dimensions,
                "user" => &mut fields.user,
                _ if fields.extra.len() >= self.max_extra => {
                    *self.too_many_extra = true;
                    return Err(de::Error::custom("too many fields"));
                }
                _ => {
                    fields.extra.push((name, map.next_value()?));
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(fields)
    }
}

fn parse_inputs(raw: &RawValue) -> Result<Vec<Input>, InvalidRequest> {
    let parsed: InputField = serde_json::from_str(raw.get())
        .map_err(|e| invalid(Some("input"), format!("'$.input' is invalid: {e}")))?;
    let inputs = parsed.0.map_err(|m| invalid(Some("input"), m))?;
    if inputs.is_empty() {
        return Err(invalid(
            Some("input"),
            "'$.input' is invalid: it must not be empty.",
        ));
    }
    if let Some(i) = inputs.iter().position(|input| match input {
        Input::Text(t) => t.is_empty(),
        Input::Tokens(t) => t.is_empty(),
    }) {
        return Err(invalid(
            Some("input"),
            format!("'$.input[{i}]' is invalid: inputs must not be empty."),
        ));
    }
    Ok(inputs)
}

/// `input` in any of its four shapes; a shape error is kept as a message.
struct InputField(Result<Vec<Input>, String>);

/// One element of an `input` array.
enum Element {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for InputField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct InputVisitor;
        impl<'de> Visitor<'de> for InputVisitor {
            type Value = InputField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, an array of strings, or token arrays")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<InputField, E> {
                Ok(InputField(Ok(vec![Input::Text(v.to_owned())])))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<InputField, E> {
                Ok(InputField(Ok(vec![Input::Text(v)])))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InputField, A::Error> {
                let mut elements = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(e) = seq.next_element::<Element>()? {
                    elements.push(e);
                }
                Ok(InputField(homogeneous(elements)))
            }
        }
        d.deserialize_any(InputVisitor)
    }
}

/// The vendor rejects arrays that mix strings, token ids and token arrays.
fn homogeneous(elements: Vec<Element>) -> Result<Vec<Input>, String> {
    const MIXED: &str = "'$.input' is invalid: an array must hold only strings, only token ids, \
                         or only token arrays.";
    match elements.first() {
        None => Ok(Vec::new()),
        Some(Element::Token(_)) => elements
            .into_iter()
            .map(|e| match e {
                Element::Token(t) => Ok(t),
                _ => Err(MIXED.to_owned()),
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(|tokens| vec![Input::Tokens(tokens)]),
        Some(_) => elements
            .into_iter()
            .try_fold((Vec::new(), None::<bool>), |(mut acc, text_kind), e| {
                let (input, is_text) = match e {
                    Element::Text(t) => (Input::Text(t), true),
                    Element::Tokens(t) => (Input::Tokens(t), false),
                    Element::Token(_) => return Err(MIXED.to_owned()),
                };
                if text_kind.is_some_and(|k| k != is_text) {
                    return Err(MIXED.to_owned());
                }
                acc.push(input);
                Ok((acc, Some(is_text)))
            })
            .map(|(acc, _)| acc),
    }
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ElementVisitor;
        impl<'de> Visitor<'de> for ElementVisitor {
            type Value = Element;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a token id (0..2^32), or an array of token ids")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Element, E> {
                Ok(Element::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Element, E> {
                Ok(Element::Text(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Element, E> {
                u32::try_from(v)
                    .map(Element::Token)
                    .map_err(|_| E::custom(format!("token id {v} is out of range")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                let mut tokens = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(t) = seq.next_element::<u32>()? {
                    tokens.push(t);
                }
                Ok(Element::Tokens(tokens))
            }
        }
        d.deserialize_any(ElementVisitor)
    }
}

/// Writes an OpenAI embeddings response for vectors given as raw
/// little-endian f32 bytes, in the caller's order.
pub fn write_response<'a>(
    out: &mut Vec<u8>,
    model: &str,
    vectors: impl ExactSizeIterator<Item = &'a [u8]>,
    format: EncodingFormat,
    prompt_tokens: u64,
) {
    let response =
        EmbeddingResponse::new(model.to_owned(), vectors.collect(), format, prompt_tokens);
    response.write_part(0..response.len(), out);
}

/// An embeddings response that can be written in independent parts (ranges
/// of vectors), so a large one is rendered on several threads and streamed
/// while it is written, instead of built whole in memory.
pub struct EmbeddingResponse<V> {
    model: String,
    /// How the stored values read: f32, or one byte each.
    value_type: ValueType,
    /// Voyage's usage (`total_tokens` only) rather than OpenAI's.
    voyage: bool,
    vectors: Vec<V>,
    format: EncodingFormat,
    prompt_tokens: u64,
}

impl<V: AsRef<[u8]>> EmbeddingResponse<V> {
    pub fn new(model: String, vectors: Vec<V>, format: EncodingFormat, prompt_tokens: u64) -> Self {
        EmbeddingResponse {
            model,
            value_type: ValueType::F32,
            voyage: false,
            vectors,
            format,
            prompt_tokens,
        }
    }

    /// As Voyage answers: values of `value_type`, its usage.
    pub fn voyage(mut self, value_type: ValueType) -> Self {
        self.value_type = value_type;
        self.voyage = true;
        self
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// A close upper bound of the whole response's size.
    pub fn size_hint(&self) -> usize {
        160 + self.model.len() * 2
            + self
                .vectors
                .iter()
                .map(|v| self.item_size(v))
                .sum::<usize>()
    }

    fn item_size(&self, vector: &V) -> usize {
        let bytes = vector.as_ref().len();
        64 + match self.format {
            EncodingFormat::Base64 => bytes.div_ceil(3) * 4,
            // Nine-digit values average about 12.5 characters with the comma.
            EncodingFormat::Float if self.value_type == ValueType::F32 => bytes / 4 * 13,
            EncodingFormat::Float => bytes * 5,
        }
    }

    /// Consecutive ranges of vectors of about `target` bytes each, covering
    /// them all (one empty range for no vectors).
    pub fn parts(&self, target: usize) -> Vec<std::ops::Range<usize>> {
        let mut parts = Vec::new();
        let (mut start, mut size) = (0, 0);
        for (i, v) in self.vectors.iter().enumerate() {
            size += self.item_size(v);
            if size >= target {
                parts.push(start..i + 1);
                (start, size) = (i + 1, 0);
            }
        }
        if start < self.vectors.len() || parts.is_empty() {
            parts.push(start..self.vectors.len());
        }
        parts
    }

    /// Writes the vectors in `range`; the part starting at 0 opens the JSON
    /// document and the part ending at `len()` closes it, so the parts of
    /// [`Self::parts`] concatenated are the whole response.
    pub fn write_part(&self, range: std::ops::Range<usize>, out: &mut Vec<u8>) {
        if range.start == 0 {
            out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
        }
        for index in range.clone() {
            let Some(vector) = self.vectors.get(index) else {
                break;
            };
            if index > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"object\":\"embedding\",\"index\":");
            out.extend_from_slice(itoa(index as u64, &mut [0u8; 20]));
            out.extend_from_slice(b",\"embedding\":");
            match self.format {
                EncodingFormat::Base64 => write_base64(out, vector.as_ref()),
                EncodingFormat::Float => write_values(out, vector.as_ref(), self.value_type),
            }
            out.push(b'}');
        }
        if range.end >= self.vectors.len() {
            out.extend_from_slice(b"],\"model\":");
            // A String always serialises; the fallback keeps the output valid JSON.
            if serde_json::to_writer(&mut *out, &self.model).is_err() {
                out.extend_from_slice(b"\"\"");
            }
            if self.voyage {
                out.extend_from_slice(b",\"usage\":{\"total_tokens\":");
            } else {
                out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
                out.extend_from_slice(itoa(self.prompt_tokens, &mut [0u8; 20]));
                out.extend_from_slice(b",\"total_tokens\":");
            }
            out.extend_from_slice(itoa(self.prompt_tokens, &mut [0u8; 20]));
            out.extend_from_slice(b"}}");
        }
    }

    /// The size of `range`'s part, for its buffer.
    pub fn part_size_hint(&self, range: std::ops::Range<usize>) -> usize {
        160 + self.model.len() * 2
            + self.vectors[range.start.min(self.vectors.len())..range.end.min(self.vectors.len())]
                .iter()
                .map(|v| self.item_size(v))
                .sum::<usize>()
    }
}

/// Base64 of `bytes`, quoted (SIMD where the CPU has it).
fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    base64_simd::STANDARD.encode_append(bytes, out);
    out.push(b'"');
}

/// Each f32 as a decimal that reads back as the same f32.
fn write_floats(out: &mut Vec<u8>, bytes: &[u8]) {
    let values = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    floats::write_array(out, values);
}

/// Stored values as a JSON array of numbers.
pub fn write_values(out: &mut Vec<u8>, bytes: &[u8], value_type: ValueType) {
    match value_type {
        ValueType::F32 => write_floats(out, bytes),
        other => write_bytes(out, bytes, other),
    }
}

/// One-byte values as JSON integers: signed for int8 and binary.
pub fn write_bytes(out: &mut Vec<u8>, bytes: &[u8], value_type: ValueType) {
    let signed = matches!(value_type, ValueType::Int8 | ValueType::Binary);
    out.push(b'[');
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let v = if signed {
            i64::from(*b as i8)
        } else {
            i64::from(*b)
        };
        if v < 0 {
            out.push(b'-');
        }
        out.extend_from_slice(itoa(v.unsigned_abs(), &mut [0u8; 20]));
    }
    out.push(b']');
}

/// Formats an unsigned integer into `buf` without allocating.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_inputs: 2048,
        max_input_bytes: 1 << 20,
        max_extra_fields: 16,
        max_model_bytes: 256,
    };

    fn parse(body: &str) -> Result<EmbeddingRequest, InvalidRequest> {
        parse_request(body.as_bytes(), LIMITS)
    }

    #[test]
    fn accepts_the_four_input_shapes() {
        let r = parse(r#"{"model":"m","input":"hi"}"#).expect("string");
        assert_eq!(r.inputs, vec![Input::Text("hi".into())]);
        assert_eq!(r.encoding_format, EncodingFormat::Float);
        let r = parse(r#"{"model":"m","input":["a","b"]}"#).expect("strings");
        assert_eq!(r.inputs.len(), 2);
        let r = parse(r#"{"model":"m","input":[1,2,3]}"#).expect("tokens");
        assert_eq!(r.inputs, vec![Input::Tokens(vec![1, 2, 3])]);
        let r =
            parse(r#"{"model":"m","input":[[1],[2,3]],"encoding_format":"base64","dimensions":8}"#)
                .expect("token arrays");
        assert_eq!(
            r.inputs,
            vec![Input::Tokens(vec![1]), Input::Tokens(vec![2, 3])]
        );
        assert_eq!(r.encoding_format, EncodingFormat::Base64);
        assert_eq!(r.dimensions, Some(8));
    }

    #[test]
    fn keeps_unknown_fields_sorted() {
        let r = parse(r#"{"model":"m","input":"x","z":1,"input_type":"query"}"#).expect("ok");
        let names: Vec<_> = r.extra.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["input_type", "z"]);
    }

    /// The extra fields are part of every cache key (src/key.rs): the
    /// names, the raw bytes of the values kept and their order must stay
    /// what they have always been, or stored entries stop being found.
    #[test]
    fn extra_fields_key_the_same_as_always() {
        let body = r#"{"z":1,"model":"m","b":{"x": [1, 2]},"input":"x","a":"first","dimensions":8,
            "c":null,"b":"second","a" : "last" ,"é":1e400,"A":true}"#;
        let r = parse(body).expect("valid");
        let extra: Vec<(&str, &str)> = r.extra.iter().map(|(n, v)| (n.as_str(), v.get())).collect();
        assert_eq!(
            extra,
            [
                ("A", "true"),
                ("a", "\"last\""),
                ("b", "\"second\""),
                ("c", "null"),
                ("z", "1"),
                ("é", "1e400"),
            ]
        );
        let hash = crate::cache::key::KeyScope::of("ns", &r)
            .hasher()
            .key(&r.inputs[0]);
        let key = crate::cache::key::KeyLayout::new("p").entry(&hash);
        assert_eq!(
            key,
            "p:v1:e7897eace85ef1a612c645fa5da2d4531fee01640e9b55d59e8777508ffe9e31"
        );
    }

    #[test]
    fn rejects_what_the_vendor_rejects() {
        let cases = [
            ("{", None),
            ("[]", None),
            (r#"{"input":"x"}"#, Some("model")),
            (r#"{"model":5,"input":"x"}"#, Some("model")),
            (r#"{"model":"m"}"#, Some("input")),
            (r#"{"model":"m","input":[]}"#, Some("input")),
            (r#"{"model":"m","input":""}"#, Some("input")),
            (r#"{"model":"m","input":["a",""]}"#, Some("input")),
            (r#"{"model":"m","input":[[]]}"#, Some("input")),
            (r#"{"model":"m","input":["a",[1]]}"#, Some("input")),
            (r#"{"model":"m","input":[1,"a"]}"#, Some("input")),
            (r#"{"model":"m","input":[-1]}"#, Some("input")),
            (r#"{"model":"m","input":[1.5]}"#, Some("input")),
            (r#"{"model":"m","input":{"a":1}}"#, Some("input")),
            (
                r#"{"model":"m","input":"x","encoding_format":"int8"}"#,
                Some("encoding_format"),
            ),
            (
                r#"{"model":"m","input":"x","dimensions":0}"#,
                Some("dimensions"),
            ),
            (
                r#"{"model":"m","input":"x","dimensions":"8"}"#,
                Some("dimensions"),
            ),
            (r#"{"model":"m","input":"x","user":3}"#, Some("user")),
        ];
        for (body, param) in cases {
            let err = parse(body).expect_err(body);
            assert_eq!(err.param, param, "{body}: {}", err.message);
        }
    }

    #[test]
    fn enforces_limits() {
        let many = format!(
            r#"{{"model":"m","input":[{}]}}"#,
            vec!["\"a\""; 2049].join(",")
        );
        assert_eq!(parse(&many).expect_err("too many").param, Some("input"));
        let long = format!(r#"{{"model":"m","input":"{}"}}"#, "a".repeat((1 << 20) + 1));
        assert_eq!(parse(&long).expect_err("too long").param, Some("input"));

        let model = |len| format!(r#"{{"model":"{}","input":"x"}}"#, "é".repeat(len));
        assert_eq!(parse(&model(128)).expect("at the limit").model.len(), 256);
        let err = parse(&model(129)).expect_err("model too long");
        assert_eq!(err.param, Some("model"));
        assert!(err.message.contains("at most 256"), "{}", err.message);
    }

    fn with_extra_fields(names: impl Iterator<Item = String>) -> String {
        let fields: String = names.map(|n| format!(r#","{n}":0"#)).collect();
        format!(r#"{{"model":"m","input":"x"{fields}}}"#)
    }

    #[test]
    fn caps_the_count_of_extra_fields() {
        let at_cap = with_extra_fields((0..16).map(|i| format!("f{i}")));
        assert_eq!(parse(&at_cap).expect("at the limit").extra.len(), 16);
        // Known fields do not count; a repeated unknown name counts each time.
        let known =
            r#"{"model":"m","input":"x","user":"u","dimensions":1,"encoding_format":"float"}"#;
        assert!(
            parse_request(
                known.as_bytes(),
                Limits {
                    max_extra_fields: 0,
                    ..LIMITS
                }
            )
            .is_ok()
        );
        for body in [
            with_extra_fields((0..17).map(|i| format!("f{i}"))),
            with_extra_fields((0..17).map(|_| "same".to_owned())),
        ] {
            let err = parse(&body).expect_err("over the limit");
            assert_eq!(err.param, None);
            assert!(err.message.contains("at most 16"), "{}", err.message);
            assert!(
                err.message.contains("limits.max_extra_fields"),
                "{}",
                err.message
            );
        }
        // Refused at the first field over the limit: what follows is not read.
        let cut = format!("{},\"f99\":", &at_cap[..at_cap.len() - 1]) + "[[[";
        assert!(
            parse(&cut)
                .expect_err("cut")
                .message
                .contains("max_extra_fields")
        );
        assert!(
            parse(&at_cap[..at_cap.len() - 1])
                .expect_err("cut")
                .message
                .contains("could not parse")
        );
    }

    #[test]
    fn a_repeated_field_keeps_its_last_value() {
        let r =
            parse(r#"{"model":"a","input":"x","k":1,"model":"b","j":2,"k":3,"k":4}"#).expect("ok");
        assert_eq!(r.model, "b");
        let extra: Vec<(&str, &str)> = r.extra.iter().map(|(n, v)| (n.as_str(), v.get())).collect();
        assert_eq!(extra, [("j", "2"), ("k", "4")]);
    }

    #[test]
    fn rendering_in_parts_matches_rendering_whole() {
        let vectors: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                (0..300)
                    .flat_map(|j| ((i * 300 + j) as f32 * 1.37e-3 - 7.0).to_le_bytes())
                    .collect()
            })
            .collect();
        for format in [EncodingFormat::Float, EncodingFormat::Base64] {
            let mut whole = Vec::new();
            write_response(
                &mut whole,
                "m",
                vectors.iter().map(Vec::as_slice),
                format,
                9,
            );
            let response = EmbeddingResponse::new("m".into(), vectors.clone(), format, 9);
            let ranges = response.parts(10_000);
            assert!(ranges.len() > 3);
            let mut parts = Vec::new();
            for range in ranges {
                response.write_part(range, &mut parts);
            }
            assert_eq!(parts, whole);
            assert!(whole.len() <= response.size_hint());
            let json: serde_json::Value = serde_json::from_slice(&whole).expect("valid json");
            assert_eq!(json["data"].as_array().map(Vec::len), Some(50));
        }
    }

    #[test]
    fn floats_read_back_as_the_same_f32() {
        let values: Vec<f32> = (0..20_000)
            .map(|i| f32::from_bits(0x3000_0000u32.wrapping_add(i * 104_729)))
            .chain([0.0, -0.0, f32::MIN_POSITIVE, f32::MAX, -f32::MAX, 1e-45])
            .filter(|v| v.is_finite())
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        write_floats(&mut out, &bytes);
        let parsed: Vec<f64> = serde_json::from_slice(&out).expect("valid JSON numbers");
        for (a, b) in parsed.iter().zip(&values) {
            assert_eq!((*a as f32).to_bits(), b.to_bits(), "{b}");
        }
    }

    #[test]
    fn writes_float_and_base64() {
        use base64::Engine as _;
        let v: Vec<u8> = [0.5f32, -1.25]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let mut out = Vec::new();
        write_response(
            &mut out,
            "m\"x",
            [v.as_slice()].into_iter(),
            EncodingFormat::Float,
            7,
        );
        let json: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        assert_eq!(
            json["data"][0]["embedding"],
            serde_json::json!([0.5, -1.25])
        );
        assert_eq!(json["model"], "m\"x");
        assert_eq!(json["usage"]["prompt_tokens"], 7);
        out.clear();
        write_response(
            &mut out,
            "m",
            [v.as_slice()].into_iter(),
            EncodingFormat::Base64,
            0,
        );
        let json: serde_json::Value = serde_json::from_slice(&out).expect("valid json");
        let b64 = json["data"][0]["embedding"].as_str().expect("string");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("b64"),
            v
        );
    }
}

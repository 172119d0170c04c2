//! The vendor parameters that change a vector, in one canonical form: the
//! same call keys (and is sent) alike whether it came in through OpenAI's
//! format or through the vendor's own API.

use serde_json::value::RawValue;

use crate::cache::entry::ValueType;

/// What a native vendor is asked for besides the model, inputs and
/// dimensions. Every field changes the vector, so every field is keyed
/// ([`VendorParams::key_fields`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VendorParams {
    /// Cohere and Voyage `input_type`, Gemini `taskType`.
    pub input_type: Option<String>,
    /// Cohere `truncate`: `NONE`, `START` or `END`.
    pub truncate: Option<String>,
    /// Voyage `truncation`.
    pub truncation: Option<bool>,
    /// Titan `normalize`.
    pub normalize: Option<bool>,
    /// The value type asked for (Cohere `embedding_types`, Voyage
    /// `output_dtype`); entries keep it as the vendor sent it.
    pub output: ValueType,
}

impl VendorParams {
    /// The parameters as the request fields the cache key hashes, sorted by
    /// name, each value in one canonical JSON spelling.
    pub fn key_fields(&self) -> Vec<(String, Box<RawValue>)> {
        let mut fields = Vec::new();
        let mut push = |name: &str, json: String| {
            if let Ok(raw) = RawValue::from_string(json) {
                fields.push((name.to_owned(), raw));
            }
        };
        if let Some(t) = &self.input_type {
            push("input_type", json_string(t));
        }
        if let Some(n) = self.normalize {
            push("normalize", n.to_string());
        }
        if self.output != ValueType::F32 {
            push("output_type", json_string(self.output.name()));
        }
        if let Some(t) = &self.truncate {
            push("truncate", json_string(t));
        }
        if let Some(t) = self.truncation {
            push("truncation", t.to_string());
        }
        fields
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_fields_are_sorted_and_canonical() {
        let p = VendorParams {
            input_type: Some("search_query".into()),
            truncate: Some("END".into()),
            truncation: Some(false),
            normalize: Some(true),
            output: ValueType::Int8,
        };
        let owned = p.key_fields();
        let fields: Vec<(&str, &str)> = owned.iter().map(|(n, v)| (n.as_str(), v.get())).collect();
        assert_eq!(
            fields,
            [
                ("input_type", "\"search_query\""),
                ("normalize", "true"),
                ("output_type", "\"int8\""),
                ("truncate", "\"END\""),
                ("truncation", "false"),
            ]
        );
        assert!(VendorParams::default().key_fields().is_empty());
    }
}

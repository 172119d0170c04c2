//! Requests for a native vendor: its parameters read (from the extra fields
//! of an OpenAI-format request, or from its own API's body), validated, and
//! put in the one canonical form that is sent and keyed, so both ways in
//! share entries.

use serde_json::value::RawValue;

use super::{EmbeddingRequest, Input, InvalidRequest, VendorParams, invalid};
use crate::cache::entry::ValueType;
use crate::config::Flavour;

pub const COHERE_INPUT_TYPES: &[&str] = &[
    "search_document",
    "search_query",
    "classification",
    "clustering",
];
pub const COHERE_TRUNCATE: &[&str] = &["NONE", "START", "END"];
pub const VOYAGE_INPUT_TYPES: &[&str] = &["query", "document"];
pub const GEMINI_TASK_TYPES: &[&str] = &[
    "TASK_TYPE_UNSPECIFIED",
    "RETRIEVAL_QUERY",
    "RETRIEVAL_DOCUMENT",
    "SEMANTIC_SIMILARITY",
    "CLASSIFICATION",
    "CLUSTERING",
    "QUESTION_ANSWERING",
    "FACT_VERIFICATION",
    "CODE_RETRIEVAL_QUERY",
];

/// What Cohere does without `input_type` and `truncate`, written out so an
/// absent value and the vendor's default key alike.
const COHERE_DEFAULT_INPUT_TYPE: &str = "search_document";
const COHERE_DEFAULT_TRUNCATE: &str = "END";

/// Reads `req.extra` as the parameters of `flavour`'s API and replaces them
/// with their canonical form. `req.dimensions` carries the vendor's output
/// dimension. Token arrays, unknown fields and non-float outputs (outside
/// Voyage, whose own API shares the path) are refused: they have no
/// meaning at that vendor.
pub fn adopt(flavour: Flavour, req: &mut EmbeddingRequest) -> Result<(), InvalidRequest> {
    if !flavour.is_native() {
        return Ok(());
    }
    if req.inputs.iter().any(|i| matches!(i, Input::Tokens(_))) {
        return Err(invalid(
            Some("input"),
            format!(
                "'$.input' is invalid: {} models take texts, not token arrays.",
                flavour.name()
            ),
        ));
    }
    let mut params = VendorParams::default();
    for (name, value) in std::mem::take(&mut req.extra) {
        if value.get() == "null" {
            continue;
        }
        match (flavour, name.as_str()) {
            (Flavour::Cohere | Flavour::Voyage, "input_type") => {
                let allowed = match flavour {
                    Flavour::Cohere => COHERE_INPUT_TYPES,
                    _ => VOYAGE_INPUT_TYPES,
                };
                params.input_type = Some(one_of(&value, allowed, "input_type")?);
            }
            (Flavour::Bedrock, "input_type") if req.model.starts_with("cohere.embed") => {
                params.input_type = Some(one_of(&value, COHERE_INPUT_TYPES, "input_type")?);
            }
            (Flavour::Gemini, "task_type" | "taskType") => {
                params.input_type = Some(one_of(&value, GEMINI_TASK_TYPES, "task_type")?);
            }
            (Flavour::Cohere, "truncate") => {
                params.truncate = Some(one_of(&value, COHERE_TRUNCATE, "truncate")?);
            }
            (Flavour::Bedrock, "truncate") if req.model.starts_with("cohere.embed") => {
                params.truncate = Some(one_of(&value, COHERE_TRUNCATE, "truncate")?);
            }
            (Flavour::Voyage, "truncation") => {
                params.truncation = Some(boolean(&value, "truncation")?);
            }
            (Flavour::Bedrock, "normalize") if req.model.starts_with("amazon.titan-embed") => {
                params.normalize = Some(boolean(&value, "normalize")?);
            }
            (Flavour::Cohere | Flavour::Voyage, "output_dimension")
            | (Flavour::Gemini, "output_dimensionality" | "outputDimensionality") => {
                set_dimensions(req, &value, "output_dimension")?;
            }
            (Flavour::Voyage, "output_dtype") => {
                params.output = value_type(&value, "output_dtype")?;
            }
            (Flavour::Cohere, "embedding_types") => {
                if !matches!(
                    value.get().replace(' ', "").as_str(),
                    "[\"float\"]" | "\"float\""
                ) {
                    return Err(invalid(
                        None,
                        "Only float embeddings are served in OpenAI's format; ask POST /v2/embed \
                         for int8, uint8, binary or ubinary.",
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    None,
                    format!(
                        "Unrecognized request argument supplied: {name} (not a parameter of {} \
                         models).",
                        flavour.name()
                    ),
                ));
            }
        }
    }
    canonical(flavour, &req.model, &mut params);
    finish(req, params);
    Ok(())
}

/// The vendor's defaults for `model`, written out.
pub fn canonical(flavour: Flavour, model: &str, params: &mut VendorParams) {
    let titan = model.starts_with("amazon.titan-embed");
    match flavour {
        Flavour::Bedrock if titan => {
            params.normalize.get_or_insert(true);
        }
        Flavour::Cohere | Flavour::Bedrock => {
            params
                .input_type
                .get_or_insert_with(|| COHERE_DEFAULT_INPUT_TYPE.to_owned());
            params
                .truncate
                .get_or_insert_with(|| COHERE_DEFAULT_TRUNCATE.to_owned());
        }
        Flavour::Voyage => {
            params.truncation.get_or_insert(true);
        }
        _ => {}
    }
}

/// Sets the canonical parameters and the key fields they make.
pub fn finish(req: &mut EmbeddingRequest, params: VendorParams) {
    req.extra = params.key_fields();
    req.vendor = params;
}

fn set_dimensions(
    req: &mut EmbeddingRequest,
    value: &RawValue,
    param: &'static str,
) -> Result<(), InvalidRequest> {
    let d = match serde_json::from_str::<u32>(value.get()) {
        Ok(d) if d > 0 => d,
        _ => {
            return Err(invalid(
                Some(param),
                format!(
                    "Invalid '{param}': {} is not a positive integer.",
                    value.get()
                ),
            ));
        }
    };
    if req.dimensions.is_some_and(|given| given != d) {
        return Err(invalid(
            Some(param),
            format!("'dimensions' and '{param}' disagree."),
        ));
    }
    req.dimensions = Some(d);
    Ok(())
}

pub fn one_of(
    value: &RawValue,
    allowed: &[&str],
    param: &'static str,
) -> Result<String, InvalidRequest> {
    match serde_json::from_str::<String>(value.get()) {
        Ok(s) if allowed.contains(&s.as_str()) => Ok(s),
        _ => Err(invalid(
            Some(param),
            format!(
                "Invalid '{param}': {} is not one of {}.",
                value.get(),
                allowed.join(", ")
            ),
        )),
    }
}

fn boolean(value: &RawValue, param: &'static str) -> Result<bool, InvalidRequest> {
    serde_json::from_str::<bool>(value.get()).map_err(|_| {
        invalid(
            Some(param),
            format!("Invalid '{param}': {} is not a boolean.", value.get()),
        )
    })
}

pub fn value_type(value: &RawValue, param: &'static str) -> Result<ValueType, InvalidRequest> {
    serde_json::from_str::<&str>(value.get())
        .ok()
        .and_then(ValueType::from_name)
        .ok_or_else(|| {
            invalid(
                Some(param),
                format!(
                    "Invalid '{param}': {} is not one of float, int8, uint8, binary, ubinary.",
                    value.get()
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Limits, parse_request};

    const LIMITS: Limits = crate::protocol::TEST_LIMITS;

    fn adopted(flavour: Flavour, body: &str) -> Result<EmbeddingRequest, InvalidRequest> {
        let mut req = parse_request(body.as_bytes(), LIMITS).expect("valid OpenAI body");
        adopt(flavour, &mut req).map(|()| req)
    }

    #[test]
    fn cohere_defaults_are_written_out() {
        let plain = adopted(Flavour::Cohere, r#"{"model":"m","input":"x"}"#).expect("ok");
        let explicit = adopted(
            Flavour::Cohere,
            r#"{"model":"m","input":"x","input_type":"search_document","truncate":"END"}"#,
        )
        .expect("ok");
        assert_eq!(plain.extra.len(), 2);
        assert_eq!(plain.vendor, explicit.vendor);
        let query = adopted(
            Flavour::Cohere,
            r#"{"model":"m","input":"x","input_type":"search_query","output_dimension":256}"#,
        )
        .expect("ok");
        assert_ne!(query.vendor, plain.vendor);
        assert_eq!(query.dimensions, Some(256));
    }

    #[test]
    fn refuses_what_the_vendor_does_not_take() {
        for (flavour, body) in [
            (Flavour::Cohere, r#"{"model":"m","input":[[1,2]]}"#),
            (
                Flavour::Cohere,
                r#"{"model":"m","input":"x","input_type":"query"}"#,
            ),
            (
                Flavour::Cohere,
                r#"{"model":"m","input":"x","embedding_types":["int8"]}"#,
            ),
            (
                Flavour::Gemini,
                r#"{"model":"m","input":"x","input_type":"query"}"#,
            ),
            (
                Flavour::Voyage,
                r#"{"model":"m","input":"x","output_dtype":"int4"}"#,
            ),
            (
                Flavour::Voyage,
                r#"{"model":"m","input":"x","truncation":"yes"}"#,
            ),
            (
                Flavour::Voyage,
                r#"{"model":"m","input":"x","dimensions":256,"output_dimension":512}"#,
            ),
        ] {
            assert!(adopted(flavour, body).is_err(), "{body}");
        }
        let nulls = r#"{"model":"m","input":"x","input_type":null,"output_dimension":null,
            "output_dtype":"int8","truncation":true}"#;
        let voyage = adopted(Flavour::Voyage, nulls).expect("nulls are absent");
        assert_eq!(voyage.vendor.output, ValueType::Int8);
        assert_eq!(voyage.vendor.truncation, Some(true));
    }
}

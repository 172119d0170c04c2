//! Amazon Bedrock's InvokeModel, `POST {base}/model/{modelId}/invoke`, for
//! Titan text embeddings (one text a call; `dimensions`, `normalize`) and
//! Cohere on Bedrock (Cohere's fields without `model`), signed with SigV4
//! by the `aws-sigv4` crate from the AWS environment variables.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value, json};

use super::{Endpoint, Parsed, WireRequest, cohere, estimate_tokens, f32_bytes, texts};
use crate::vendor::EmbedCall;

/// The header Bedrock reports a call's input tokens in.
const INPUT_TOKENS: &str = "x-amzn-bedrock-input-token-count";

/// Which body a Bedrock model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Titan,
    Cohere,
}

impl Family {
    pub fn of(model: &str) -> Option<Family> {
        if model.starts_with("amazon.titan-embed") {
            Some(Family::Titan)
        } else if model.starts_with("cohere.embed") {
            Some(Family::Cohere)
        } else {
            None
        }
    }

    pub fn max_inputs(model: &str) -> usize {
        match Family::of(model) {
            Some(Family::Cohere) => cohere::MAX_TEXTS,
            _ => 1,
        }
    }
}

/// The gateway's AWS credentials and region, from `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` and `AWS_REGION` (or
/// `AWS_DEFAULT_REGION`).
pub struct Signer {
    identity: Identity,
    region: String,
}

impl Signer {
    pub fn from_env() -> Option<Signer> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let credentials = Credentials::new(
            var("AWS_ACCESS_KEY_ID")?,
            var("AWS_SECRET_ACCESS_KEY")?,
            var("AWS_SESSION_TOKEN"),
            None,
            "environment",
        );
        Some(Signer {
            identity: credentials.into(),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION"))?,
        })
    }

    /// The headers signing a `POST url` of `body` (JSON) for `bedrock`.
    fn sign(&self, url: &str, body: &[u8]) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("bedrock")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| format!("signing: {e}"))?
            .into();
        let headers = [("content-type", "application/json")];
        let signable =
            SignableRequest::new("POST", url, headers.into_iter(), SignableBody::Bytes(body))
                .map_err(|e| format!("signing: {e}"))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| format!("signing: {e}"))?
            .into_parts();
        instructions
            .headers()
            .map(|(name, value)| {
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
                let mut value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
                value.set_sensitive(true);
                Ok((name, value))
            })
            .collect()
    }
}

fn url(endpoint: &Endpoint, model: &str) -> String {
    format!(
        "{}/model/{}/invoke",
        endpoint.base_url,
        percent_encoding::utf8_percent_encode(model, super::PATH_SEGMENT)
    )
}

pub fn request(endpoint: &Endpoint, call: &EmbedCall<'_>) -> Result<WireRequest, String> {
    let body = match Family::of(call.model) {
        Some(Family::Titan) => {
            let [text] = texts(call)?[..] else {
                return Err("titan embeds one text a call".to_owned());
            };
            let mut body = Map::new();
            body.insert("inputText".into(), text.into());
            if let Some(d) = call.dimensions {
                body.insert("dimensions".into(), d.into());
            }
            if let Some(n) = call.params.normalize {
                body.insert("normalize".into(), n.into());
            }
            Value::Object(body)
        }
        Some(Family::Cohere) => cohere::body(call, false)?,
        None => return Err(format!("{} is not a bedrock embeddings model", call.model)),
    };
    let url = url(endpoint, call.model);
    let body = body.to_string();
    let signer = endpoint.signer.as_ref().ok_or("no AWS credentials")?;
    let headers = signer.sign(&url, body.as_bytes())?;
    Ok(WireRequest {
        url,
        body: body.into(),
        headers,
    })
}

pub fn parse(body: &[u8], headers: &HeaderMap, call: &EmbedCall<'_>) -> Result<Parsed, String> {
    let answer: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an embeddings answer: {e}"))?;
    let reported = headers
        .get(INPUT_TOKENS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match Family::of(call.model) {
        Some(Family::Titan) => {
            let values: Option<Vec<f64>> = answer["embedding"]
                .as_array()
                .and_then(|v| v.iter().map(Value::as_f64).collect());
            let values = values.ok_or("no embedding in the answer")?;
            Ok(Parsed {
                vectors: vec![(0, f32_bytes(&values))],
                prompt_tokens: answer["inputTextTokenCount"].as_u64().or(reported),
            })
        }
        _ => Ok(Parsed {
            vectors: cohere::vectors(&answer["embeddings"], call.params.output)?,
            prompt_tokens: match reported {
                Some(tokens) => Some(tokens),
                None => Some(texts(call)?.into_iter().map(estimate_tokens).sum()),
            },
        }),
    }
}

/// An empty call for probing is never made: Bedrock upstreams are paid by
/// the gateway's credentials only (forward mode refuses them).
pub fn probe(endpoint: &Endpoint, model: &str) -> WireRequest {
    WireRequest {
        url: url(endpoint, model),
        body: json!({}).to_string().into(),
        headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_sigv4() {
        let signer = Signer {
            identity: Credentials::new("AKIDEXAMPLE", "secret", Some("tok".into()), None, "t")
                .into(),
            region: "us-east-1".into(),
        };
        let headers = signer
            .sign(
                "http://127.0.0.1:9/model/amazon.titan-embed-text-v2%3A0/invoke",
                b"{}",
            )
            .expect("signs");
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.as_str() == name)
                .and_then(|(_, v)| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let auth = get("authorization");
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            "{auth}"
        );
        assert!(auth.contains("/us-east-1/bedrock/aws4_request"), "{auth}");
        assert!(auth.contains("Signature="), "{auth}");
        assert_eq!(get("x-amz-date").len(), 16);
        assert_eq!(get("x-amz-security-token"), "tok");
    }

    #[test]
    fn knows_its_models() {
        assert_eq!(
            Family::of("amazon.titan-embed-text-v2:0"),
            Some(Family::Titan)
        );
        assert_eq!(Family::of("cohere.embed-english-v3"), Some(Family::Cohere));
        assert_eq!(Family::of("anthropic.claude"), None);
        assert_eq!(Family::max_inputs("amazon.titan-embed-text-v2:0"), 1);
    }
}

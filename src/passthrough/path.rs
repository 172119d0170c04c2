//! Which vendor URL a passthrough path may reach. The path after `/v1` is
//! joined to `upstream.base_url`, and the URL parser resolves dot segments
//! (`..`, and `%2e%2e` in any case) after that join: left in, they would
//! climb out of the base path to any route of the vendor's host, carrying
//! the gateway's key. So they are refused, and so are encoded slashes and
//! backslashes, which a server on the way may take as segment boundaries.
//! The path is decoded once only, as the vendor decodes it: `%252e` reaches
//! it as the literal segment `%2e`.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use reqwest::Url;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("dot segments (`.` and `..`, raw or percent-encoded) are not passed through")]
    DotSegment,
    #[error("encoded slashes and backslashes are not passed through")]
    Separator,
    #[error("the path does not form a valid URL with the vendor's base URL")]
    NotAUrl,
    #[error("the path leaves the vendor's base path")]
    Escapes,
}

/// Checks `rest`, the request path after `/v1`, segment by segment, and
/// returns it percent-decoded (once), for matching against the allowlist.
/// Empty segments (`//`, a trailing `/`) are kept: they cannot climb.
pub fn check(rest: &str) -> Result<Vec<u8>, PathError> {
    let mut decoded = Vec::with_capacity(rest.len());
    for (i, segment) in rest.split('/').enumerate() {
        let bytes: Cow<'_, [u8]> = percent_decode_str(segment).into();
        if bytes.iter().any(|b| matches!(b, b'/' | b'\\')) {
            return Err(PathError::Separator);
        }
        if matches!(&*bytes, b"." | b"..") {
            return Err(PathError::DotSegment);
        }
        if i > 0 {
            decoded.push(b'/');
        }
        decoded.extend_from_slice(&bytes);
    }
    Ok(decoded)
}

/// The URL to call for `rest` (checked by [`check`]) and `query`: `base`
/// followed by them, parsed, and still on `base`'s origin under its path.
/// The parsed URL is what is sent, so what was checked is what goes out.
pub fn join(base: &str, rest: &str, query: Option<&str>) -> Result<Url, PathError> {
    let base = Url::parse(base).map_err(|_| PathError::NotAUrl)?;
    let base_path = base.path().trim_end_matches('/');
    let mut joined = format!("{}{rest}", base.as_str().trim_end_matches('/'));
    if let Some(query) = query {
        joined.push('?');
        joined.push_str(query);
    }
    let url = Url::parse(&joined).map_err(|_| PathError::NotAUrl)?;
    let under_base = url
        .path()
        .strip_prefix(base_path)
        .is_some_and(|r| r.is_empty() || r.starts_with('/'));
    if url.origin() == base.origin() && under_base {
        Ok(url)
    } else {
        Err(PathError::Escapes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_refused_raw_and_encoded_in_any_case() {
        for rest in [
            "/..",
            "/../admin",
            "/../../admin/keys",
            "/.",
            "/./models",
            "/files/../../admin",
            "/%2e%2e/anything",
            "/%2E%2E/anything",
            "/%2e%2E/x",
            "/.%2e/x",
            "/%2e./x",
            "/%2e/x",
            "/models/%2e%2e",
        ] {
            assert_eq!(check(rest), Err(PathError::DotSegment), "{rest}");
        }
    }

    #[test]
    fn encoded_separators_are_refused() {
        for rest in [
            "/files%2f..%2fadmin",
            "/files%2F..%2Fadmin",
            "/a%5c..%5cadmin",
            "/a%5C..",
            "/a\\..\\admin",
            "/%2f",
        ] {
            assert_eq!(check(rest), Err(PathError::Separator), "{rest}");
        }
    }

    #[test]
    fn ordinary_paths_pass_decoded_once() {
        assert_eq!(check("").as_deref(), Ok(&b""[..]));
        assert_eq!(check("/models").as_deref(), Ok(&b"/models"[..]));
        assert_eq!(
            check("/files/file-abc/content").as_deref(),
            Ok(&b"/files/file-abc/content"[..])
        );
        assert_eq!(check("/%6dodels").as_deref(), Ok(&b"/models"[..]));
        // Decoded once: the vendor sees the literal segment `%2e%2e`.
        assert_eq!(check("/%252e%252e/x").as_deref(), Ok(&b"/%2e%2e/x"[..]));
        assert_eq!(check("/models/").as_deref(), Ok(&b"/models/"[..]));
        assert_eq!(check("//models").as_deref(), Ok(&b"//models"[..]));
        assert_eq!(check("/...").as_deref(), Ok(&b"/..."[..]));
        assert_eq!(check("/a..b").as_deref(), Ok(&b"/a..b"[..]));
    }

    #[test]
    fn joined_urls_stay_under_the_base_path() {
        let base = "http://vendor.test:8000/v1";
        let url = join(base, "/models/x", Some("a=1")).expect("inside");
        assert_eq!(url.as_str(), "http://vendor.test:8000/v1/models/x?a=1");
        assert_eq!(
            join(base, "", None).expect("base").as_str(),
            "http://vendor.test:8000/v1"
        );
        // What `check` refuses would also be caught here.
        for rest in ["/../admin", "/%2e%2e/admin", "/./../x"] {
            assert_eq!(join(base, rest, None), Err(PathError::Escapes), "{rest}");
        }
        // A prefix that is not a whole segment is not under the base.
        assert_eq!(
            join("http://vendor.test/v1", "/../v1x/a", None),
            Err(PathError::Escapes)
        );
        // The literal `%2e%2e` left by one decoding is not a dot segment.
        let url = join(base, "/%252e%252e/x", None).expect("inside");
        assert_eq!(url.path(), "/v1/%252e%252e/x");
        // A base URL without a path.
        let url = join("http://vendor.test", "/models", None).expect("inside");
        assert_eq!(url.as_str(), "http://vendor.test/models");
        // Nor can anything move the request to another host.
        assert_eq!(
            join("http://vendor.test", "@evil.test/x", None),
            Err(PathError::Escapes)
        );
    }
}

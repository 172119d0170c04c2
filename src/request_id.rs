//! Request ids: every answer carries `x-request-id`, the caller's own when
//! it sent a sane one, else a fresh one; and every request runs in a
//! `request` span carrying it (when [`SPAN_TARGET`] is logged at DEBUG), so
//! each log line it causes (lookups, vendor calls, writes) names the
//! request.
//!
//! A hand-written layer rather than tower-http's request-id layers: those
//! keep whatever a caller sends (any length, any bytes), and the span would
//! take a third layer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The vendor's own id for the call that answered (passthrough, vendor
/// errors): ours takes `x-request-id`.
pub const X_VENDOR_REQUEST_ID: HeaderName = HeaderName::from_static("x-vendor-request-id");

/// The target of the `request` span: `RUST_LOG=info,embgate::request=debug`
/// turns it on alone.
pub const SPAN_TARGET: &str = "embgate::request";

/// Longest caller id kept; a longer one is replaced.
pub const MAX_LEN: usize = 128;

/// Makes fresh ids: 32 hex digits, a random per-process half and a counter
/// passed through a keyed bijection, so ids never repeat within a process,
/// are unlikely to across processes, and do not show how many requests
/// came before. Nothing secret goes in.
struct Ids {
    prefix: [u8; 16],
    key: u64,
    counter: AtomicU64,
}

impl Ids {
    fn new() -> Ids {
        let mut prefix = [0; 16];
        hex(rand::random::<u64>(), &mut prefix);
        Ids {
            prefix,
            key: rand::random(),
            counter: AtomicU64::new(0),
        }
    }

    fn fresh(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0; 32];
        id[..16].copy_from_slice(&self.prefix);
        hex(mix(n.wrapping_add(self.key)), &mut id[16..]);
        HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// SplitMix64's finaliser: a bijection on u64 that scatters neighbours.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hex(v: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, d) in out.iter_mut().enumerate().take(16) {
        *d = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// A caller's id is kept when it is 1 to [`MAX_LEN`] visible ASCII
/// characters: anything else could break log lines or bloat them.
pub fn is_sane(id: &HeaderValue) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty() && bytes.len() <= MAX_LEN && bytes.iter().all(u8::is_ascii_graphic)
}

/// The id of a request: the caller's when sane, else a fresh one.
fn choose(ids: &Ids, headers: &HeaderMap) -> HeaderValue {
    match headers.get(X_REQUEST_ID) {
        Some(id) if is_sane(id) => id.clone(),
        _ => ids.fresh(),
    }
}

#[derive(Clone)]
pub struct RequestIdLayer {
    ids: Arc<Ids>,
}

impl RequestIdLayer {
    pub fn new() -> Self {
        RequestIdLayer {
            ids: Arc::new(Ids::new()),
        }
    }
}

impl Default for RequestIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId {
            inner,
            ids: Arc::clone(&self.ids),
        }
    }
}

#[derive(Clone)]
pub struct RequestId<S> {
    inner: S,
    ids: Arc<Ids>,
}

impl<S> Service<Request> for RequestId<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Stamped<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let id = choose(&self.ids, request.headers());
        // DEBUG, so that it costs nothing unless asked for: an enabled span
        // is formatted, stored and entered on every poll, several times the
        // cost of the id itself. The field values are only worked out then.
        let span = tracing::debug_span!(
            target: SPAN_TARGET,
            "request",
            // Checked or made here: visible ASCII either way.
            id = %id.to_str().unwrap_or_default(),
            method = %request.method(),
            route = %route(&request),
        );
        Stamped {
            inner: self.inner.call(request).instrument(span),
            id: Some(id),
        }
    }
}

/// The matched route, or the path of an unrouted (passthrough) request.
fn route(request: &Request) -> &str {
    request
        .extensions()
        .get::<MatchedPath>()
        .map_or(request.uri().path(), MatchedPath::as_str)
}

pin_project! {
    /// A route's response future, whose answer gets the request's id.
    pub struct Stamped<F> {
        #[pin]
        inner: Instrumented<F>,
        id: Option<HeaderValue>,
    }
}

impl<F> Future for Stamped<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(never) => match never {},
        };
        if let Some(id) = this.id.take() {
            stamp(response.headers_mut(), id);
        }
        Poll::Ready(Ok(response))
    }
}

/// Sets our id on an answer. One already there came from the vendor (a
/// passthrough answer keeps the vendor's headers): it moves to
/// [`X_VENDOR_REQUEST_ID`].
fn stamp(headers: &mut HeaderMap, id: HeaderValue) {
    if let Some(vendor) = headers.insert(X_REQUEST_ID, id) {
        headers.insert(X_VENDOR_REQUEST_ID, vendor);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn fresh_ids_are_distinct_hex() {
        let ids = Ids::new();
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let id = ids.fresh();
            assert_eq!(id.len(), 32);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
            assert!(is_sane(&id));
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn a_sane_caller_id_is_kept_and_others_replaced() {
        let ids = Ids::new();
        let with = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(
                X_REQUEST_ID,
                HeaderValue::from_bytes(v).expect("a header value"),
            );
            choose(&ids, &h)
        };
        assert_eq!(with(b"trace-42/abc"), "trace-42/abc");
        let long = [b'a'; MAX_LEN];
        assert_eq!(with(&long).as_bytes(), &long[..]);
        for bad in [
            &[b'a'; MAX_LEN + 1][..],
            b"with space",
            b"tab\there",
            b"caf\xc3\xa9",
        ] {
            let got = with(bad);
            assert_eq!(got.len(), 32, "{bad:?} replaced");
            assert_ne!(got.as_bytes(), bad);
        }
        assert_eq!(choose(&ids, &HeaderMap::new()).len(), 32);
    }

    #[test]
    fn the_vendors_id_moves_aside() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("req_vendor"));
        stamp(&mut h, HeaderValue::from_static("ours"));
        assert_eq!(h[X_REQUEST_ID], "ours");
        assert_eq!(h[X_VENDOR_REQUEST_ID], "req_vendor");
    }
}

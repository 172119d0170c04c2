//! Limits checked before a route runs: a declared body too large is refused
//! unread ([`DeclaredLengthLayer`]), and requests beyond the bound in
//! flight are shed at once ([`ShedLayer`]), never queued.
//!
//! The shedding is tower's `LoadShed` over a global `ConcurrencyLimit` in
//! effect, hand-written because those report overload as an error that
//! axum's `HandleErrorLayer` maps, and that layer boxes every request's
//! future; here a request costs one `try_acquire` on the semaphore.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::error::ApiError;

/// Answers 413 to a request whose `Content-Length` is above the limit,
/// without reading its body (hyper then closes the connection rather than
/// read what is left). Bodies without one are bounded as they are read.
#[derive(Clone)]
pub struct DeclaredLengthLayer {
    max_body_bytes: usize,
}

impl DeclaredLengthLayer {
    pub fn new(max_body_bytes: usize) -> Self {
        DeclaredLengthLayer { max_body_bytes }
    }
}

impl<S> Layer<S> for DeclaredLengthLayer {
    type Service = DeclaredLength<S>;

    fn layer(&self, inner: S) -> DeclaredLength<S> {
        DeclaredLength {
            inner,
            max_body_bytes: self.max_body_bytes,
        }
    }
}

#[derive(Clone)]
pub struct DeclaredLength<S> {
    inner: S,
    max_body_bytes: usize,
}

impl<S> Service<Request> for DeclaredLength<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // hyper has checked the header is one valid length.
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(n) if n > self.max_body_bytes as u64 => Either::Left(ready(Ok(
                ApiError::BodyTooLarge(self.max_body_bytes).into_response(),
            ))),
            _ => Either::Right(self.inner.call(request)),
        }
    }
}

/// Whether `error` (or what caused it) is a body cut at the limit as it was
/// read: a body without a declared length, streamed on to the vendor.
pub fn is_body_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Lets at most the semaphore's permits of requests run at once, across
/// every route it wraps; one more is answered 503 `overloaded` with
/// `Retry-After` right away. A request holds its permit until its answer's
/// head is ready (a streamed body may still be on its way).
#[derive(Clone)]
pub struct ShedLayer {
    in_flight: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(max_in_flight: usize) -> Self {
        ShedLayer {
            in_flight: Arc::new(Semaphore::new(max_in_flight.min(Semaphore::MAX_PERMITS))),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            in_flight: Arc::clone(&self.in_flight),
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    in_flight: Arc<Semaphore>,
}

impl<S> Service<Request> for Shed<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, Permitted<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match Arc::clone(&self.in_flight).try_acquire_owned() {
            Ok(permit) => Either::Right(Permitted {
                inner: self.inner.call(request),
                _permit: permit,
            }),
            Err(_) => Either::Left(ready(Ok(ApiError::Overloaded.into_response()))),
        }
    }
}

pin_project! {
    /// A route's response future holding its place among the requests in
    /// flight.
    pub struct Permitted<F> {
        #[pin]
        inner: F,
        _permit: OwnedSemaphorePermit,
    }
}

impl<F: Future> Future for Permitted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

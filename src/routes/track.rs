//! Counts and times every request by route (`embgate_http_*`).
//!
//! A tower layer rather than `middleware::from_fn`: that one clones the
//! boxed inner service and boxes a future on every request, and looked its
//! series up by label each time; here the series are resolved once and the
//! future is the route's own, wrapped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::metrics::{Metrics, RouteMetrics};

/// The `route` label of each routed path; anything unrouted is
/// `passthrough`.
const ROUTES: [&str; 10] = [
    "/v1/embeddings",
    "/model/{model}/invoke",
    "/v2/embed",
    "/v1beta/models/{spec}",
    "/v1/models/{spec}",
    "/metrics",
    "/healthz",
    "/readyz",
    "/admin/stats",
    "/admin/purge",
];

struct Routes {
    routed: [Arc<RouteMetrics>; ROUTES.len()],
    passthrough: Arc<RouteMetrics>,
    /// A routed path missing from `ROUTES`: counted, never dropped.
    other: Arc<RouteMetrics>,
}

impl Routes {
    fn of(&self, request: &Request) -> &Arc<RouteMetrics> {
        let Some(path) = request.extensions().get::<MatchedPath>() else {
            return &self.passthrough;
        };
        ROUTES
            .iter()
            .position(|r| *r == path.as_str())
            .map_or(&self.other, |i| &self.routed[i])
    }
}

#[derive(Clone)]
pub struct TrackLayer {
    routes: Arc<Routes>,
}

impl TrackLayer {
    pub fn new(metrics: &Metrics) -> Self {
        TrackLayer {
            routes: Arc::new(Routes {
                routed: ROUTES.map(|r| Arc::new(metrics.route(r))),
                passthrough: Arc::new(metrics.route("passthrough")),
                other: Arc::new(metrics.route("other")),
            }),
        }
    }
}

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            routes: Arc::clone(&self.routes),
        }
    }
}

#[derive(Clone)]
pub struct Track<S> {
    inner: S,
    routes: Arc<Routes>,
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let route = Arc::clone(self.routes.of(&request));
        Tracked {
            started: Instant::now(),
            inner: self.inner.call(request),
            route,
        }
    }
}

pin_project! {
    /// A route's response future, recorded when it completes (the response
    /// head is ready; a streamed body may still be on its way).
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        route: Arc<RouteMetrics>,
        started: Instant,
    }
}

impl<F> Future for Tracked<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(never) => match never {},
        };
        this.route.record(response.status(), this.started.elapsed());
        Poll::Ready(Ok(response))
    }
}

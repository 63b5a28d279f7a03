//! The policies as tower layers over `http::Request<B>` → `http::Response<R>` with
//! shoal's typed [`Error`]. [`crate::Scope::stack`] applies them in the order
//! Resilience4j uses: retry( breaker( rate limit( bulkhead( timeout( call ))))), so
//! every attempt passes the breaker and holds a bulkhead slot only while it runs.

use crate::breaker::{CircuitBreaker, Outcome};
use crate::bulkhead::Bulkhead;
use crate::metrics::ScopeHandles;
use crate::rate_limit::RateLimiter;
use http::{Request, Response};
use shoal_core::deadline::Deadline;
use shoal_core::{Error, ErrorKind, Origin};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

/// The boxed future of the policy services.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

/// What a call's result says about the dependency: a 5xx or an upstream error is a
/// failure; an error of our own making (a rejection, bad input) says nothing.
pub fn classify<R>(result: &Result<Response<R>, Error>) -> Outcome {
    match result {
        Ok(res) if res.status().is_server_error() => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(e) if e.origin() == Origin::Upstream => Outcome::Failure,
        Err(_) => Outcome::Ignored,
    }
}

/// Take the ready service and leave a clone in its place (tower's pattern for
/// services called from inside a future).
fn take<S: Clone>(svc: &mut S) -> S {
    let clone = svc.clone();
    std::mem::replace(svc, clone)
}

macro_rules! layer {
    ($(#[$m:meta])* $layer:ident, $svc:ident, $field:ident: $ty:ty) => {
        $(#[$m])*
        #[derive(Clone)]
        pub struct $layer {
            $field: $ty,
        }

        impl $layer {
            /// The layer; `None` makes it a pass-through.
            pub fn new($field: $ty) -> Self {
                Self { $field }
            }
        }

        impl<S> Layer<S> for $layer {
            type Service = $svc<S>;

            fn layer(&self, inner: S) -> $svc<S> {
                $svc {
                    inner,
                    $field: self.$field.clone(),
                }
            }
        }

        #[doc = concat!("The service of [`", stringify!($layer), "`].")]
        #[derive(Clone)]
        pub struct $svc<S> {
            inner: S,
            $field: $ty,
        }
    };
}

layer!(
    /// Fails calls fast while the breaker is open; reports each outcome to it.
    CircuitBreakerLayer, CircuitBreakerService, breaker: Option<Arc<CircuitBreaker>>
);

impl<S, B, R> Service<Request<B>> for CircuitBreakerService<S>
where
    S: Service<Request<B>, Response = Response<R>, Error = Error>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = Error;
    type Future = BoxFuture<Response<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(breaker) = &self.breaker else {
            return Box::pin(self.inner.call(req));
        };
        match breaker.try_acquire() {
            Err(e) => Box::pin(std::future::ready(Err(e))),
            Ok(permit) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let result = fut.await;
                    permit.record(classify(&result));
                    result
                })
            }
        }
    }
}

layer!(
    /// Waits for (or refuses) a token of the dependency's client-side rate limit.
    RateLimitLayer, RateLimitService, limiter: Option<(Arc<RateLimiter>, ScopeHandles)>
);

impl<S, B, R> Service<Request<B>> for RateLimitService<S>
where
    S: Service<Request<B>, Response = Response<R>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = Error;
    type Future = BoxFuture<Response<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some((limiter, handles)) = self.limiter.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let mut inner = take(&mut self.inner);
        Box::pin(async move {
            let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
            if let Err(e) = limiter.acquire(deadline).await {
                handles.rate_limited.inc();
                return Err(e);
            }
            inner.call(req).await
        })
    }
}

layer!(
    /// Holds a bulkhead slot for the length of each attempt; rejects when full.
    BulkheadLayer, BulkheadService, bulkhead: Option<(Arc<Bulkhead>, ScopeHandles)>
);

impl<S, B, R> Service<Request<B>> for BulkheadService<S>
where
    S: Service<Request<B>, Response = Response<R>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = Error;
    type Future = BoxFuture<Response<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some((bulkhead, handles)) = self.bulkhead.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let mut inner = take(&mut self.inner);
        Box::pin(async move {
            let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
            let slot = match bulkhead.acquire(deadline).await {
                Ok(s) => s,
                Err(e) => {
                    handles.bulkhead_rejected.inc();
                    return Err(e);
                }
            };
            let result = inner.call(req).await;
            drop(slot);
            result
        })
    }
}

layer!(
    /// Bounds each attempt by the attempt timeout and the call's deadline, whichever
    /// comes first.
    TimeoutLayer, TimeoutService, timeout: Duration
);

impl<S, B, R> Service<Request<B>> for TimeoutService<S>
where
    S: Service<Request<B>, Response = Response<R>, Error = Error>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = Error;
    type Future = BoxFuture<Response<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let attempt_end = tokio::time::Instant::now() + self.timeout;
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let (end, by_deadline) = match deadline {
            Some(d) if d <= attempt_end => (d, true),
            _ => (attempt_end, false),
        };
        let repeatable = crate::retry::safe_to_repeat(&req);
        let timeout = self.timeout;
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(end, fut).await {
                Ok(result) => result,
                // The caller gave up: no one is waiting for another attempt.
                Err(_) if by_deadline => Err(Error::new(
                    ErrorKind::Timeout,
                    Origin::Upstream,
                    "the call's deadline passed before an answer came",
                )
                .with_retryable(false)),
                Err(_) => Err(Error::new(
                    ErrorKind::Timeout,
                    Origin::Upstream,
                    format!("no answer within {} ms", timeout.as_millis()),
                )
                .with_retryable(repeatable)),
            }
        })
    }
}

/// Whether a failure is one a fallback stands in for: the dependency is down,
/// slow, overloaded or cut off by its breaker. A caller's own mistake (bad input,
/// not found, conflict) is never papered over.
pub fn falls_back(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::CircuitOpen
            | ErrorKind::Unavailable
            | ErrorKind::Timeout
            | ErrorKind::Overloaded
    )
}

/// Answers with `fallback(error)` when the call fails in a way [`falls_back`] accepts.
#[derive(Clone)]
pub struct FallbackLayer<F> {
    fallback: F,
}

impl<F> FallbackLayer<F> {
    /// A layer that calls `fallback` on failure.
    pub fn new(fallback: F) -> Self {
        Self { fallback }
    }
}

impl<S, F: Clone> Layer<S> for FallbackLayer<F> {
    type Service = FallbackService<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackService {
            inner,
            fallback: self.fallback.clone(),
        }
    }
}

/// The service of [`FallbackLayer`].
#[derive(Clone)]
pub struct FallbackService<S, F> {
    inner: S,
    fallback: F,
}

impl<S, F, Fut, Req, Res> Service<Req> for FallbackService<S, F>
where
    S: Service<Req, Response = Res, Error = Error>,
    S::Future: Send + 'static,
    F: Fn(Error) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Res, Error>> + Send + 'static,
    Res: Send + 'static,
{
    type Response = Res;
    type Error = Error;
    type Future = BoxFuture<Res>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        let fallback = self.fallback.clone();
        Box::pin(async move {
            match fut.await {
                Err(e) if falls_back(&e) => fallback(e).await,
                other => other,
            }
        })
    }
}

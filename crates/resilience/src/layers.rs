//! The policies as tower layers over `http::Request<B>` → `http::Response<R>` with
//! shoal's typed [`Error`]. [`crate::Scope::stack`] applies them in the order
//! Resilience4j uses: retry( breaker( rate limit( bulkhead( timeout( call ))))), so
//! every attempt passes the breaker and holds a bulkhead slot only while it runs.

use crate::breaker::Outcome;
use crate::Scope;
use http::{Request, Response};
use shoal_core::deadline::Deadline;
use shoal_core::{Error, ErrorKind, Origin};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

/// A request as the policy stack carries it: shared, so that keeping a copy for a
/// retry costs a reference count, not a copy of its headers.
pub type Shared<B> = Arc<Request<B>>;

/// The boxed future of the policy services.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

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

/// Applies a [`Scope`]'s per-attempt policy: the breaker lets the attempt in (or
/// fails it fast), the rate limiter gives it a token, the bulkhead a slot, and the
/// attempt runs within the attempt timeout and the call's deadline. Its outcome goes
/// back to the breaker. Put tower's `Retry` with a [`crate::RetryPolicy`] around it
/// (as [`Scope::stack`] does) so every attempt passes through all of this.
///
/// One layer rather than one per part, borrowing its scope for the call: a call
/// pays for one allocation and touches no shared reference count.
#[derive(Clone, Copy)]
pub struct PolicyLayer<'a> {
    scope: &'a Scope,
}

impl<'a> PolicyLayer<'a> {
    /// The layer of `scope`'s policy.
    pub fn new(scope: &'a Scope) -> Self {
        Self { scope }
    }
}

impl<'a, S> Layer<S> for PolicyLayer<'a> {
    type Service = PolicyService<'a, S>;

    fn layer(&self, inner: S) -> PolicyService<'a, S> {
        PolicyService {
            inner,
            scope: self.scope,
        }
    }
}

/// The service of [`PolicyLayer`].
#[derive(Clone)]
pub struct PolicyService<'a, S> {
    inner: S,
    scope: &'a Scope,
}

impl<'a, S, B, R> Service<Shared<B>> for PolicyService<'a, S>
where
    S: Service<Shared<B>, Response = Response<R>, Error = Error> + Clone + Send + 'a,
    S::Future: Send + 'a,
    B: Send + Sync + 'a,
    R: Send + 'a,
{
    type Response = Response<R>;
    type Error = Error;
    type Future = BoxFuture<'a, Response<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Shared<B>) -> Self::Future {
        // tower's pattern for a service called from inside a future: take the one
        // that was made ready, leave a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let scope = self.scope;
        Box::pin(async move {
            let mut permit = match &scope.breaker {
                Some(b) => Some(b.try_acquire()?),
                None => None,
            };
            let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
            if let Some(limiter) = &scope.limiter {
                if let Err(e) = limiter.acquire(deadline).await {
                    scope.handles.rate_limited.inc();
                    return Err(e);
                }
            }
            let _slot = match &scope.bulkhead {
                Some(b) => match b.acquire(deadline).await {
                    Ok(slot) => Some(slot),
                    Err(e) => {
                        scope.handles.bulkhead_rejected.inc();
                        return Err(e);
                    }
                },
                None => None,
            };
            if let Some(p) = permit.as_mut() {
                p.start_clock();
            }
            let result = within_time(inner.call(req), scope.timeout, deadline).await;
            if let Some(p) = permit {
                p.record(classify(&result));
            }
            result
        })
    }
}

/// Run one attempt within `timeout` and the call's `deadline`, whichever ends
/// first. A passed deadline is final; an attempt timeout may be retried.
async fn within_time<T>(
    attempt: impl Future<Output = Result<T, Error>>,
    timeout: Duration,
    deadline: Option<tokio::time::Instant>,
) -> Result<T, Error> {
    let attempt_end = tokio::time::Instant::now() + timeout;
    let (end, by_deadline) = match deadline {
        Some(d) if d <= attempt_end => (d, true),
        _ => (attempt_end, false),
    };
    match tokio::time::timeout_at(end, attempt).await {
        Ok(result) => result,
        // The caller gave up: no one is waiting for another attempt.
        Err(_) if by_deadline => Err(Error::new(
            ErrorKind::Timeout,
            Origin::Upstream,
            "the call's deadline passed before an answer came",
        )
        .with_retryable(false)),
        // Whether the request may be repeated is the retry policy's question.
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            Origin::Upstream,
            format!("no answer within {} ms", timeout.as_millis()),
        )),
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
    type Future = BoxFuture<'static, Res>;

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

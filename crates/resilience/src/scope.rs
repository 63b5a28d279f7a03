//! The policies in force in one process: a [`Scope`] per dependency (and per route
//! where configured) holding that scope's breaker, bulkhead, rate limiter and retry
//! budget, made on first use and shared by every call to it.
//!
//! Scopes live as long as the process: one is made per dependency name and
//! configured route (names come from code and config, never from requests), and
//! none is ever dropped. Calls therefore borrow them (`&'static Scope`) and count
//! no references; a thread-local cache finds them without taking a lock. Both
//! matter when many threads call one dependency: every shared counter a call
//! touches is a cache line the cores pass between them.

use crate::breaker::{BreakerName, CircuitBreaker};
use crate::bulkhead::Bulkhead;
use crate::config::{PolicyConfig, ResilienceConfig};
use crate::layers::{PolicyLayer, PolicyService};
use crate::metrics::{ResilienceMetrics, ScopeHandles};
use crate::rate_limit::RateLimiter;
use crate::retry::{RetryPolicy, RetryShared};
use shoal_core::deadline::Deadline;
use shoal_core::resilience::BreakerInfo;
use shoal_core::Error;
use shoal_telemetry::Metrics;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tower::retry::Retry;
use tower::Layer;

/// The policies of one process; cheap to clone.
#[derive(Clone)]
pub struct Resilience {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tells this `Resilience`'s entries apart in the thread-local cache.
    id: u64,
    cfg: ResilienceConfig,
    owner: String,
    default_timeout: Duration,
    metrics: Option<ResilienceMetrics>,
    dependencies: RwLock<HashMap<String, &'static DependencyScopes>>,
    routes: RwLock<HashMap<(String, String), &'static Scope>>,
}

struct DependencyScopes {
    base: &'static Scope,
    /// Longest prefix first.
    routes: Vec<(String, &'static Scope)>,
}

impl DependencyScopes {
    fn pick(&self, path: &str) -> &'static Scope {
        self.routes
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|(_, s)| *s)
            .unwrap_or(self.base)
    }
}

/// Entries kept per thread in the lookup cache.
const CACHE_ENTRIES: usize = 32;

thread_local! {
    /// Recently used dependencies: (resilience id, name, scopes), newest last.
    static RECENT: RefCell<Vec<(u64, Box<str>, &'static DependencyScopes)>> =
        const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One scope's policy and shared state.
pub struct Scope {
    dependency: Arc<str>,
    route: Option<String>,
    policy_name: String,
    pub(crate) timeout: Duration,
    deadline: Option<Duration>,
    pub(crate) retry: Option<RetryShared>,
    pub(crate) breaker: Option<CircuitBreaker>,
    pub(crate) bulkhead: Option<Bulkhead>,
    pub(crate) limiter: Option<RateLimiter>,
    pub(crate) handles: ScopeHandles,
}

/// The full policy stack around a service `S`.
pub type Stack<'a, S> = Retry<RetryPolicy<'a>, PolicyService<'a, S>>;

impl Resilience {
    /// The policies of `cfg` (checked here), for a process called `owner` (listed
    /// with its breakers). `default_timeout` is the attempt timeout of policies
    /// that set none.
    pub fn new(
        cfg: ResilienceConfig,
        owner: &str,
        default_timeout: Duration,
        metrics: Option<&Metrics>,
    ) -> Result<Self, Error> {
        cfg.validate("resilience")?;
        Ok(Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                cfg,
                owner: owner.to_string(),
                default_timeout,
                metrics: metrics.map(ResilienceMetrics::register),
                dependencies: RwLock::new(HashMap::new()),
                routes: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// The metric families, for the fault injector of the same process.
    pub fn metrics(&self) -> Option<&ResilienceMetrics> {
        self.inner.metrics.as_ref()
    }

    /// The scope of a call to `dependency` at `path`: the dependency's own, or a
    /// route's where its config names one for this path.
    pub fn scope(&self, dependency: &str, path: &str) -> &'static Scope {
        let id = self.inner.id;
        let cached = RECENT.with(|r| {
            r.borrow()
                .iter()
                .rev()
                .find(|(i, name, _)| *i == id && &**name == dependency)
                .map(|(_, _, s)| *s)
        });
        if let Some(scopes) = cached {
            return scopes.pick(path);
        }
        let found = self
            .inner
            .dependencies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(dependency)
            .copied();
        let scopes = found.unwrap_or_else(|| self.make_dependency(dependency));
        RECENT.with(|r| {
            let mut r = r.borrow_mut();
            if r.len() == CACHE_ENTRIES {
                r.remove(0);
            }
            r.push((id, dependency.into(), scopes));
        });
        scopes.pick(path)
    }

    /// The scope of a gateway route: its own breaker and state under `policy`.
    pub fn route_scope(&self, dependency: &str, route: &str, policy: &str) -> &'static Scope {
        let key = (dependency.to_string(), route.to_string());
        if let Some(s) = self
            .inner
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return s;
        }
        let mut map = self.inner.routes.write().unwrap_or_else(|p| p.into_inner());
        map.entry(key)
            .or_insert_with(|| leak(self.make_scope(dependency, Some(route), policy)))
    }

    fn make_dependency(&self, dependency: &str) -> &'static DependencyScopes {
        let mut map = self
            .inner
            .dependencies
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(dependency) {
            return s;
        }
        let cfg = &self.inner.cfg;
        let dep = cfg.dependencies.get(dependency);
        let policy = dep
            .and_then(|d| d.policy.clone())
            .unwrap_or_else(|| cfg.default_policy.clone());
        let mut routes: Vec<(String, &'static Scope)> = dep
            .map(|d| {
                d.routes
                    .iter()
                    .map(|r| {
                        (
                            r.prefix.clone(),
                            leak(self.make_scope(dependency, Some(&r.prefix), &r.policy)),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        let scopes: &'static DependencyScopes = Box::leak(Box::new(DependencyScopes {
            base: leak(self.make_scope(dependency, None, &policy)),
            routes,
        }));
        map.insert(dependency.to_string(), scopes);
        scopes
    }

    fn make_scope(&self, dependency: &str, route: Option<&str>, policy_name: &str) -> Scope {
        // Names were checked by `validate`; an unknown one can only come from a
        // gateway route checked by the gateway. Fall back to no policy, loudly.
        let policy = self.inner.cfg.policy(policy_name).unwrap_or_else(|| {
            tracing::error!(
                policy = policy_name,
                "unknown resilience policy; using none"
            );
            PolicyConfig::default()
        });
        let m = self.inner.metrics.as_ref();
        let handles = m.map(|m| m.scope(dependency, route)).unwrap_or_default();
        Scope {
            dependency: Arc::from(dependency),
            route: route.map(str::to_string),
            policy_name: policy_name.to_string(),
            timeout: policy
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(self.inner.default_timeout),
            deadline: policy.deadline_ms.map(Duration::from_millis),
            retry: policy.retry.clone().map(RetryShared::new),
            breaker: policy.circuit_breaker.clone().map(|b| {
                CircuitBreaker::new(
                    b,
                    BreakerName {
                        owner: self.inner.owner.clone(),
                        dependency: dependency.to_string(),
                        route: route.map(str::to_string),
                        policy: policy_name.to_string(),
                    },
                    m.map(|m| m.breaker(dependency, route)),
                )
            }),
            bulkhead: policy
                .bulkhead
                .as_ref()
                .map(|b| Bulkhead::new(b, dependency)),
            limiter: policy
                .rate_limit
                .as_ref()
                .map(|r| RateLimiter::new(r, dependency)),
            handles,
        }
    }

    /// Every breaker made so far, ordered by dependency and route.
    pub fn breakers(&self) -> Vec<BreakerInfo> {
        let mut out = Vec::new();
        for d in self
            .inner
            .dependencies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            out.extend(d.base.breaker.as_ref().map(|b| b.snapshot()));
            for (_, s) in &d.routes {
                out.extend(s.breaker.as_ref().map(|b| b.snapshot()));
            }
        }
        for s in self
            .inner
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            out.extend(s.breaker.as_ref().map(|b| b.snapshot()));
        }
        out.sort_by(|a, b| (&a.dependency, &a.route).cmp(&(&b.dependency, &b.route)));
        out
    }
}

/// `GET /ops/breakers`: this process's breakers, for the control plane's listing.
pub fn ops_routes(resilience: Resilience) -> axum::Router {
    axum::Router::new().route(
        "/ops/breakers",
        axum::routing::get(move || {
            let r = resilience.clone();
            async move {
                axum::Json(shoal_core::resilience::BreakerList {
                    breakers: r.breakers(),
                    unreachable: Vec::new(),
                })
            }
        }),
    )
}

/// Give a scope the life of the process (see the module's note).
fn leak(scope: Scope) -> &'static Scope {
    Box::leak(Box::new(scope))
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

impl Scope {
    /// The service it guards.
    pub fn dependency(&self) -> &str {
        &self.dependency
    }

    /// The service it guards, shared.
    pub fn dependency_arc(&self) -> Arc<str> {
        self.dependency.clone()
    }

    /// The route it is scoped to.
    pub fn route(&self) -> Option<&str> {
        self.route.as_deref()
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &str {
        &self.policy_name
    }

    /// Its breaker, if the policy has one.
    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_ref()
    }

    /// Its bulkhead, if the policy has one.
    pub fn bulkhead(&self) -> Option<&Bulkhead> {
        self.bulkhead.as_ref()
    }

    /// The deadline of a call started now: the policy's own, or the caller's
    /// (`outer`) if that is sooner.
    pub fn deadline(&self, outer: Option<Deadline>) -> Option<Deadline> {
        Deadline::earliest(outer, self.deadline.map(Deadline::after))
    }

    /// Wrap `inner` (one attempt at the dependency) in this scope's policy for one
    /// call: retry( breaker( rate limit( bulkhead( timeout( inner ))))). Put the
    /// call's [`Deadline`] in the request's extensions before sharing the request
    /// ([`crate::Shared`]).
    pub fn stack<S>(&self, inner: S) -> Stack<'_, S> {
        Retry::new(
            RetryPolicy::begin(self),
            PolicyLayer::new(self).layer(inner),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BreakerConfig, RetryConfig};
    use crate::Shared;
    use http::{Request, Response};
    use shoal_core::ErrorKind;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;
    use tower::Service;
    use tower::ServiceExt;

    fn resilience(policy: PolicyConfig) -> Resilience {
        let mut cfg = ResilienceConfig::default();
        cfg.policies.insert("p".into(), policy);
        cfg.default_policy = "p".into();
        Resilience::new(cfg, "test", Duration::from_secs(10), None).unwrap()
    }

    /// An upstream that answers `status` after `delay`, counting calls.
    fn upstream(
        status: u16,
        delay: Duration,
        calls: Arc<AtomicU32>,
    ) -> impl Service<Shared<()>, Response = Response<()>, Error = Error, Future: Send>
           + Clone
           + Send
           + 'static {
        tower::service_fn(move |_req: Shared<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                Response::builder()
                    .status(status)
                    .body(())
                    .map_err(|e| Error::internal("response").with_source(e))
            }
        })
    }

    async fn call(
        r: &Resilience,
        req: Request<()>,
        up: impl Service<Shared<()>, Response = Response<()>, Error = Error, Future: Send>
            + Clone
            + Send
            + 'static,
    ) -> Result<Response<()>, Error> {
        let scope = r.scope("dep", req.uri().path());
        let mut req = req;
        if let Some(d) = scope.deadline(req.extensions().get::<Deadline>().copied()) {
            req.extensions_mut().insert(d);
        }
        scope.stack(up).oneshot(Arc::new(req)).await
    }

    fn get() -> Request<()> {
        Request::get("/x").body(()).unwrap()
    }

    fn retry(max_attempts: u32) -> RetryConfig {
        RetryConfig {
            max_attempts,
            base_delay_ms: 100,
            max_delay_ms: 1_000,
            ..RetryConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_follow_the_backoff_schedule_then_return_the_last_answer() {
        let r = resilience(PolicyConfig {
            retry: Some(retry(4)),
            ..PolicyConfig::default()
        });
        let calls = Arc::new(AtomicU32::new(0));
        let start = Instant::now();
        let res = call(&r, get(), upstream(503, Duration::ZERO, calls.clone()))
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Three backoffs, each within its full-jitter range: < 100 + 200 + 400 ms.
        assert!(
            start.elapsed() < Duration::from_millis(700),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unsafe_requests_and_caller_errors_are_not_retried() {
        let r = resilience(PolicyConfig {
            retry: Some(retry(4)),
            ..PolicyConfig::default()
        });
        let calls = Arc::new(AtomicU32::new(0));
        let post = Request::post("/x").body(()).unwrap();
        call(&r, post, upstream(503, Duration::ZERO, calls.clone()))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "POST without a key");
        let keyed = Request::post("/x")
            .header(shoal_core::headers::IDEMPOTENCY_KEY, "k")
            .body(())
            .unwrap();
        call(&r, keyed, upstream(503, Duration::ZERO, calls.clone()))
            .await
            .unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "POST with a key: 4 attempts"
        );
        call(&r, get(), upstream(404, Duration::ZERO, calls.clone()))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 6, "a 404 is an answer");
    }

    #[tokio::test(start_paused = true)]
    async fn attempt_timeout_then_retry_then_deadline() {
        let r = resilience(PolicyConfig {
            timeout_ms: Some(300),
            deadline_ms: Some(1_000),
            retry: Some(RetryConfig {
                max_attempts: 10,
                base_delay_ms: 1,
                max_delay_ms: 1,
                ..RetryConfig::default()
            }),
            ..PolicyConfig::default()
        });
        let calls = Arc::new(AtomicU32::new(0));
        let start = Instant::now();
        let e = call(
            &r,
            get(),
            upstream(200, Duration::from_secs(60), calls.clone()),
        )
        .await
        .unwrap_err();
        // 300 + 300 + 300 ms of attempts, then the 1 s deadline cuts the fourth.
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(!e.is_retryable(), "a passed deadline is final");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1_000) && took < Duration::from_millis(1_010),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_caller_deadline_means_no_attempt_past_it() {
        let r = resilience(PolicyConfig {
            retry: Some(retry(3)),
            ..PolicyConfig::default()
        });
        let calls = Arc::new(AtomicU32::new(0));
        let mut req = get();
        req.extensions_mut()
            .insert(Deadline::after(Duration::from_millis(50)));
        let start = Instant::now();
        let res = call(
            &r,
            req,
            upstream(503, Duration::from_millis(40), calls.clone()),
        )
        .await;
        // The first attempt answers 503 at 40 ms; a retry could not finish by 50 ms
        // once its backoff is counted, or is cut at 50 ms.
        assert!(start.elapsed() <= Duration::from_millis(50));
        match res {
            Ok(r) => assert_eq!(r.status(), 503),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Timeout),
        }
        assert!(calls.load(Ordering::SeqCst) <= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_fails_fast_without_calling() {
        let r = resilience(PolicyConfig {
            circuit_breaker: Some(BreakerConfig {
                window_size: 10,
                minimum_calls: 5,
                open_ms: 1_000,
                half_open_calls: 1,
                ..BreakerConfig::default()
            }),
            ..PolicyConfig::default()
        });
        let calls = Arc::new(AtomicU32::new(0));
        for _ in 0..5 {
            let res = call(&r, get(), upstream(500, Duration::ZERO, calls.clone())).await;
            assert_eq!(res.unwrap().status(), 500);
        }
        let e = call(&r, get(), upstream(500, Duration::ZERO, calls.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CircuitOpen);
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(
            r.breakers()[0].state,
            shoal_core::resilience::BreakerState::Open
        );
        // After the open duration a healthy answer closes it.
        tokio::time::advance(Duration::from_millis(1_000)).await;
        call(&r, get(), upstream(200, Duration::ZERO, calls.clone()))
            .await
            .unwrap();
        assert_eq!(
            r.breakers()[0].state,
            shoal_core::resilience::BreakerState::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_retries_when_everything_fails() {
        let r = resilience(PolicyConfig {
            retry: Some(RetryConfig {
                max_attempts: 3,
                base_delay_ms: 1,
                max_delay_ms: 1,
                budget_percent: 10.0,
                budget_min_per_sec: 1,
                budget_window_ms: 10_000,
                ..RetryConfig::default()
            }),
            ..PolicyConfig::default()
        });
        let calls = Arc::new(AtomicU32::new(0));
        let n = 1_000;
        for _ in 0..n {
            call(&r, get(), upstream(503, Duration::ZERO, calls.clone()))
                .await
                .unwrap();
        }
        let made = calls.load(Ordering::SeqCst);
        // Without a budget: 3,000. With it: the calls, 10% more, and the reserve of
        // 1/s over the 10 s window.
        assert!(made >= n, "{made}");
        assert!(made <= n + n / 10 + 10, "{made} attempts for {n} calls");
    }

    #[tokio::test(start_paused = true)]
    async fn routes_get_their_own_scope() {
        let mut cfg = ResilienceConfig::default();
        cfg.dependencies.insert(
            "dep".into(),
            crate::config::DependencyConfig {
                policy: None,
                routes: vec![crate::config::RoutePolicy {
                    prefix: "/api/slow".into(),
                    policy: "none".into(),
                }],
            },
        );
        let r = Resilience::new(cfg, "test", Duration::from_secs(1), None).unwrap();
        assert_eq!(r.scope("dep", "/api/slow/1").route(), Some("/api/slow"));
        assert_eq!(r.scope("dep", "/api/slower").route(), None);
        assert_eq!(r.scope("dep", "/api/slower").policy_name(), "default");
        assert!(r.scope("dep", "/api/slow").breaker().is_none());
        assert!(
            r.scope("other", "/").breaker().is_some(),
            "the default policy"
        );
    }
}

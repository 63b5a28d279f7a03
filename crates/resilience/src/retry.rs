//! Retry: exponential backoff with full jitter, only for failures that may pass and
//! requests that are safe to repeat, within a retry budget (tower's model, see
//! [`crate::ShardedBudget`]) so a failing dependency never sees more than a bounded extra
//! load, and never past the call's deadline.

use crate::budget::ShardedBudget;
use crate::config::RetryConfig;
use crate::layers::Shared;
use crate::Scope;
use http::{Request, Response};
use shoal_core::deadline::Deadline;
use shoal_core::headers::IDEMPOTENCY_KEY;
use shoal_core::{Error, Origin};
use std::time::Duration;
use tower::retry::budget::Budget;

/// The backoff before retry number `retry` (1 for the first retry): uniform in
/// `[0, min(max, base * 2^(retry-1)))` ("full jitter"), so callers that failed
/// together do not retry together.
pub fn backoff(cfg: &RetryConfig, retry: u32, unit: f64) -> Duration {
    let exp = cfg
        .base_delay_ms
        .saturating_mul(1u64 << (retry.saturating_sub(1)).min(32));
    let cap = exp.min(cfg.max_delay_ms) as f64;
    Duration::from_micros((cap * 1000.0 * unit.clamp(0.0, 1.0)) as u64)
}

/// Whether a request may be sent twice: an idempotent method, or an idempotency key
/// the callee uses to recognise a repeat.
pub fn safe_to_repeat<B>(req: &Request<B>) -> bool {
    req.method().is_idempotent() || req.headers().contains_key(IDEMPOTENCY_KEY)
}

/// What the retries of one scope share: the config and the budget.
pub(crate) struct RetryShared {
    pub(crate) cfg: RetryConfig,
    pub(crate) budget: ShardedBudget,
}

impl RetryShared {
    pub(crate) fn new(cfg: RetryConfig) -> Self {
        let budget = ShardedBudget::new(
            Duration::from_millis(cfg.budget_window_ms),
            cfg.budget_min_per_sec,
            cfg.budget_percent / 100.0,
        );
        Self { cfg, budget }
    }
}

/// tower's retry policy for one call under a [`Scope`].
#[derive(Clone)]
pub struct RetryPolicy<'a> {
    scope: &'a Scope,
    attempts: u32,
}

impl<'a> RetryPolicy<'a> {
    /// The policy of one new call; the call is deposited in the scope's budget.
    pub fn begin(scope: &'a Scope) -> Self {
        if let Some(s) = &scope.retry {
            s.budget.deposit();
        }
        Self { scope, attempts: 1 }
    }
}

impl<B, R> tower::retry::Policy<Shared<B>, Response<R>, Error> for RetryPolicy<'_> {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Shared<B>,
        result: &mut Result<Response<R>, Error>,
    ) -> Option<Self::Future> {
        let shared = self.scope.retry.as_ref()?;
        let cfg = &shared.cfg;
        let worth_it = match result {
            Ok(res) => cfg.retry_on_status.contains(&res.status().as_u16()),
            // Only failures of the dependency: a local rejection (breaker open,
            // bulkhead full) or a caller error is not helped by trying again.
            Err(e) => e.is_retryable() && e.origin() == Origin::Upstream,
        };
        if !worth_it || self.attempts >= cfg.max_attempts {
            return None;
        }
        let delay = backoff(cfg, self.attempts, fastrand::f64());
        if let Some(d) = req.extensions().get::<Deadline>() {
            if d.remaining() <= delay {
                return None;
            }
        }
        if !shared.budget.withdraw() {
            self.scope.handles.budget_exhausted.inc();
            return None;
        }
        self.attempts += 1;
        self.scope.handles.retries.inc();
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, req: &Shared<B>) -> Option<Shared<B>> {
        let shared = self.scope.retry.as_ref()?;
        if shared.cfg.max_attempts <= 1 || !safe_to_repeat(req) {
            return None;
        }
        Some(req.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_capped_exponential() {
        let cfg = RetryConfig {
            base_delay_ms: 100,
            max_delay_ms: 1_000,
            ..RetryConfig::default()
        };
        // The cap of each retry's range: 100, 200, 400, 800, then 1000 forever.
        for (retry, cap) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            assert_eq!(backoff(&cfg, retry, 1.0), Duration::from_millis(cap));
            assert_eq!(backoff(&cfg, retry, 0.0), Duration::ZERO);
            assert_eq!(backoff(&cfg, retry, 0.5), Duration::from_millis(cap / 2));
        }
    }

    #[test]
    fn only_safe_requests_repeat() {
        let get = Request::get("/x").body(()).unwrap();
        let post = Request::post("/x").body(()).unwrap();
        let keyed = Request::post("/x")
            .header(IDEMPOTENCY_KEY, "k-1")
            .body(())
            .unwrap();
        assert!(safe_to_repeat(&get));
        assert!(!safe_to_repeat(&post));
        assert!(safe_to_repeat(&keyed));
    }
}

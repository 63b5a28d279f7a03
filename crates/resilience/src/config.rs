//! Policies in config: named bundles of timeout, retry, breaker, bulkhead and rate
//! limit (like Dapr's resiliency spec), attached to dependencies and routes. Every
//! table rejects unknown keys; [`ResilienceConfig::validate`] names the bad key.

use serde::Deserialize;
use shoal_core::Error;
use std::collections::BTreeMap;

/// Upper bounds that keep a typo from becoming an outage.
pub mod limits {
    /// Most attempts a retry policy may make (the first one included).
    pub const MAX_ATTEMPTS: u32 = 10;
    /// Longest timeout, deadline, backoff or open duration.
    pub const MAX_DURATION_MS: u64 = 3_600_000;
    /// Largest breaker window (calls or seconds).
    pub const MAX_WINDOW: u32 = 10_000;
    /// Largest bulkhead pool or queue.
    pub const MAX_BULKHEAD: usize = 100_000;
    /// Most named policies.
    pub const MAX_POLICIES: usize = 256;
}

/// The `[resilience]` table of a service's config (and `[gateway.resilience]`).
///
/// ```toml
/// [resilience.policies.payments]
/// timeout_ms = 800
/// retry = { max_attempts = 4, base_delay_ms = 50 }
/// circuit_breaker = { failure_rate_percent = 50, open_ms = 10000 }
/// bulkhead = { max_concurrent = 16, max_queue = 16 }
///
/// [resilience.dependencies.payment]
/// policy = "payments"
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Named policies. `default` and `none` are built in; defining either here
    /// replaces the built-in one.
    pub policies: BTreeMap<String, PolicyConfig>,
    /// The policy of dependencies not listed in `dependencies`.
    pub default_policy: String,
    /// Policies attached to dependencies (by service name), optionally per route.
    pub dependencies: BTreeMap<String, DependencyConfig>,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            policies: BTreeMap::new(),
            default_policy: "default".into(),
            dependencies: BTreeMap::new(),
        }
    }
}

/// One named policy. A part left out is off (no retry, no breaker, …), except the
/// attempt timeout, which falls back to the client's `timeout_ms`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Longest wait for one attempt's response head.
    pub timeout_ms: Option<u64>,
    /// Longest time for the whole call, retries and backoff included, when the
    /// caller's own deadline (from the request being served) is not sooner.
    pub deadline_ms: Option<u64>,
    /// Retry with backoff.
    pub retry: Option<RetryConfig>,
    /// Circuit breaker.
    pub circuit_breaker: Option<BreakerConfig>,
    /// Bounded concurrency and queue.
    pub bulkhead: Option<BulkheadConfig>,
    /// Client-side rate limit.
    pub rate_limit: Option<RateLimitConfig>,
}

/// Retry with exponential backoff and full jitter, within a retry budget.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The backoff before retry `n` (1 for the first) is uniform in
    /// `[0, min(max_delay, base_delay * 2^(n-1)))`.
    pub base_delay_ms: u64,
    /// Cap of the backoff.
    pub max_delay_ms: u64,
    /// Retries may add at most this share of the calls' load (on top of the reserve).
    pub budget_percent: f32,
    /// Retries per second always allowed, so a quiet caller can still retry.
    pub budget_min_per_sec: u32,
    /// How long a call counts towards the budget.
    pub budget_window_ms: u64,
    /// Answer statuses that are retried (besides connection failures and timeouts).
    pub retry_on_status: Vec<u16>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay_ms: 25,
            max_delay_ms: 1_000,
            budget_percent: 20.0,
            budget_min_per_sec: 10,
            budget_window_ms: 10_000,
            retry_on_status: vec![502, 503, 504],
        }
    }
}

/// How a breaker's sliding window is measured.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// The last `window_size` calls.
    #[default]
    Count,
    /// The calls of the last `window_size` seconds.
    Time,
}

/// A circuit breaker (the Resilience4j model).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Count- or time-based window.
    pub window: WindowKind,
    /// Calls (count) or seconds (time) in the window.
    pub window_size: u32,
    /// No verdict before this many calls are in the window.
    pub minimum_calls: u32,
    /// Open when this share of the window's calls failed (5xx, timeouts, unreachable).
    pub failure_rate_percent: f64,
    /// A call slower than this counts as slow; off when absent.
    pub slow_call_ms: Option<u64>,
    /// Open when this share of the window's calls was slow.
    pub slow_call_rate_percent: f64,
    /// How long it stays open before letting probes through.
    pub open_ms: u64,
    /// Probe calls let through when half-open; their outcome closes or reopens it.
    pub half_open_calls: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: WindowKind::Count,
            window_size: 50,
            minimum_calls: 20,
            failure_rate_percent: 50.0,
            slow_call_ms: None,
            slow_call_rate_percent: 100.0,
            open_ms: 5_000,
            half_open_calls: 3,
        }
    }
}

/// A bounded pool of concurrent calls with a bounded queue in front of it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BulkheadConfig {
    /// Calls in flight at once.
    pub max_concurrent: usize,
    /// Calls waiting for a slot; beyond it a call is rejected at once.
    pub max_queue: usize,
    /// Longest wait in the queue.
    pub max_queue_wait_ms: u64,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 128,
            max_queue: 128,
            max_queue_wait_ms: 1_000,
        }
    }
}

/// A client-side rate limit (token bucket).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained calls per second.
    pub per_second: u32,
    /// Calls allowed at once after a quiet period; `per_second` when absent.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Wait up to this long for a token instead of failing at once.
    #[serde(default)]
    pub max_wait_ms: u64,
}

/// The policies of one dependency.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DependencyConfig {
    /// Its policy; `default_policy` when absent.
    pub policy: Option<String>,
    /// Routes with a policy (and a breaker) of their own, matched by longest prefix.
    pub routes: Vec<RoutePolicy>,
}

/// A route of a dependency with its own policy.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutePolicy {
    /// Path prefix, on whole segments.
    pub prefix: String,
    /// The policy.
    pub policy: String,
}

impl ResilienceConfig {
    /// The built-in `default` policy: what a dependency gets unless configured.
    pub fn builtin_default() -> PolicyConfig {
        PolicyConfig {
            timeout_ms: None,
            deadline_ms: None,
            retry: Some(RetryConfig::default()),
            circuit_breaker: Some(BreakerConfig::default()),
            bulkhead: Some(BulkheadConfig::default()),
            rate_limit: None,
        }
    }

    /// The policy called `name`: a configured one, else a built-in one.
    pub fn policy(&self, name: &str) -> Option<PolicyConfig> {
        match self.policies.get(name) {
            Some(p) => Some(p.clone()),
            None if name == "default" => Some(Self::builtin_default()),
            None if name == "none" => Some(PolicyConfig::default()),
            None => None,
        }
    }

    /// Check every policy and reference; `at` is where this table sits in the
    /// config (`resilience`, `gateway.resilience`), so the message names the key.
    pub fn validate(&self, at: &str) -> Result<(), Error> {
        if self.policies.len() > limits::MAX_POLICIES {
            return Err(Error::config(format!(
                "{at}.policies: at most {} policies",
                limits::MAX_POLICIES
            )));
        }
        for (name, p) in &self.policies {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(Error::config(format!(
                    "{at}.policies.{name:?}: a policy name is letters, digits, '-' and '_'"
                )));
            }
            p.validate(&format!("{at}.policies.{name}"))?;
        }
        self.check_ref(&format!("{at}.default_policy"), &self.default_policy)?;
        for (dep, d) in &self.dependencies {
            shoal_core::names::validate_service_name(dep)
                .map_err(|e| Error::config(format!("{at}.dependencies.{dep}: {e}")))?;
            if let Some(p) = &d.policy {
                self.check_ref(&format!("{at}.dependencies.{dep}.policy"), p)?;
            }
            for (i, r) in d.routes.iter().enumerate() {
                let key = format!("{at}.dependencies.{dep}.routes[{i}]");
                validate_prefix(&format!("{key}.prefix"), &r.prefix)?;
                self.check_ref(&format!("{key}.policy"), &r.policy)?;
            }
        }
        Ok(())
    }

    /// `key` must name a policy that exists.
    pub fn check_ref(&self, key: &str, name: &str) -> Result<(), Error> {
        if self.policy(name).is_none() {
            return Err(Error::config(format!(
                "{key}: no policy called {name:?} (define it under policies, or use \"default\" or \"none\")"
            )));
        }
        Ok(())
    }
}

/// A route prefix: starts with '/', no trailing '/', plain segments.
pub(crate) fn validate_prefix(key: &str, prefix: &str) -> Result<(), Error> {
    let ok = prefix.starts_with('/')
        && (prefix == "/" || !prefix.ends_with('/'))
        && !prefix.contains("//");
    if !ok {
        return Err(Error::config(format!(
            "{key}: {prefix:?} must start with '/' and not end with '/'"
        )));
    }
    Ok(())
}

fn range<T: PartialOrd + std::fmt::Display>(key: &str, v: T, lo: T, hi: T) -> Result<(), Error> {
    if v < lo || v > hi {
        return Err(Error::config(format!(
            "{key}: {v} is out of range ({lo} to {hi})"
        )));
    }
    Ok(())
}

impl PolicyConfig {
    /// Check ranges; `at` names the policy's table.
    pub fn validate(&self, at: &str) -> Result<(), Error> {
        let max = limits::MAX_DURATION_MS;
        if let Some(t) = self.timeout_ms {
            range(&format!("{at}.timeout_ms"), t, 1, max)?;
        }
        if let Some(t) = self.deadline_ms {
            range(&format!("{at}.deadline_ms"), t, 1, max)?;
        }
        if let Some(r) = &self.retry {
            let at = format!("{at}.retry");
            range(
                &format!("{at}.max_attempts"),
                r.max_attempts,
                1,
                limits::MAX_ATTEMPTS,
            )?;
            range(&format!("{at}.base_delay_ms"), r.base_delay_ms, 1, max)?;
            range(
                &format!("{at}.max_delay_ms"),
                r.max_delay_ms,
                r.base_delay_ms,
                max,
            )?;
            range(
                &format!("{at}.budget_percent"),
                r.budget_percent,
                0.0,
                1000.0,
            )?;
            range(
                &format!("{at}.budget_window_ms"),
                r.budget_window_ms,
                1_000,
                60_000,
            )?;
            for s in &r.retry_on_status {
                range(&format!("{at}.retry_on_status"), *s, 400, 599)?;
            }
        }
        if let Some(b) = &self.circuit_breaker {
            let at = format!("{at}.circuit_breaker");
            range(
                &format!("{at}.window_size"),
                b.window_size,
                1,
                limits::MAX_WINDOW,
            )?;
            if b.window == WindowKind::Count {
                range(
                    &format!("{at}.minimum_calls"),
                    b.minimum_calls,
                    1,
                    b.window_size,
                )?;
            } else {
                range(&format!("{at}.minimum_calls"), b.minimum_calls, 1, u32::MAX)?;
            }
            range(
                &format!("{at}.failure_rate_percent"),
                b.failure_rate_percent,
                1.0,
                100.0,
            )?;
            range(
                &format!("{at}.slow_call_rate_percent"),
                b.slow_call_rate_percent,
                1.0,
                100.0,
            )?;
            if let Some(s) = b.slow_call_ms {
                range(&format!("{at}.slow_call_ms"), s, 1, max)?;
            }
            range(&format!("{at}.open_ms"), b.open_ms, 1, max)?;
            range(
                &format!("{at}.half_open_calls"),
                b.half_open_calls,
                1,
                1_000,
            )?;
        }
        if let Some(b) = &self.bulkhead {
            let at = format!("{at}.bulkhead");
            range(
                &format!("{at}.max_concurrent"),
                b.max_concurrent,
                1,
                limits::MAX_BULKHEAD,
            )?;
            range(
                &format!("{at}.max_queue"),
                b.max_queue,
                0,
                limits::MAX_BULKHEAD,
            )?;
            range(
                &format!("{at}.max_queue_wait_ms"),
                b.max_queue_wait_ms,
                0,
                max,
            )?;
        }
        if let Some(r) = &self.rate_limit {
            let at = format!("{at}.rate_limit");
            range(&format!("{at}.per_second"), r.per_second, 1, 10_000_000)?;
            if let Some(b) = r.burst {
                range(&format!("{at}.burst"), b, 1, 10_000_000)?;
            }
            range(&format!("{at}.max_wait_ms"), r.max_wait_ms, 0, max)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ResilienceConfig, Error> {
        let c: ResilienceConfig = toml::from_str(s).map_err(|e| Error::config(e.to_string()))?;
        c.validate("resilience")?;
        Ok(c)
    }

    #[test]
    fn a_full_policy_parses() {
        let c = parse(
            r#"
            [policies.pay]
            timeout_ms = 800
            deadline_ms = 5000
            retry = { max_attempts = 4, base_delay_ms = 50 }
            circuit_breaker = { window = "time", window_size = 10, minimum_calls = 5, slow_call_ms = 300 }
            bulkhead = { max_concurrent = 4, max_queue = 2 }
            rate_limit = { per_second = 100 }
            [dependencies.payment]
            policy = "pay"
            routes = [{ prefix = "/api/refunds", policy = "none" }]
            "#,
        )
        .unwrap();
        let p = c.policy("pay").unwrap();
        assert_eq!(p.retry.unwrap().max_attempts, 4);
        assert_eq!(p.circuit_breaker.unwrap().window, WindowKind::Time);
        assert!(c.policy("default").unwrap().circuit_breaker.is_some());
        assert_eq!(c.policy("none").unwrap(), PolicyConfig::default());
    }

    #[test]
    fn bad_policies_are_named() {
        for (toml, key) in [
            (
                "[policies.p]\nretry = { max_attempts = 0 }",
                "resilience.policies.p.retry.max_attempts",
            ),
            (
                "[policies.p]\ncircuit_breaker = { failure_rate_percent = 0 }",
                "resilience.policies.p.circuit_breaker.failure_rate_percent",
            ),
            (
                "[policies.p]\ncircuit_breaker = { window_size = 10, minimum_calls = 11 }",
                "resilience.policies.p.circuit_breaker.minimum_calls",
            ),
            (
                "[policies.p]\nbulkhead = { max_concurrent = 0 }",
                "resilience.policies.p.bulkhead.max_concurrent",
            ),
            (
                "[dependencies.payment]\npolicy = \"nope\"",
                "resilience.dependencies.payment.policy",
            ),
            ("default_policy = \"nope\"", "resilience.default_policy"),
            (
                "[dependencies.payment]\nroutes = [{ prefix = \"x\", policy = \"none\" }]",
                "resilience.dependencies.payment.routes[0].prefix",
            ),
        ] {
            let e = parse(toml).unwrap_err().to_string();
            assert!(e.starts_with(key), "{toml}: {e}");
        }
        let e = parse("[policies.p]\nretry = { attempts = 3 }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `attempts`"), "{e}");
    }
}

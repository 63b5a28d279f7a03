//! Resilience policies: what lets a call from one service to another survive a slow,
//! failing or dead dependency without taking the caller down.
//!
//! - [`CircuitBreaker`]: count- or time-based sliding window, minimum calls,
//!   failure-rate and slow-call-rate thresholds, open duration, limited half-open
//!   probes;
//! - retry ([`RetryPolicy`] for tower's `Retry`): exponential backoff with full
//!   jitter, retryable failures and repeatable requests only, within a retry budget,
//!   never past the deadline;
//! - timeouts per attempt plus a [`Deadline`](shoal_core::deadline::Deadline) per
//!   call that travels downstream in `x-shoal-deadline-ms`;
//! - [`Bulkhead`]: bounded concurrency and a bounded queue per dependency;
//! - [`RateLimiter`]: client-side rate limit per dependency;
//! - fallbacks: [`with_fallback`], [`LastGood`], [`FallbackLayer`];
//! - [`fault`]: run-time fault injection (delay, error, abort) for chaos tests;
//! - [`ResilienceConfig`]: named policies in TOML, attached to dependencies and routes.
//!
//! [`Resilience`] holds a process's policies and hands out a [`Scope`] per dependency
//! (or route); [`Scope::stack`] wraps one attempt in the whole policy as tower layers.
//! The SDK's service client and the gateway call through it the same way.

mod breaker;
mod budget;
mod bulkhead;
pub mod config;
mod fallback;
pub mod fault;
mod layers;
mod metrics;
mod rate_limit;
mod retry;
mod scope;

pub use breaker::{BreakerName, CircuitBreaker, Outcome, Permit};
pub use budget::ShardedBudget;
pub use bulkhead::{Bulkhead, Slot};
pub use config::{
    BreakerConfig, BulkheadConfig, DependencyConfig, PolicyConfig, RateLimitConfig,
    ResilienceConfig, RetryConfig, RoutePolicy, WindowKind,
};
pub use fallback::{with_fallback, LastGood};
pub use layers::{
    classify, falls_back, FallbackLayer, FallbackService, PolicyLayer, PolicyService, Shared,
};
pub use metrics::ResilienceMetrics;
pub use rate_limit::RateLimiter;
pub use retry::{backoff, safe_to_repeat, RetryPolicy};
pub use scope::{ops_routes, Resilience, Scope, Stack};

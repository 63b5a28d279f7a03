//! Client-side rate limiting per dependency: a token bucket (governor's GCRA) on
//! tokio's clock, so paused-time tests drive it like every other timer here.

use crate::config::RateLimitConfig;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;
use shoal_core::{Error, ErrorKind, Origin};
use std::num::NonZeroU32;
use std::time::Duration;
use tokio::time::Instant;

/// Governor's clock on tokio time (nanoseconds since the limiter was made).
#[derive(Clone, Debug)]
struct TokioClock(Instant);

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(Instant::now().saturating_duration_since(self.0))
    }
}

/// A rate limiter for calls to one dependency.
pub struct RateLimiter {
    limiter: governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>,
    clock: TokioClock,
    max_wait: Duration,
    dependency: String,
}

impl RateLimiter {
    /// A limiter with a full bucket.
    pub fn new(cfg: &RateLimitConfig, dependency: &str) -> Self {
        let per_second = NonZeroU32::new(cfg.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = cfg.burst.and_then(NonZeroU32::new).unwrap_or(per_second);
        let clock = TokioClock(Instant::now());
        Self {
            limiter: governor::RateLimiter::direct_with_clock(
                Quota::per_second(per_second).allow_burst(burst),
                clock.clone(),
            ),
            clock,
            max_wait: Duration::from_millis(cfg.max_wait_ms),
            dependency: dependency.to_string(),
        }
    }

    /// Take a token: now, or after a wait of at most `max_wait_ms` that ends before
    /// `deadline`; else an `Overloaded` error.
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<(), Error> {
        loop {
            let wait = match self.limiter.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => not_until.wait_time_from(self.clock.now()),
            };
            let wake = Instant::now() + wait;
            if wait > self.max_wait || deadline.is_some_and(|d| wake > d) {
                return Err(Error::new(
                    ErrorKind::Overloaded,
                    Origin::Internal,
                    format!(
                        "client rate limit for {} reached (next call allowed in {} ms)",
                        self.dependency,
                        wait.as_millis()
                    ),
                )
                .with_retryable(false));
            }
            tokio::time::sleep_until(wake).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate() {
        let r = RateLimiter::new(
            &RateLimitConfig {
                per_second: 10,
                burst: Some(3),
                max_wait_ms: 0,
            },
            "dep",
        );
        for _ in 0..3 {
            r.acquire(None).await.unwrap();
        }
        let e = r.acquire(None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Overloaded);
        tokio::time::advance(Duration::from_millis(100)).await;
        r.acquire(None).await.unwrap();
        assert!(r.acquire(None).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn waits_up_to_max_wait_but_not_past_the_deadline() {
        let r = RateLimiter::new(
            &RateLimitConfig {
                per_second: 10,
                burst: Some(1),
                max_wait_ms: 500,
            },
            "dep",
        );
        r.acquire(None).await.unwrap();
        let start = Instant::now();
        r.acquire(None).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(r.acquire(Some(soon)).await.is_err());
    }
}

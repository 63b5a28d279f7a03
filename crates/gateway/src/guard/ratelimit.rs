//! Per-client rate limiting: one GCRA bucket (governor's) per client key, in bounded memory.
//!
//! Keys come from clients (an address, a token's subject), so the table of buckets is the
//! one thing a client can grow at will. It is capped at `max_keys`: when a new key finds
//! the table full, idle keys (whose bucket has refilled, so forgetting them changes no
//! decision) are swept out, at most once per [`SWEEP_GAP`] because a sweep walks the
//! whole table under its lock. If the table is still full, the new key shares a single
//! overflow bucket with every other key that did not fit. That is the safe failure: a
//! flood of fresh keys is throttled as one client instead of growing memory or getting
//! through unlimited, at the price of newcomers sharing a budget until the flood's keys
//! go idle.
//!
//! A key is stored as a 64-bit keyed hash (SipHash with a per-limiter random key), not
//! as the string itself: entries stay small whatever the client sends, and nobody can
//! pick keys that collide on purpose. Two honest keys share a bucket with probability
//! about n²/2⁶⁵, which is never in practice.

use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::Quota;
use http::{header, HeaderValue, StatusCode};
use serde::Deserialize;
use shoal_core::ApiError;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Shortest time between two sweeps of idle keys: a sweep is O(`max_keys`) under the
/// table's lock, so a flood of new keys must not trigger one per request.
pub(crate) const SWEEP_GAP: Duration = Duration::from_secs(1);

/// A rate limit: `burst` requests at once, refilled at `per_second`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second one client key may make.
    pub per_second: u32,
    /// Requests one client key may make at once, before the sustained rate applies.
    pub burst: u32,
}

impl RateLimitConfig {
    /// Refuse a limit that would refuse everything, naming the config key `at`.
    pub(crate) fn validate(&self, at: &str) -> Result<(), shoal_core::Error> {
        if self.per_second == 0 || self.burst == 0 {
            return Err(shoal_core::Error::config(format!(
                "{at}: per_second and burst must be positive (got per_second = {}, burst = {})",
                self.per_second, self.burst
            )));
        }
        Ok(())
    }

    fn quota(&self) -> Quota {
        // Zeroes are refused by `validate`; should one slip through, the tightest real
        // limit (1) is the safe reading, not "no limit".
        let per_second = NonZeroU32::new(self.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN);
        Quota::per_second(per_second).allow_burst(burst)
    }
}

/// A per-key rate limiter; clones share the same buckets.
pub(crate) struct RateLimiter<C: Clock = DefaultClock> {
    inner: Arc<Inner<C>>,
}

impl<C: Clock> Clone for RateLimiter<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<C: Clock> {
    limiter: governor::RateLimiter<u64, Store, C, NoOpMiddleware<C::Instant>>,
    hasher: RandomState,
    /// Set by the store when a new key found the table full: a sweep is due.
    full: Arc<AtomicBool>,
    /// When the last sweep ran, in nanoseconds since `start`; [`NEVER`] before the first.
    last_sweep_ns: AtomicU64,
    start: C::Instant,
}

const NEVER: u64 = u64::MAX;

/// Whose bucket a request takes from: a signed-in subject's, else its address's.
/// Hashed as it is, so no key is formatted per request, and a subject never
/// shares a bucket with an address.
#[derive(Hash, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientKey<'a> {
    /// The token's `sub`.
    Subject(&'a str),
    /// The client's address (after trusted proxies).
    Address(std::net::IpAddr),
}

impl RateLimiter {
    /// A limiter applying `cfg` to each key, tracking at most `max_keys` keys (see the
    /// module doc for what happens beyond). `cfg` should have passed `validate`.
    pub(crate) fn new(cfg: &RateLimitConfig, max_keys: usize) -> Self {
        Self::with_clock(cfg, max_keys, DefaultClock::default())
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A limiter reading time from `clock` (tests pass a fake one).
    pub(crate) fn with_clock(cfg: &RateLimitConfig, max_keys: usize, clock: C) -> Self {
        let full = Arc::new(AtomicBool::new(false));
        let store = Store {
            slots: Mutex::new(Slots {
                keys: HashMap::new(),
                overflow: None,
            }),
            max_keys,
            full: Arc::clone(&full),
        };
        let start = clock.now();
        Self {
            inner: Arc::new(Inner {
                limiter: governor::RateLimiter::new(cfg.quota(), store, clock),
                hasher: RandomState::new(),
                full,
                last_sweep_ns: AtomicU64::new(NEVER),
                start,
            }),
        }
    }

    /// Take one request from `key`'s bucket; when it is empty, how long until one more
    /// request would pass. Keys are told apart by their hash (a [`ClientKey`] for
    /// the gateway's clients).
    pub(crate) fn check<K: Hash + ?Sized>(&self, key: &K) -> Result<(), Duration> {
        let inner = &*self.inner;
        inner.sweep_if_due();
        inner
            .limiter
            .check_key(&inner.hasher.hash_one(key))
            .map_err(|not_until| not_until.wait_time_from(inner.limiter.clock().now()))
    }

    /// How many keys have a bucket of their own now (for a gauge).
    pub(crate) fn tracked_keys(&self) -> usize {
        self.inner.limiter.len()
    }
}

impl<C: Clock> Inner<C> {
    fn sweep_if_due(&self) {
        if !self.full.load(Ordering::Relaxed) {
            return;
        }
        let now_ns = u64::from(self.limiter.clock().now().duration_since(self.start));
        let last = self.last_sweep_ns.load(Ordering::Relaxed);
        let gap_ns = u64::try_from(SWEEP_GAP.as_nanos()).unwrap_or(u64::MAX);
        if last != NEVER && now_ns.saturating_sub(last) < gap_ns {
            return;
        }
        // One caller wins the sweep; the others go on with their check.
        if self
            .last_sweep_ns
            .compare_exchange(last, now_ns, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // Cleared first, so a key that overflows during the sweep asks for the next one.
        self.full.store(false, Ordering::Relaxed);
        self.limiter.retain_recent();
    }
}

/// The bounded state store: each tracked key's theoretical arrival time (GCRA's state,
/// in nanoseconds since the limiter's start), plus the shared overflow bucket's.
struct Store {
    slots: Mutex<Slots>,
    max_keys: usize,
    full: Arc<AtomicBool>,
}

struct Slots {
    keys: HashMap<u64, Nanos>,
    overflow: Option<Nanos>,
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        // The map holds plain numbers, always consistent: a panic elsewhere while the
        // lock was held leaves nothing half-written, so poisoning is ignored.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StateStore for Store {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut slots = self.lock();
        let Slots { keys, overflow } = &mut *slots;
        if let Some(tat) = keys.get_mut(key) {
            let (outcome, next) = f(Some(*tat))?;
            *tat = next;
            return Ok(outcome);
        }
        if keys.len() < self.max_keys {
            // A refused request leaves no entry (a fresh bucket never refuses anyway).
            let (outcome, next) = f(None)?;
            keys.insert(*key, next);
            return Ok(outcome);
        }
        self.full.store(true, Ordering::Relaxed);
        let (outcome, next) = f(*overflow)?;
        *overflow = Some(next);
        Ok(outcome)
    }
}

impl ShrinkableKeyedStateStore<u64> for Store {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut slots = self.lock();
        // A bucket whose arrival time is that old has refilled: it is indistinguishable
        // from a fresh one.
        slots.keys.retain(|_, tat| *tat > drop_below);
        if slots.overflow.is_some_and(|tat| tat <= drop_below) {
            slots.overflow = None;
        }
    }

    fn shrink_to_fit(&self) {
        self.lock().keys.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.lock().keys.len()
    }

    fn is_empty(&self) -> bool {
        self.lock().keys.is_empty()
    }
}

/// The answer to a rate-limited request: 429, code `rate_limited`, and `Retry-After` in
/// whole seconds, rounded up and at least 1 (a client told 0 would retry at once).
pub(crate) fn too_many(retry_after: Duration) -> Response {
    let secs = retry_after
        .as_secs()
        .saturating_add(u64::from(retry_after.subsec_nanos() > 0))
        .max(1);
    let mut res = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests; retry after {secs} s"),
    )
    .into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter(
        per_second: u32,
        burst: u32,
        max_keys: usize,
    ) -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let cfg = RateLimitConfig { per_second, burst };
        (
            RateLimiter::with_clock(&cfg, max_keys, clock.clone()),
            clock,
        )
    }

    #[test]
    fn config_parses_strictly_and_refuses_zeroes() {
        let c: RateLimitConfig = toml::from_str("per_second = 5\nburst = 10\n").unwrap();
        assert_eq!(
            c,
            RateLimitConfig {
                per_second: 5,
                burst: 10
            }
        );
        c.validate("gateway.routes[0].rate_limit").unwrap();
        assert!(toml::from_str::<RateLimitConfig>("per_second = 5\nburts = 10\n").is_err());
        for (per_second, burst) in [(0, 1), (1, 0)] {
            let e = RateLimitConfig { per_second, burst }
                .validate("gateway.routes[0].rate_limit")
                .unwrap_err();
            assert!(
                e.message().starts_with("gateway.routes[0].rate_limit:"),
                "{e}"
            );
        }
    }

    #[test]
    fn burst_then_sustained_rate_with_exact_retry_after() {
        let (rl, clock) = limiter(1, 3, 100);
        for _ in 0..3 {
            rl.check("a").unwrap();
        }
        assert_eq!(rl.check("a"), Err(Duration::from_secs(1)));
        clock.advance(Duration::from_millis(400));
        assert_eq!(rl.check("a"), Err(Duration::from_millis(600)));
        clock.advance(Duration::from_millis(600));
        rl.check("a").unwrap();
        assert!(rl.check("a").is_err());
    }

    #[test]
    fn keys_have_separate_buckets_and_clones_share_them() {
        let (rl, _clock) = limiter(1, 1, 100);
        let other = rl.clone();
        rl.check("a").unwrap();
        assert!(other.check("a").is_err(), "a clone sees the same bucket");
        rl.check("b").unwrap();
        assert_eq!(rl.tracked_keys(), 2);
    }

    #[test]
    fn keys_beyond_the_cap_share_one_overflow_bucket() {
        let (rl, _clock) = limiter(1, 1, 2);
        rl.check("a").unwrap();
        rl.check("b").unwrap();
        // The table is full and nothing is idle: c and d share the overflow bucket.
        rl.check("c").unwrap();
        assert!(rl.check("d").is_err());
        assert!(rl.check("c").is_err());
        assert_eq!(rl.tracked_keys(), 2, "memory stays bounded");
        // The tracked keys keep their own budgets.
        assert!(rl.check("a").is_err());
    }

    #[test]
    fn idle_keys_are_swept_when_the_table_is_full() {
        let (rl, clock) = limiter(1, 1, 2);
        rl.check("a").unwrap();
        rl.check("b").unwrap();
        rl.check("c").unwrap(); // overflow; asks for a sweep
        clock.advance(Duration::from_secs(5)); // a and b refill: idle
        rl.check("d").unwrap(); // sweeps first, then d gets a bucket of its own
        assert_eq!(rl.tracked_keys(), 1);
        rl.check("e").unwrap();
        assert_eq!(rl.tracked_keys(), 2);
        assert!(rl.check("d").is_err());
        assert!(rl.check("e").is_err());
    }

    #[test]
    fn sweeps_are_spaced_out() {
        // 10 per second: a bucket refills 100 ms after its last use, well inside a gap.
        let (rl, clock) = limiter(10, 1, 1);
        let ms = |n| clock.advance(Duration::from_millis(n));
        rl.check("a").unwrap();
        rl.check("b").unwrap(); // overflow; asks for a sweep
        ms(1000);
        rl.check("c").unwrap(); // sweep at t = 1 s drops a; c takes the slot
        ms(500);
        rl.check("d").unwrap(); // the table is full (c): overflow, sweep requested
        ms(50);
        // c is idle by now, but the last sweep was 550 ms ago: e goes to the overflow
        // bucket that d just spent.
        assert!(rl.check("e").is_err());
        ms(550);
        // t = 2.1 s: a sweep may run again; it drops c, and f gets its own bucket.
        rl.check("f").unwrap();
        assert_eq!(rl.tracked_keys(), 1);
        assert!(rl.check("f").is_err());
    }

    #[test]
    fn no_room_at_all_means_one_shared_bucket() {
        let (rl, _clock) = limiter(1, 2, 0);
        rl.check("a").unwrap();
        rl.check("b").unwrap();
        assert!(rl.check("c").is_err());
        assert_eq!(rl.tracked_keys(), 0);
    }

    #[tokio::test]
    async fn too_many_says_when_to_retry_in_whole_seconds() {
        for (wait, header) in [
            (Duration::ZERO, "1"),
            (Duration::from_millis(1), "1"),
            (Duration::from_secs(1), "1"),
            (Duration::from_millis(1200), "2"),
            (Duration::from_secs(30), "30"),
        ] {
            let res = too_many(wait);
            assert_eq!(res.headers()[header::RETRY_AFTER], header, "{wait:?}");
            let e = crate::guard::tests::api_error(res).await;
            assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(e.code, "rate_limited");
            assert!(e.message.contains(&format!("{header} s")), "{}", e.message);
        }
    }
}

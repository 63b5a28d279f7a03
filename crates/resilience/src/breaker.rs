//! The circuit breaker: stops calling a dependency that keeps failing, so callers fail
//! fast instead of queueing behind it, and lets a few probe calls test whether it
//! has healed.
//!
//! The model is Resilience4j's: a count- or time-based sliding window of outcomes;
//! no verdict before `minimum_calls`; open when the failure rate or the slow-call
//! rate reaches its threshold; after `open_ms`, half-open with `half_open_calls`
//! probes whose rates decide between closed and open again.

use crate::config::{BreakerConfig, WindowKind};
use crate::metrics::BreakerHandles;
use shoal_core::resilience::{BreakerInfo, BreakerState};
use shoal_core::{Error, ErrorKind, Origin};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// What a call's result means to a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The dependency answered well.
    Success,
    /// The dependency failed: 5xx, timeout, unreachable.
    Failure,
    /// Says nothing about the dependency (a caller error, a local rejection, a
    /// cancelled call): not counted.
    Ignored,
}

/// Names a breaker in listings, logs and metrics.
#[derive(Clone, Debug)]
pub struct BreakerName {
    /// Process that owns it.
    pub owner: String,
    /// Service it guards.
    pub dependency: String,
    /// Route it is scoped to, if any.
    pub route: Option<String>,
    /// Policy that configured it.
    pub policy: String,
}

/// A circuit breaker; share it with `Arc`.
///
/// The closed state, where nearly every call is, takes no lock: letting a call in
/// reads one atomic, and a count window records its outcome with a few atomic
/// operations. Transitions, probes and time windows take the lock.
pub struct CircuitBreaker {
    /// `generation << 2 | state` of `inner`, mirrored at every transition.
    fast: AtomicU64,
    window: Window,
    cfg: BreakerConfig,
    slow_after: Option<Duration>,
    open_for: Duration,
    name: BreakerName,
    inner: Mutex<Inner>,
    metrics: Option<BreakerHandles>,
}

struct Inner {
    state: BreakerState,
    since: Instant,
    /// Grows on every transition; outcomes of calls let in under an older one are
    /// not counted (a call started while closed says nothing about a half-open probe).
    generation: u64,
    open_until: Instant,
    probes_issued: u32,
    probes: Tally,
    /// The outcomes that last opened it, shown while it is open.
    tripped_by: Tally,
}

#[derive(Clone, Copy, Default, Debug)]
struct Tally {
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Tally {
    fn add(&mut self, failed: bool, slow: bool) {
        self.calls += 1;
        self.failures += failed as u32;
        self.slow += slow as u32;
    }

    fn rates(&self) -> (f64, f64) {
        if self.calls == 0 {
            return (0.0, 0.0);
        }
        let c = self.calls as f64;
        (
            self.failures as f64 * 100.0 / c,
            self.slow as f64 * 100.0 / c,
        )
    }
}

enum Window {
    Count(CountRing),
    Time(Mutex<TimeBuckets>),
}

/// The last `len` outcomes, lock-free: each slot holds bit 0 failed, bit 1 slow,
/// bit 2 taken. The totals are kept beside the ring; two calls racing may make them
/// briefly off by one, never drift (each outcome is added once and removed once).
struct CountRing {
    slots: Box<[AtomicU8]>,
    next: AtomicU64,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl CountRing {
    fn new(len: usize) -> Self {
        Self {
            slots: (0..len.max(1)).map(|_| AtomicU8::new(0)).collect(),
            next: AtomicU64::new(0),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }

    fn record(&self, failed: bool, slow: bool) {
        // Add the new outcome before removing the one it replaces, so the totals
        // never go below what the ring holds.
        if failed {
            self.failures.fetch_add(1, Relaxed);
        }
        if slow {
            self.slow.fetch_add(1, Relaxed);
        }
        let i = self.next.fetch_add(1, Relaxed) % self.slots.len() as u64;
        let bits = 4 | failed as u8 | (slow as u8) << 1;
        let old = self.slots[i as usize].swap(bits, Relaxed);
        if old & 1 != 0 {
            self.failures.fetch_sub(1, Relaxed);
        }
        if old & 2 != 0 {
            self.slow.fetch_sub(1, Relaxed);
        }
    }

    fn totals(&self) -> Tally {
        let calls = self.next.load(Relaxed).min(self.slots.len() as u64) as u32;
        let clamp = |v: i64| v.clamp(0, calls as i64) as u32;
        Tally {
            calls,
            failures: clamp(self.failures.load(Relaxed)),
            slow: clamp(self.slow.load(Relaxed)),
        }
    }

    fn reset(&self) {
        for s in self.slots.iter() {
            s.store(0, Relaxed);
        }
        self.next.store(0, Relaxed);
        self.failures.store(0, Relaxed);
        self.slow.store(0, Relaxed);
    }
}

/// One bucket per second; a bucket whose second has passed out of the window is
/// reset before reuse.
struct TimeBuckets {
    start: Instant,
    buckets: Vec<(u64, Tally)>,
}

impl TimeBuckets {
    fn new(len: usize, now: Instant) -> Self {
        Self {
            start: now,
            buckets: vec![(u64::MAX, Tally::default()); len.max(1)],
        }
    }

    fn record(&mut self, failed: bool, slow: bool, now: Instant) {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let len = self.buckets.len() as u64;
        let b = &mut self.buckets[(sec % len) as usize];
        if b.0 != sec {
            *b = (sec, Tally::default());
        }
        b.1.add(failed, slow);
    }

    fn totals(&self, now: Instant) -> Tally {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let len = self.buckets.len() as u64;
        let mut t = Tally::default();
        for (s, b) in &self.buckets {
            if *s != u64::MAX && *s <= sec && sec - *s < len {
                t.calls += b.calls;
                t.failures += b.failures;
                t.slow += b.slow;
            }
        }
        t
    }
}

impl Window {
    fn new(cfg: &BreakerConfig, now: Instant) -> Self {
        let len = cfg.window_size.max(1) as usize;
        match cfg.window {
            WindowKind::Count => Window::Count(CountRing::new(len)),
            WindowKind::Time => Window::Time(Mutex::new(TimeBuckets::new(len, now))),
        }
    }

    /// Record an outcome and give the window's totals.
    fn record(&self, failed: bool, slow: bool) -> Tally {
        match self {
            Window::Count(ring) => {
                ring.record(failed, slow);
                ring.totals()
            }
            Window::Time(m) => {
                let now = Instant::now();
                let mut w = m.lock().unwrap_or_else(|p| p.into_inner());
                w.record(failed, slow, now);
                w.totals(now)
            }
        }
    }

    fn totals(&self, now: Instant) -> Tally {
        match self {
            Window::Count(ring) => ring.totals(),
            Window::Time(m) => m.lock().unwrap_or_else(|p| p.into_inner()).totals(now),
        }
    }

    fn reset(&self, now: Instant) {
        match self {
            Window::Count(ring) => ring.reset(),
            Window::Time(m) => {
                let mut w = m.lock().unwrap_or_else(|p| p.into_inner());
                *w = TimeBuckets::new(w.buckets.len(), now);
            }
        }
    }
}

fn encode(state: BreakerState, generation: u64) -> u64 {
    let s = match state {
        BreakerState::Closed => 0,
        BreakerState::Open => 1,
        BreakerState::HalfOpen => 2,
    };
    generation << 2 | s
}

/// Leave to make one call; report how it went with [`Permit::record`]. A permit
/// dropped without a record counts as [`Outcome::Ignored`] (the call was cancelled).
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    generation: u64,
    probe: bool,
    /// Only taken when slow calls are detected: a clock read costs.
    start: Option<Instant>,
    recorded: bool,
}

impl Permit<'_> {
    /// Measure the call's duration from now: waits in a rate limiter or bulkhead
    /// queue are not the dependency's slowness.
    pub fn start_clock(&mut self) {
        if self.start.is_some() {
            self.start = Some(Instant::now());
        }
    }

    /// Report the call's outcome; its duration is measured from the permit (or
    /// from [`Permit::start_clock`]).
    pub fn record(mut self, outcome: Outcome) {
        self.recorded = true;
        let elapsed = self.start.map(|s| s.elapsed()).unwrap_or_default();
        self.breaker
            .on_result(self.generation, self.probe, outcome, elapsed);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.on_result(
                self.generation,
                self.probe,
                Outcome::Ignored,
                Duration::ZERO,
            );
        }
    }
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig, name: BreakerName, metrics: Option<BreakerHandles>) -> Self {
        let now = Instant::now();
        if let Some(m) = &metrics {
            m.set_state(BreakerState::Closed);
        }
        Self {
            fast: AtomicU64::new(encode(BreakerState::Closed, 0)),
            window: Window::new(&cfg, now),
            slow_after: cfg.slow_call_ms.map(Duration::from_millis),
            open_for: Duration::from_millis(cfg.open_ms),
            cfg,
            name,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                since: now,
                generation: 0,
                open_until: now,
                probes_issued: 0,
                probes: Tally::default(),
                tripped_by: Tally::default(),
            }),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters, never broken invariants
        // that matter more than availability: keep going with them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its name.
    pub fn name(&self) -> &BreakerName {
        &self.name
    }

    /// Its state now (an open breaker whose time is up reports half-open).
    pub fn state(&self) -> BreakerState {
        let g = self.lock();
        if g.state == BreakerState::Open && Instant::now() >= g.open_until {
            BreakerState::HalfOpen
        } else {
            g.state
        }
    }

    /// Leave to call, or a `CircuitOpen` error at once.
    pub fn try_acquire(&self) -> Result<Permit<'_>, Error> {
        let start = self.slow_after.map(|_| Instant::now());
        let fast = self.fast.load(Acquire);
        if fast & 3 == 0 {
            // Closed, the common case: no lock, no clock. Should the breaker open
            // meanwhile, this call's generation is stale and its outcome not counted.
            return Ok(Permit {
                breaker: self,
                generation: fast >> 2,
                probe: false,
                start,
                recorded: false,
            });
        }
        let mut g = self.lock();
        let now = Instant::now();
        if g.state == BreakerState::Open && now >= g.open_until {
            self.transition(&mut g, BreakerState::HalfOpen, now, Tally::default());
        }
        let probe = match g.state {
            BreakerState::Closed => false,
            BreakerState::HalfOpen if g.probes_issued < self.cfg.half_open_calls => {
                g.probes_issued += 1;
                true
            }
            state => {
                let wait = g.open_until.saturating_duration_since(now);
                drop(g);
                if let Some(m) = &self.metrics {
                    m.rejected.inc();
                }
                let msg = if state == BreakerState::Open {
                    format!(
                        "circuit breaker for {} is open (retry in {} ms)",
                        self.name.dependency,
                        wait.as_millis()
                    )
                } else {
                    format!(
                        "circuit breaker for {} is half-open and its probes are in flight",
                        self.name.dependency
                    )
                };
                return Err(
                    Error::new(ErrorKind::CircuitOpen, Origin::Internal, msg).with_retryable(false)
                );
            }
        };
        Ok(Permit {
            breaker: self,
            generation: g.generation,
            probe,
            start,
            recorded: false,
        })
    }

    fn on_result(&self, generation: u64, probe: bool, outcome: Outcome, elapsed: Duration) {
        let fast = self.fast.load(Acquire);
        if fast >> 2 != generation {
            return;
        }
        let failed = outcome == Outcome::Failure;
        let slow = self.slow_after.is_some_and(|s| elapsed >= s);
        if !probe {
            // Let in while closed: counts in the window, no lock unless it trips.
            if outcome == Outcome::Ignored || fast & 3 != 0 {
                return;
            }
            let t = self.window.record(failed, slow);
            if t.calls >= self.cfg.minimum_calls && self.tripped(&t) {
                let mut g = self.lock();
                if g.generation == generation && g.state == BreakerState::Closed {
                    self.transition(&mut g, BreakerState::Open, Instant::now(), t);
                }
            }
            return;
        }
        let mut g = self.lock();
        if g.generation != generation || g.state != BreakerState::HalfOpen {
            return;
        }
        if outcome == Outcome::Ignored {
            // Hand the probe slot back so another call can test the dependency.
            g.probes_issued = g.probes_issued.saturating_sub(1);
            return;
        }
        g.probes.add(failed, slow);
        if g.probes.calls >= self.cfg.half_open_calls {
            let t = g.probes;
            let to = if self.tripped(&t) {
                BreakerState::Open
            } else {
                BreakerState::Closed
            };
            self.transition(&mut g, to, Instant::now(), t);
        }
    }

    fn tripped(&self, t: &Tally) -> bool {
        let (failure_rate, slow_rate) = t.rates();
        failure_rate >= self.cfg.failure_rate_percent
            || (self.slow_after.is_some() && slow_rate >= self.cfg.slow_call_rate_percent)
    }

    fn transition(&self, g: &mut Inner, to: BreakerState, now: Instant, outcomes: Tally) {
        let (failure_rate, slow_rate) = outcomes.rates();
        let from = g.state;
        g.state = to;
        g.since = now;
        g.generation += 1;
        g.probes_issued = 0;
        g.probes = Tally::default();
        match to {
            BreakerState::Open => {
                g.open_until = now + self.open_for;
                g.tripped_by = outcomes;
            }
            BreakerState::Closed => self.window.reset(now),
            BreakerState::HalfOpen => {}
        }
        // Published last: a call let in under the new generation sees a fresh window.
        self.fast.store(encode(to, g.generation), Release);
        if let Some(m) = &self.metrics {
            m.set_state(to);
            m.transition(from, to);
        }
        let n = &self.name;
        let route = n.route.as_deref().unwrap_or("");
        match to {
            BreakerState::Open => tracing::warn!(
                dependency = %n.dependency, route, policy = %n.policy,
                from = from.as_str(), failure_rate, slow_call_rate = slow_rate,
                open_ms = self.cfg.open_ms, "circuit breaker opened"
            ),
            _ => tracing::info!(
                dependency = %n.dependency, route, policy = %n.policy,
                from = from.as_str(), to = to.as_str(), "circuit breaker changed state"
            ),
        }
    }

    /// Its state and window, for listings.
    pub fn snapshot(&self) -> BreakerInfo {
        let now = Instant::now();
        let g = self.lock();
        let t = match g.state {
            BreakerState::Closed => self.window.totals(now),
            BreakerState::Open => g.tripped_by,
            BreakerState::HalfOpen => g.probes,
        };
        let (failure_rate, slow_call_rate) = t.rates();
        let state = if g.state == BreakerState::Open && now >= g.open_until {
            BreakerState::HalfOpen
        } else {
            g.state
        };
        BreakerInfo {
            owner: self.name.owner.clone(),
            dependency: self.name.dependency.clone(),
            route: self.name.route.clone(),
            policy: self.name.policy.clone(),
            state,
            calls: t.calls as u64,
            failure_rate,
            slow_call_rate,
            since_ms: now.saturating_duration_since(g.since).as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(cfg: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker::new(
            cfg,
            BreakerName {
                owner: "test".into(),
                dependency: "dep".into(),
                route: None,
                policy: "p".into(),
            },
            None,
        )
    }

    fn count_cfg() -> BreakerConfig {
        BreakerConfig {
            window: WindowKind::Count,
            window_size: 10,
            minimum_calls: 4,
            failure_rate_percent: 50.0,
            slow_call_ms: None,
            slow_call_rate_percent: 100.0,
            open_ms: 1_000,
            half_open_calls: 2,
        }
    }

    fn call(b: &CircuitBreaker, o: Outcome) -> Result<(), ErrorKind> {
        b.try_acquire().map(|p| p.record(o)).map_err(|e| e.kind())
    }

    #[tokio::test(start_paused = true)]
    async fn closed_to_open_needs_minimum_calls_and_rate() {
        let b = breaker(count_cfg());
        // Three failures: 100% but under the minimum of four calls.
        for _ in 0..3 {
            call(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        call(&b, Outcome::Success).unwrap();
        // Four calls, 75% failed: open.
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(call(&b, Outcome::Success), Err(ErrorKind::CircuitOpen));
    }

    #[tokio::test(start_paused = true)]
    async fn below_the_threshold_it_stays_closed_and_the_window_slides() {
        let b = breaker(count_cfg());
        // 4 of 10 failed: 40% < 50%.
        for i in 0..10 {
            let o = if i >= 6 {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            call(&b, o).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().calls, 10);
        // Ten successes push every failure out of the window.
        for _ in 0..10 {
            call(&b, Outcome::Success).unwrap();
        }
        assert_eq!(b.snapshot().failure_rate, 0.0);
        // Five failures in the last ten: 50%, open.
        for _ in 0..5 {
            call(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn open_then_half_open_then_closed_on_good_probes() {
        let b = breaker(count_cfg());
        for _ in 0..4 {
            call(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(call(&b, Outcome::Success), Err(ErrorKind::CircuitOpen));
        tokio::time::advance(Duration::from_millis(1)).await;
        // Half-open: two probes allowed, a third refused while they are in flight.
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        assert_eq!(b.snapshot().state, BreakerState::HalfOpen);
        assert_eq!(
            b.try_acquire().err().map(|e| e.kind()),
            Some(ErrorKind::CircuitOpen)
        );
        p1.record(Outcome::Success);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        p2.record(Outcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().calls, 0, "closing starts a fresh window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_open_duration() {
        let b = breaker(count_cfg());
        for _ in 0..4 {
            call(&b, Outcome::Failure).unwrap();
        }
        tokio::time::advance(Duration::from_millis(1_000)).await;
        call(&b, Outcome::Failure).unwrap();
        call(&b, Outcome::Success).unwrap();
        // 50% of probes failed: open again, for the full open duration.
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(call(&b, Outcome::Success), Err(ErrorKind::CircuitOpen));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_gives_its_slot_back() {
        let b = breaker(count_cfg());
        for _ in 0..4 {
            call(&b, Outcome::Failure).unwrap();
        }
        tokio::time::advance(Duration::from_millis(1_000)).await;
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        drop(p1);
        // The dropped probe's slot is free again; it was not counted.
        let p3 = b.try_acquire().unwrap();
        p2.record(Outcome::Success);
        p3.record(Outcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_outcomes_and_late_results_do_not_count() {
        let b = breaker(count_cfg());
        let late = b.try_acquire().unwrap();
        for _ in 0..4 {
            call(&b, Outcome::Ignored).unwrap();
        }
        assert_eq!(b.snapshot().calls, 0);
        for _ in 0..4 {
            call(&b, Outcome::Failure).unwrap();
        }
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1_000)).await;
        let probe = b.try_acquire().unwrap();
        // A call let in while closed ends during half-open: not a probe, not counted.
        late.record(Outcome::Success);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.record(Outcome::Success);
        assert_eq!(b.state(), BreakerState::HalfOpen, "one probe of two so far");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_open_it_too() {
        let b = breaker(BreakerConfig {
            slow_call_ms: Some(100),
            slow_call_rate_percent: 50.0,
            ..count_cfg()
        });
        for _ in 0..4 {
            let p = b.try_acquire().unwrap();
            tokio::time::advance(Duration::from_millis(150)).await;
            p.record(Outcome::Success);
        }
        let s = b.snapshot();
        assert_eq!(s.state, BreakerState::Open);
        assert_eq!(s.slow_call_rate, 100.0);
    }

    #[test]
    fn the_count_ring_keeps_exact_totals_from_many_threads() {
        let ring = std::sync::Arc::new(CountRing::new(64));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        ring.record((i + t) % 3 == 0, i % 5 == 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Once quiet, the totals are exactly what the ring holds.
        let t = ring.totals();
        let held = |bit: u8| {
            ring.slots
                .iter()
                .filter(|s| s.load(Relaxed) & bit != 0)
                .count() as u32
        };
        assert_eq!(t.calls, 64);
        assert_eq!(t.failures, held(1));
        assert_eq!(t.slow, held(2));
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_forgets_old_seconds() {
        let b = breaker(BreakerConfig {
            window: WindowKind::Time,
            window_size: 5,
            minimum_calls: 4,
            ..count_cfg()
        });
        for _ in 0..3 {
            call(&b, Outcome::Failure).unwrap();
        }
        // Those failures age out of the five-second window.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(b.snapshot().calls, 0);
        call(&b, Outcome::Failure).unwrap();
        call(&b, Outcome::Success).unwrap();
        call(&b, Outcome::Success).unwrap();
        call(&b, Outcome::Success).unwrap();
        assert_eq!(b.state(), BreakerState::Closed, "25% over the last 5 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        call(&b, Outcome::Failure).unwrap();
        assert_eq!(b.state(), BreakerState::Closed, "2 of 5 in the window");
        call(&b, Outcome::Failure).unwrap();
        assert_eq!(b.state(), BreakerState::Open, "3 of 6 in the window");
    }
}

//! The retry budget: tower's model (`tower::retry::budget::TpsBudget`: every call
//! deposits, a retry withdraws, deposits count for a time-to-live, a reserve per
//! second lets a quiet caller retry at all) behind tower's [`Budget`] trait, with
//! deposits that take no lock.
//!
//! tower's `TpsBudget` takes a mutex on every deposit, and every call deposits: with
//! many threads calling one dependency that mutex is where they queue. Here a
//! deposit is one atomic add on the calling thread's own shard; only withdrawals
//! (retries, which are rare when things go well) read every shard.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::time::Instant;
use tower::retry::budget::Budget;

/// Time slots in the window (as in tower's budget).
const SLOTS: u64 = 10;
/// Deposit shards; threads are spread over them.
const SHARDS: usize = 16;
/// Bits of a slot word that hold the count; the rest hold the slot's generation.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const GEN_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;

/// A ring of time slots, each one word: generation (high bits) and count (low
/// bits), so claiming an expired slot and counting in it is one compare-and-swap.
struct Ring([AtomicU64; SLOTS as usize]);

impl Ring {
    fn new() -> Self {
        // Generation GEN_MASK is never current at start: every slot reads as expired.
        Self(std::array::from_fn(|_| {
            AtomicU64::new(GEN_MASK << COUNT_BITS)
        }))
    }

    fn add(&self, generation: u64, amount: u64) {
        let slot = &self.0[(generation % SLOTS) as usize];
        let tag = generation & GEN_MASK;
        let mut cur = slot.load(Relaxed);
        loop {
            let next = if cur >> COUNT_BITS == tag {
                (tag << COUNT_BITS) | ((cur & COUNT_MASK) + amount).min(COUNT_MASK)
            } else {
                (tag << COUNT_BITS) | amount.min(COUNT_MASK)
            };
            match slot.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// The counts of the slots still inside the window at `generation`.
    fn sum(&self, generation: u64) -> u64 {
        let now = generation & GEN_MASK;
        self.0
            .iter()
            .map(|s| s.load(Relaxed))
            .filter(|w| now.wrapping_sub(w >> COUNT_BITS) & GEN_MASK < SLOTS)
            .map(|w| w & COUNT_MASK)
            .sum()
    }
}

#[repr(align(64))]
struct Shard(Ring);

/// A retry budget; see the module's note.
pub struct ShardedBudget {
    shards: Box<[Shard]>,
    withdrawn: Ring,
    start: Instant,
    slot: Duration,
    deposit_amount: u64,
    withdraw_amount: u64,
    reserve: u64,
}

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    MINE.with(|m| *m)
}

impl ShardedBudget {
    /// Deposits count for `ttl` (1 to 60 s); `min_per_sec` retries per second are
    /// always allowed; beyond that, retries may be `retry_percent` (0 to 1000) of
    /// deposits. The same parameters as tower's `TpsBudget::new`.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_percent: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let pct = retry_percent.clamp(0.0, 1000.0);
        // Integer units, as tower does: a deposit is worth `deposit_amount`, a
        // withdrawal costs `withdraw_amount`.
        let (deposit_amount, withdraw_amount) = if pct == 0.0 {
            (0, 1)
        } else if pct <= 1.0 {
            (1, (1.0 / pct) as u64)
        } else {
            (1000, (1000.0 / pct) as u64)
        };
        Self {
            shards: (0..SHARDS).map(|_| Shard(Ring::new())).collect(),
            withdrawn: Ring::new(),
            start: Instant::now(),
            slot: ttl / SLOTS as u32,
            deposit_amount,
            withdraw_amount: withdraw_amount.max(1),
            // Milliseconds, so a window of 1.5 s holds 1.5 s of reserve.
            reserve: min_per_sec as u64 * ttl.as_millis() as u64 / 1000 * withdraw_amount.max(1),
        }
    }

    fn generation(&self) -> u64 {
        (Instant::now()
            .saturating_duration_since(self.start)
            .as_nanos()
            / self.slot.as_nanos()) as u64
    }

    /// What may be withdrawn now, in deposit units.
    fn balance(&self, generation: u64) -> i128 {
        let deposited: u64 = self.shards.iter().map(|s| s.0.sum(generation)).sum();
        let withdrawn = self.withdrawn.sum(generation);
        (self.reserve + deposited * self.deposit_amount) as i128
            - (withdrawn * self.withdraw_amount) as i128
    }
}

impl Budget for ShardedBudget {
    fn deposit(&self) {
        if self.deposit_amount > 0 {
            self.shards[shard_index()].0.add(self.generation(), 1);
        }
    }

    fn withdraw(&self) -> bool {
        let generation = self.generation();
        // Two threads may both see the last unit and both take it: an overdraft of
        // at most one retry per racing thread, which the next deposits repay.
        if self.balance(generation) >= self.withdraw_amount as i128 {
            self.withdrawn.add(generation, 1);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_percentage_of_deposits_plus_the_reserve() {
        // 10% of deposits, 1 retry/s reserve over 10 s.
        let b = ShardedBudget::new(Duration::from_secs(10), 1, 0.1);
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..1000).take_while(|_| b.withdraw()).count();
        assert_eq!(allowed, 10 + 10);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_reserve_without_deposits_and_deposits_expire() {
        let b = ShardedBudget::new(Duration::from_secs(2), 3, 0.5);
        assert_eq!((0..100).take_while(|_| b.withdraw()).count(), 6);
        // Withdrawals age out with the window; so do deposits.
        tokio::time::advance(Duration::from_secs(3)).await;
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!((0..100).take_while(|_| b.withdraw()).count(), 6 + 5);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!((0..100).take_while(|_| b.withdraw()).count(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_percent_is_the_reserve_alone_and_large_percentages_work() {
        let b = ShardedBudget::new(Duration::from_secs(1), 2, 0.0);
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!((0..100).take_while(|_| b.withdraw()).count(), 2);
        let b = ShardedBudget::new(Duration::from_secs(1), 0, 10.0);
        for _ in 0..3 {
            b.deposit();
        }
        assert_eq!((0..100).take_while(|_| b.withdraw()).count(), 30);
    }

    #[test]
    fn deposits_from_many_threads_all_count() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let b = std::sync::Arc::new(ShardedBudget::new(Duration::from_secs(60), 0, 1.0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        b.deposit();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.balance(b.generation()), 8_000);
    }
}

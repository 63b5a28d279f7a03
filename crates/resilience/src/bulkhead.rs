//! The bulkhead: a bounded pool of concurrent calls per dependency with a bounded
//! queue in front, so one slow dependency can hold at most its own pool and queue,
//! never what calls to other dependencies need. A full queue rejects at once
//! (backpressure) with a typed `Overloaded` error.

use crate::config::BulkheadConfig;
use shoal_core::{Error, ErrorKind, Origin};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A bulkhead; share it with `Arc`.
///
/// Taking and giving back a slot is one atomic operation each (no lock), so a
/// bulkhead that is not full costs next to nothing; only waiters use the `Notify`.
/// Waiters are woken in no particular order.
pub struct Bulkhead {
    in_use: AtomicUsize,
    waiting: AtomicUsize,
    freed: Notify,
    max_concurrent: usize,
    max_queue: usize,
    max_wait: Duration,
    dependency: String,
}

/// A slot in the pool; the call holds it until it ends.
pub struct Slot<'a>(&'a Bulkhead);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, SeqCst);
        if self.0.waiting.load(SeqCst) > 0 {
            self.0.freed.notify_one();
        }
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Bulkhead {
    /// A bulkhead for calls to `dependency`.
    pub fn new(cfg: &BulkheadConfig, dependency: &str) -> Self {
        Self {
            in_use: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            max_concurrent: cfg.max_concurrent,
            max_queue: cfg.max_queue,
            max_wait: Duration::from_millis(cfg.max_queue_wait_ms),
            dependency: dependency.to_string(),
        }
    }

    /// Calls in flight now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(SeqCst)
    }

    /// Calls waiting now.
    pub fn queued(&self) -> usize {
        self.waiting.load(SeqCst)
    }

    fn try_take(&self) -> bool {
        let mut cur = self.in_use.load(SeqCst);
        while cur < self.max_concurrent {
            match self
                .in_use
                .compare_exchange_weak(cur, cur + 1, SeqCst, SeqCst)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    /// A slot now; or a place in the queue and a slot within the queue wait (and
    /// before `deadline`); or an `Overloaded` error.
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<Slot<'_>, Error> {
        if self.try_take() {
            return Ok(Slot(self));
        }
        if self.waiting.fetch_add(1, SeqCst) >= self.max_queue {
            self.waiting.fetch_sub(1, SeqCst);
            return Err(self.full(format!(
                "bulkhead for {} is full ({} in flight, {} queued)",
                self.dependency, self.max_concurrent, self.max_queue
            )));
        }
        let _queued = Waiting(&self.waiting);
        let mut until = Instant::now() + self.max_wait;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let wait = async {
            loop {
                // Register for a wake-up before looking, so a slot freed in between
                // is not missed.
                let notified = self.freed.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self.try_take() {
                    return;
                }
                notified.await;
            }
        };
        match tokio::time::timeout_at(until, wait).await {
            Ok(()) => Ok(Slot(self)),
            Err(_) => Err(self.full(format!(
                "no slot in the bulkhead for {} within {} ms",
                self.dependency,
                self.max_wait.as_millis()
            ))),
        }
    }

    fn full(&self, msg: String) -> Error {
        Error::new(ErrorKind::Overloaded, Origin::Internal, msg).with_retryable(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn bulkhead(c: usize, q: usize, wait_ms: u64) -> Arc<Bulkhead> {
        Arc::new(Bulkhead::new(
            &BulkheadConfig {
                max_concurrent: c,
                max_queue: q,
                max_queue_wait_ms: wait_ms,
            },
            "dep",
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn full_pool_and_queue_reject_at_once() {
        let b = bulkhead(2, 1, 10_000);
        let s1 = b.acquire(None).await.unwrap();
        let _s2 = b.acquire(None).await.unwrap();
        assert_eq!(b.in_use(), 2);
        let queued = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(None).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(b.queued(), 1);
        // Pool and queue full: rejected without waiting.
        let start = Instant::now();
        let e = b.acquire(None).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Overloaded);
        assert!(!e.is_retryable());
        assert_eq!(start.elapsed(), Duration::ZERO);
        // A slot frees: the queued call gets it.
        drop(s1);
        queued.await.unwrap().unwrap();
        assert_eq!(b.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_wait_is_bounded_by_its_limit_and_the_deadline() {
        let b = bulkhead(1, 4, 500);
        let _s = b.acquire(None).await.unwrap();
        let start = Instant::now();
        assert!(b.acquire(None).await.is_err());
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        let start = Instant::now();
        let deadline = start + Duration::from_millis(100);
        assert!(b.acquire(Some(deadline)).await.is_err());
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(b.queued(), 0, "timed-out waiters leave the queue");
    }
}

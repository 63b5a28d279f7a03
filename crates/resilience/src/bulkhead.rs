//! The bulkhead: a bounded pool of concurrent calls per dependency with a bounded
//! queue in front, so one slow dependency can hold at most its own pool and queue,
//! never what calls to other dependencies need. A full queue rejects at once
//! (backpressure) with a typed `Overloaded` error.

use crate::config::BulkheadConfig;
use shoal_core::{Error, ErrorKind, Origin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A bulkhead; share it with `Arc`.
pub struct Bulkhead {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_concurrent: usize,
    max_queue: usize,
    max_wait: Duration,
    dependency: String,
}

/// A slot in the pool; the call holds it until it ends.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bulkhead {
    /// A bulkhead for calls to `dependency`.
    pub fn new(cfg: &BulkheadConfig, dependency: &str) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            waiting: AtomicUsize::new(0),
            max_concurrent: cfg.max_concurrent,
            max_queue: cfg.max_queue,
            max_wait: Duration::from_millis(cfg.max_queue_wait_ms),
            dependency: dependency.to_string(),
        }
    }

    /// Calls in flight now.
    pub fn in_use(&self) -> usize {
        self.max_concurrent - self.slots.available_permits()
    }

    /// Calls waiting now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// A slot now; or a place in the queue and a slot within the queue wait (and
    /// before `deadline`); or an `Overloaded` error.
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<Slot, Error> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(Slot(p));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
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
        match tokio::time::timeout_at(until, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Slot(p)),
            // The semaphore is never closed; treat it as full if it ever were.
            Ok(Err(_)) | Err(_) => Err(self.full(format!(
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

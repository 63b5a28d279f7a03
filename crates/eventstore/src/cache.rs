//! A read-through cache for reference data another service owns (product names,
//! prices): answers from memory while an entry is fresh, loads it on a miss, and
//! forgets it when its time is up or when an event says it changed.
//!
//! In process, per instance: each replica keeps its own copy, so the owner's
//! events are what keeps replicas from serving stale data for a whole TTL.

use crate::store::{EventStore, Subscription};
use crate::types::RecordedEvent;
use shoal_core::Error;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A bounded read-through cache with a time to live; cheap to clone.
pub struct ReadThrough<K, V> {
    inner: Arc<Inner<K, V>>,
}

impl<K, V> Clone for ReadThrough<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<K, V> {
    ttl: Duration,
    capacity: usize,
    state: Mutex<State<K, V>>,
}

struct State<K, V> {
    entries: HashMap<K, (V, Instant)>,
    /// Keys in the order they were loaded, for evicting the oldest when full.
    order: VecDeque<K>,
    /// Bumped by every invalidation: a load that started before one must not
    /// put back what the invalidation removed.
    epoch: u64,
}

impl<K, V> ReadThrough<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Entries live `ttl`; at most `capacity` are kept (the oldest go first).
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                ttl,
                capacity: capacity.max(1),
                state: Mutex::new(State {
                    entries: HashMap::new(),
                    order: VecDeque::new(),
                    epoch: 0,
                }),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fresh cached value of `key`, if any.
    pub fn get(&self, key: &K) -> Option<V> {
        let st = self.state();
        let (v, at) = st.entries.get(key)?;
        (at.elapsed() < self.inner.ttl).then(|| v.clone())
    }

    /// The cached value of `key`, or `load`'s (kept for next time). A load error is
    /// returned and nothing is kept.
    pub async fn get_or_load<F, Fut>(&self, key: K, load: F) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, Error>>,
    {
        if let Some(v) = self.get(&key) {
            return Ok(v);
        }
        let epoch = self.state().epoch;
        let v = load().await?;
        let mut st = self.state();
        if st.epoch == epoch {
            if st
                .entries
                .insert(key.clone(), (v.clone(), Instant::now()))
                .is_none()
            {
                st.order.push_back(key);
            }
            while st.entries.len() > self.inner.capacity {
                match st.order.pop_front() {
                    Some(old) => {
                        st.entries.remove(&old);
                    }
                    None => break,
                }
            }
        }
        Ok(v)
    }

    /// Forget `key`.
    pub fn invalidate(&self, key: &K) {
        let mut st = self.state();
        st.epoch += 1;
        if st.entries.remove(key).is_some() {
            st.order.retain(|k| k != key);
        }
    }

    /// Forget everything.
    pub fn invalidate_all(&self) {
        let mut st = self.state();
        st.epoch += 1;
        st.entries.clear();
        st.order.clear();
    }

    /// Keep following `store` from now on and forget the key each event names
    /// (`key_of` says which, if any), until the returned handle is dropped.
    pub fn invalidate_on<F>(&self, store: &EventStore, key_of: F) -> Invalidator
    where
        F: Fn(&RecordedEvent) -> Option<K> + Send + 'static,
    {
        let cache = self.clone();
        let mut sub: Subscription = store.subscribe(store.head());
        Invalidator(tokio::spawn(async move {
            loop {
                match sub.next().await {
                    Ok(e) => {
                        if let Some(k) = key_of(&e) {
                            cache.invalidate(&k);
                        }
                    }
                    Err(err) => {
                        // Unsure what changed: forget everything, try again shortly.
                        tracing::warn!(error = %err, "cache invalidation feed failed");
                        cache.invalidate_all();
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }))
    }
}

/// Follows events for a [`ReadThrough`] cache; stops when dropped.
pub struct Invalidator(JoinHandle<()>);

impl Drop for Invalidator {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn loads_once_while_fresh_then_again_after_the_ttl() {
        let c: ReadThrough<&str, u32> = ReadThrough::new(Duration::from_secs(10), 100);
        let loads = Arc::new(AtomicU32::new(0));
        let load = |n| {
            let loads = loads.clone();
            move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(n)
            }
        };
        assert_eq!(c.get_or_load("p-1", load(1)).await.unwrap(), 1);
        assert_eq!(c.get_or_load("p-1", load(2)).await.unwrap(), 1);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(c.get(&"p-1"), None);
        assert_eq!(c.get_or_load("p-1", load(3)).await.unwrap(), 3);
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_and_invalidated_and_errors_are_not_kept() {
        let c: ReadThrough<u32, u32> = ReadThrough::new(Duration::from_secs(60), 2);
        for k in 0..3 {
            c.get_or_load(k, || async move { Ok(k) }).await.unwrap();
        }
        assert_eq!(c.get(&0), None, "the oldest went first");
        assert_eq!(c.get(&2), Some(2));
        c.invalidate(&2);
        assert_eq!(c.get(&2), None);
        let e = c
            .get_or_load(9, || async { Err(Error::unavailable("owner down")) })
            .await;
        assert!(e.is_err());
        assert_eq!(c.get(&9), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_load_overtaken_by_an_invalidation_is_not_kept() {
        let c: ReadThrough<u32, u32> = ReadThrough::new(Duration::from_secs(60), 10);
        let c2 = c.clone();
        let v = c
            .get_or_load(1, || async move {
                // The owner changes the value while the old one is on its way.
                c2.invalidate(&1);
                Ok(10)
            })
            .await
            .unwrap();
        assert_eq!(v, 10);
        assert_eq!(c.get(&1), None);
    }
}

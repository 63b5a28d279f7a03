//! Typed fallbacks for graceful degradation: answer with a default, the last good
//! answer, or another call when a dependency is down, slow, overloaded or behind an
//! open breaker — never when the caller's own request was wrong.

use crate::layers::falls_back;
use shoal_core::Error;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

/// Run `call`; if it fails in a way a fallback stands in for, run `fallback` with
/// the error instead.
///
/// ```ignore
/// let stock = with_fallback(
///     async { ctx.client("inventory").get("/api/inventory/p-1").send().await?.json::<Stock>() },
///     |_e| async { Ok(Stock::unknown()) },
/// ).await?;
/// ```
pub async fn with_fallback<T, C, F, Fut>(call: C, fallback: F) -> Result<T, Error>
where
    C: Future<Output = Result<T, Error>>,
    F: FnOnce(Error) -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    match call.await {
        Err(e) if falls_back(&e) => {
            tracing::debug!(error = %e, "falling back");
            fallback(e).await
        }
        other => other,
    }
}

/// The last good answer per key, for "serve what we had" fallbacks. Bounded: the
/// oldest key is forgotten once `capacity` keys are held.
pub struct LastGood<K, V> {
    capacity: usize,
    inner: Mutex<(HashMap<K, V>, VecDeque<K>)>,
}

impl<K: Eq + Hash + Clone, V: Clone> LastGood<K, V> {
    /// Holds at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Remember a good answer.
    pub fn remember(&self, key: K, value: V) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        if map.insert(key.clone(), value).is_none() {
            order.push_back(key);
            if order.len() > self.capacity {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }

    /// The last good answer for `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.get(key).cloned()
    }

    /// Run `call`; remember its answer when it succeeds, or answer with the last
    /// good one when it fails in a way a fallback stands in for (the error stays
    /// when there is none).
    pub async fn call<C>(&self, key: K, call: C) -> Result<V, Error>
    where
        C: Future<Output = Result<V, Error>>,
    {
        match call.await {
            Ok(v) => {
                self.remember(key, v.clone());
                Ok(v)
            }
            Err(e) if falls_back(&e) => match self.get(&key) {
                Some(v) => {
                    tracing::debug!(error = %e, "serving the last good answer");
                    Ok(v)
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::{ErrorKind, Origin};

    fn err(kind: ErrorKind) -> Error {
        Error::new(kind, Origin::Upstream, "x")
    }

    #[tokio::test]
    async fn falls_back_on_dependency_failures_only() {
        let v = with_fallback(async { Err(err(ErrorKind::CircuitOpen)) }, |_| async {
            Ok(7)
        })
        .await;
        assert_eq!(v.unwrap(), 7);
        let v = with_fallback(async { Err(err(ErrorKind::NotFound)) }, |_| async { Ok(7) }).await;
        assert_eq!(v.unwrap_err().kind(), ErrorKind::NotFound);
        let v = with_fallback(async { Ok(1) }, |_| async { Ok(7) }).await;
        assert_eq!(v.unwrap(), 1);
    }

    #[tokio::test]
    async fn last_good_serves_the_previous_answer_and_is_bounded() {
        let lg = LastGood::new(2);
        assert_eq!(lg.call("a", async { Ok(1) }).await.unwrap(), 1);
        assert_eq!(
            lg.call("a", async { Err(err(ErrorKind::Timeout)) })
                .await
                .unwrap(),
            1
        );
        assert!(lg
            .call("b", async { Err(err(ErrorKind::Timeout)) })
            .await
            .is_err());
        lg.remember("b", 2);
        lg.remember("c", 3);
        assert_eq!(lg.get(&"a"), None, "oldest key forgotten");
        assert_eq!(lg.get(&"c"), Some(3));
    }
}

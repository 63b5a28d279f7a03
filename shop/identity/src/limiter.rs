//! Failed-login counting: per account and per source address, in fixed windows.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Counts login attempts per key (`u:<username>`, `c:<client id>`, `s:<address>`).
///
/// An attempt is counted *before* its password is checked, and uncounted if it
/// succeeds. Checking and counting are then one step under one lock, so a burst of
/// concurrent guesses cannot all pass the check while the first ones are still being
/// hashed: at most `max` attempts per window ever reach argon2.
///
/// Memory is bounded: at `max_keys` entries, expired ones are dropped, and if none
/// has expired the one whose window started first goes.
pub(crate) struct Limiter {
    entries: Mutex<HashMap<String, Entry>>,
    window: Duration,
    max_keys: usize,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// When the key's first counted attempt of this window was.
    since: Instant,
    count: u32,
}

/// One key an attempt counts against, with its limit.
pub(crate) struct Key {
    pub(crate) name: String,
    pub(crate) max: u32,
}

impl Limiter {
    pub(crate) fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            window,
            max_keys: max_keys.max(keys_per_attempt()),
        }
    }

    /// Count one attempt against every key, or — if any key is at its limit —
    /// nothing at all, answering how long until that key is free again (the longest
    /// wait, if several are locked).
    pub(crate) fn begin(&self, keys: &[Key], now: Instant) -> Result<(), Duration> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut wait = None;
        for key in keys {
            if let Some(e) = entries.get(&key.name).filter(|e| self.live(e, now)) {
                if e.count >= key.max {
                    let left = (e.since + self.window).saturating_duration_since(now);
                    wait = Some(wait.map_or(left, |w: Duration| w.max(left)));
                }
            }
        }
        if let Some(wait) = wait {
            return Err(wait);
        }
        for key in keys {
            if !entries.contains_key(&key.name) && entries.len() >= self.max_keys {
                self.make_room(&mut entries, now);
            }
            let e = entries.entry(key.name.clone()).or_insert(Entry {
                since: now,
                count: 0,
            });
            if !self.live(e, now) {
                *e = Entry {
                    since: now,
                    count: 0,
                };
            }
            e.count = e.count.saturating_add(1);
        }
        Ok(())
    }

    /// Take back one attempt counted by [`begin`](Self::begin) (it succeeded, or
    /// never got to check a password).
    pub(crate) fn undo(&self, key: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = entries.get_mut(key) {
            e.count = e.count.saturating_sub(1);
            if e.count == 0 {
                entries.remove(key);
            }
        }
    }

    /// Forget a key: its account just logged in successfully.
    pub(crate) fn reset(&self, key: &str) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.since) < self.window
    }

    fn make_room(&self, entries: &mut HashMap<String, Entry>, now: Instant) {
        entries.retain(|_, e| self.live(e, now));
        if entries.len() < self.max_keys {
            return;
        }
        // Dropping the oldest frees a lock early; the alternative, refusing new keys,
        // would let a flood of made-up names lock every other user out.
        if let Some(oldest) = entries
            .iter()
            .min_by_key(|(_, e)| e.since)
            .map(|(k, _)| k.clone())
        {
            entries.remove(&oldest);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Keys one attempt counts against (account and source): the table must hold them.
const fn keys_per_attempt() -> usize {
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(user: &str, source: &str) -> Vec<Key> {
        vec![
            Key {
                name: format!("u:{user}"),
                max: 3,
            },
            Key {
                name: format!("s:{source}"),
                max: 5,
            },
        ]
    }

    #[test]
    fn locks_after_max_and_frees_when_the_window_ends() {
        let l = Limiter::new(Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.begin(&keys("alice", "a"), t0).is_ok());
        }
        let wait = l.begin(&keys("alice", "a"), t0 + Duration::from_secs(10));
        assert_eq!(wait, Err(Duration::from_secs(50)));
        // A refused attempt is not counted: the source key is still at 3 of 5.
        assert!(l.begin(&keys("bob", "a"), t0).is_ok());
        assert!(l.begin(&keys("carol", "a"), t0).is_ok());
        assert!(l.begin(&keys("dave", "a"), t0).is_err(), "source at 5");
        assert!(l.begin(&keys("dave", "b"), t0).is_ok(), "another source");
        // The window ends 60 s after the first failure.
        assert!(l
            .begin(&keys("alice", "c"), t0 + Duration::from_secs(60))
            .is_ok());
    }

    #[test]
    fn undo_and_reset() {
        let l = Limiter::new(Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.begin(&keys("alice", "a"), t0).is_ok());
            l.undo("u:alice");
        }
        assert!(l.begin(&keys("alice", "a"), t0).is_ok());
        l.reset("u:alice");
        for _ in 0..3 {
            assert!(l.begin(&keys("alice", "b"), t0).is_ok());
        }
        assert!(l.begin(&keys("alice", "b"), t0).is_err());
        l.reset("u:alice");
        assert!(l.begin(&keys("alice", "b"), t0).is_ok());
    }

    #[test]
    fn memory_is_bounded() {
        let l = Limiter::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        for i in 0..1000 {
            let _ = l.begin(&keys(&format!("user-{i}"), &format!("src-{i}")), t0);
            assert!(l.len() <= 10);
        }
        // Expired entries make room first.
        let later = t0 + Duration::from_secs(61);
        assert!(l.begin(&keys("new", "b"), later).is_ok());
        assert_eq!(l.len(), 2);
    }
}

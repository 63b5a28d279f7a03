//! Committed offsets of one topic's groups, persisted with group commit: every
//! commit submitted while one is being written joins the next write, so many acks
//! share one write and fsync of the offsets file. Commits that nobody waits for
//! (acks) are written at most every [`LAZY_INTERVAL`]: a consumer acking each
//! message would otherwise keep the disk flushing offsets back to back, and every
//! flush delays the fsyncs that publishers wait for.

use crate::util::{from_log, lock};
use shoal_core::Error;
use shoal_log::OffsetStore;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::error;

/// Longest a lazy commit waits for the next offsets write. A crash in between
/// means the messages acked meanwhile are delivered again (at least once).
pub(crate) const LAZY_INTERVAL: Duration = Duration::from_millis(10);

/// Answered once the commits submitted with it are durable.
pub(crate) type CommitWait = oneshot::Receiver<Result<(), Error>>;

#[derive(Default)]
struct Pending {
    updates: BTreeMap<(String, u32), u64>,
    waiters: Vec<oneshot::Sender<Result<(), Error>>>,
    /// A task is writing; it picks up whatever is pending when it finishes.
    running: bool,
    /// Someone waits for these commits: write without waiting out the interval.
    urgent: bool,
}

struct Inner {
    /// Locked in a blocking thread while the file is replaced, and briefly to read.
    store: Mutex<OffsetStore>,
    pending: Mutex<Pending>,
    /// Cuts a lazy wait short when an urgent commit arrives.
    wake: Notify,
    last_write: Mutex<Option<Instant>>,
}

/// The offsets file of one topic.
#[derive(Clone)]
pub(crate) struct Committer {
    inner: Arc<Inner>,
}

impl Committer {
    /// Opens (or starts) the file at `path`. Blocking.
    pub(crate) fn open(path: &Path) -> Result<Self, Error> {
        let store = OffsetStore::open(path).map_err(from_log)?;
        Ok(Self {
            inner: Arc::new(Inner {
                store: Mutex::new(store),
                pending: Mutex::new(Pending::default()),
                wake: Notify::new(),
                last_write: Mutex::new(None),
            }),
        })
    }

    /// The last durable offsets of `group`, by partition.
    pub(crate) fn group(&self, group: &str) -> BTreeMap<u32, u64> {
        lock(&self.inner.store).group(group)
    }

    /// Queues `commits` (`(partition, offset)`, later ones win) for `group`; the
    /// answer comes once they are on disk. Needs a tokio runtime.
    pub(crate) fn submit(&self, group: &str, commits: &[(u32, u64)]) -> CommitWait {
        self.queue(group, commits, true)
    }

    /// As [`Committer::submit`], for commits nobody waits on: they go in the next
    /// write, which is at most [`LAZY_INTERVAL`] away.
    pub(crate) fn submit_lazy(&self, group: &str, commits: &[(u32, u64)]) -> CommitWait {
        self.queue(group, commits, false)
    }

    fn queue(&self, group: &str, commits: &[(u32, u64)], urgent: bool) -> CommitWait {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut p = lock(&self.inner.pending);
            for &(partition, offset) in commits {
                p.updates.insert((group.to_owned(), partition), offset);
            }
            p.waiters.push(tx);
            p.urgent |= urgent;
            !std::mem::replace(&mut p.running, true)
        };
        if start {
            tokio::spawn(run(self.inner.clone()));
        } else if urgent {
            self.inner.wake.notify_one();
        }
        rx
    }

    /// Waits until everything submitted so far is written (or failed).
    pub(crate) async fn flush(&self) {
        let _ = self.submit("", &[]).await;
    }
}

async fn run(inner: Arc<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let linger = {
            let mut p = lock(&inner.pending);
            if p.updates.is_empty() && p.waiters.is_empty() {
                p.running = false;
                return;
            }
            let last = *lock(&inner.last_write);
            match last {
                Some(t) if !p.urgent => (t + LAZY_INTERVAL).checked_duration_since(Instant::now()),
                _ => None,
            }
        };
        if let Some(d) = linger {
            tokio::select! {
                () = tokio::time::sleep(d) => {}
                () = inner.wake.notified() => {}
            }
            continue;
        }
        let (updates, waiters) = {
            let mut p = lock(&inner.pending);
            p.urgent = false;
            (
                std::mem::take(&mut p.updates),
                std::mem::take(&mut p.waiters),
            )
        };
        let result = if updates.is_empty() {
            Ok(())
        } else {
            let inner2 = inner.clone();
            let u = updates.clone();
            let joined = tokio::task::spawn_blocking(move || {
                lock(&inner2.store).commit_all(u.iter().map(|((g, p), o)| (g.as_str(), *p, *o)))
            })
            .await;
            match joined {
                Ok(r) => r.map_err(Some),
                Err(_) => Err(None),
            }
        };
        if !updates.is_empty() {
            *lock(&inner.last_write) = Some(Instant::now());
        }
        match result {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                for w in waiters {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) => {
                let what = e
                    .as_ref()
                    .map_or_else(|| "the writer task died".to_owned(), ToString::to_string);
                error!(error = %what, "cannot persist consumer offsets; retrying");
                {
                    // Newer submissions for the same key win over the failed ones.
                    let mut p = lock(&inner.pending);
                    for (k, v) in updates {
                        p.updates.entry(k).or_insert(v);
                    }
                }
                for w in waiters {
                    let err = match &e {
                        Some(e) => from_log(e.clone()),
                        None => Error::internal("offset writer task died"),
                    };
                    let _ = w.send(Err(err));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commits_are_durable_when_answered_and_later_ones_win() {
        let dir = std::env::temp_dir().join(format!("shoal-broker-offsets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("offsets");
        let c = Committer::open(&path).unwrap();
        let a = c.submit("g", &[(0, 5), (1, 2)]);
        let b = c.submit("g", &[(0, 7)]);
        let other = c.submit("h", &[(0, 1)]);
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        other.await.unwrap().unwrap();
        c.flush().await;
        assert_eq!(c.group("g"), BTreeMap::from([(0, 7), (1, 2)]));
        drop(c);
        let again = Committer::open(&path).unwrap();
        assert_eq!(again.group("g"), BTreeMap::from([(0, 7), (1, 2)]));
        assert_eq!(again.group("h"), BTreeMap::from([(0, 1)]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn lazy_commits_ride_with_urgent_ones_or_follow_alone() {
        let dir =
            std::env::temp_dir().join(format!("shoal-broker-offsets-lazy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("offsets");
        let c = Committer::open(&path).unwrap();
        // A write just happened: a lazy commit now waits out the interval, and an
        // urgent one cuts the wait short and carries it along.
        c.submit("g", &[(0, 1)]).await.unwrap().unwrap();
        let lazy = c.submit_lazy("g", &[(0, 2)]);
        c.submit("h", &[(0, 9)]).await.unwrap().unwrap();
        lazy.await.unwrap().unwrap();
        let again = Committer::open(&path).unwrap();
        assert_eq!(again.group("g"), BTreeMap::from([(0, 2)]));
        assert_eq!(again.group("h"), BTreeMap::from([(0, 9)]));
        // Alone, a lazy commit is written once the interval has passed.
        c.submit_lazy("g", &[(0, 3)]).await.unwrap().unwrap();
        assert_eq!(
            Committer::open(&path).unwrap().group("g"),
            BTreeMap::from([(0, 3)])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

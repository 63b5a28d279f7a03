//! Who is in a group, and which partitions are whose.
//!
//! Each member puts a lease under `<topic>.<group>.<member id>` in the group bucket and
//! renews it every third of its TTL; leaving deletes it. Every member watches the
//! group's keys and keeps its own view: a member is alive from a put until its TTL
//! (counted from the server's timestamp of the put) runs out or its key is deleted.
//! Every member computes the same assignment from the same view: the live member ids
//! sorted, partition `p` to the `p mod n`-th. Views agree within the watch's latency
//! (milliseconds) except around an expiry, where members may disagree for a moment:
//! two then fetch from one partition (harmless: they share its durable consumer, which
//! still hands each message to one of them) or none does until the next change.

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use shoal_core::Error;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// A member's lease record (its value in the bucket).
#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseValue {
    ttl_ms: u64,
}

/// This member's lease.
pub(crate) struct Lease {
    kv: kv::Store,
    key: String,
    value: bytes::Bytes,
}

impl Lease {
    pub(crate) fn new(kv: kv::Store, prefix: &str, me: &str, ttl: Duration) -> Self {
        let value = serde_json::to_vec(&LeaseValue {
            ttl_ms: ttl.as_millis() as u64,
        })
        .unwrap_or_default();
        Self {
            kv,
            key: format!("{prefix}.{me}"),
            value: value.into(),
        }
    }

    pub(crate) async fn renew(&self) -> Result<(), Error> {
        self.kv
            .put(&self.key, self.value.clone())
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::unavailable(format!("renew group lease {}", self.key)).with_source(e)
            })
    }

    /// Leave: the other members see the key deleted at once.
    pub(crate) async fn end(&self) {
        if let Err(e) = self.kv.delete(&self.key).await {
            tracing::warn!(lease = %self.key, error = %e, "cannot delete the group lease; it runs out by itself");
        }
    }
}

/// One member's view of its group.
pub(crate) struct View {
    prefix: String,
    me: String,
    /// The other live members and when their leases run out.
    others: HashMap<String, Instant>,
    /// Used for a lease whose record cannot be read.
    default_ttl: Duration,
}

impl View {
    pub(crate) fn new(prefix: &str, me: &str, default_ttl: Duration) -> Self {
        Self {
            prefix: format!("{prefix}."),
            me: me.to_string(),
            others: HashMap::new(),
            default_ttl,
        }
    }

    /// Take in one change of the bucket.
    pub(crate) fn apply(&mut self, entry: &kv::Entry) {
        let Some(id) = entry.key.strip_prefix(&self.prefix) else {
            return;
        };
        if id.contains('.') || id == self.me {
            return;
        }
        match entry.operation {
            kv::Operation::Put => {
                let ttl = serde_json::from_slice::<LeaseValue>(&entry.value)
                    .map(|v| Duration::from_millis(v.ttl_ms.clamp(300, 600_000)))
                    .unwrap_or(self.default_ttl);
                // The lease runs from the server's timestamp of the put, so a member
                // that joins late does not count an old lease as fresh.
                let put_ns = entry.created.unix_timestamp_nanos();
                let now_ns = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i128);
                let age = Duration::from_nanos(u64::try_from(now_ns - put_ns).unwrap_or(0));
                match ttl.checked_sub(age) {
                    Some(left) if !left.is_zero() => {
                        self.others.insert(id.to_string(), Instant::now() + left);
                    }
                    _ => {
                        self.others.remove(id);
                    }
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                self.others.remove(id);
            }
        }
    }

    /// Forget members whose leases ran out.
    pub(crate) fn expire(&mut self, now: Instant) {
        self.others.retain(|_, until| *until > now);
    }

    /// When the next lease runs out.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.others.values().min().copied()
    }

    /// The partitions this member owns, of `partitions`.
    pub(crate) fn owned(&self, partitions: u32) -> BTreeSet<u32> {
        let mut ids: Vec<&str> = self.others.keys().map(String::as_str).collect();
        ids.push(&self.me);
        ids.sort_unstable();
        let n = ids.len() as u32;
        (0..partitions)
            .filter(|p| ids[(p % n) as usize] == self.me)
            .collect()
    }

    /// How many members it sees, itself included.
    pub(crate) fn size(&self) -> usize {
        self.others.len() + 1
    }
}

/// Start watching the group's leases and read what is there now. `Unavailable` when
/// the bucket does not answer within `timeout`.
pub(crate) async fn watch(
    kv: &kv::Store,
    view: &mut View,
    timeout: Duration,
) -> Result<kv::Watch, Error> {
    let filter = format!("{}*", view.prefix);
    let read = async {
        let mut watch = kv.watch_with_history(&filter).await.map_err(|e| {
            Error::unavailable(format!("watch group leases {filter}")).with_source(e)
        })?;
        // The caller put its own lease first, so there is history to read up to the
        // entry that has nothing pending after it.
        loop {
            match watch.next().await {
                Some(Ok(entry)) => {
                    view.apply(&entry);
                    if entry.delta == 0 {
                        return Ok(watch);
                    }
                }
                Some(Err(e)) => {
                    return Err(
                        Error::unavailable(format!("watch group leases {filter}")).with_source(e)
                    )
                }
                None => {
                    return Err(Error::unavailable(format!(
                        "watch group leases {filter}: the watch ended"
                    )))
                }
            }
        }
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        Error::unavailable(format!(
            "watch group leases {filter}: no answer within {timeout:?}"
        ))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_go_round_robin_over_sorted_ids() {
        let mut v = View::new("t.g", "b", Duration::from_secs(5));
        assert_eq!(v.owned(4), BTreeSet::from([0, 1, 2, 3]));
        let far = Instant::now() + Duration::from_secs(60);
        v.others.insert("a".into(), far);
        assert_eq!(v.owned(4), BTreeSet::from([1, 3]));
        v.others.insert("c".into(), far);
        assert_eq!(v.owned(4), BTreeSet::from([1]));
        v.others.insert("d".into(), Instant::now());
        v.expire(Instant::now() + Duration::from_millis(1));
        assert_eq!(v.size(), 3);
        assert_eq!(v.owned(1), BTreeSet::new());
    }
}

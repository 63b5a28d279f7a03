//! The connection's settings.

use shoal_core::Error;
use std::time::Duration;

/// How [`crate::JetStreamBus`] connects and where it keeps its state. Every field has a
/// default ([`NatsOptions::default`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsOptions {
    /// A namespace put before every stream, subject and bucket name (`t3f…_SHOAL_orders`,
    /// `t3f….shoal.orders.0`), so several tenants, or tests running in parallel, share
    /// one server without meeting. 1 to 32 letters, digits, `-` and `_`; `None`: no
    /// namespace.
    pub prefix: Option<String>,
    /// How long the first connection may take before `connect` gives up.
    pub connect_timeout_ms: u64,
    /// How long a JetStream API call or a publish's acknowledgement may take.
    pub request_timeout_ms: u64,
    /// How long a group member counts as alive after its last lease renewal (renewed
    /// every third of this). A member that dies without leaving keeps its partitions
    /// this long.
    pub lease_ttl_ms: u64,
    /// Publishes sent and not yet acknowledged by the server, at most, over all callers:
    /// the window a pipelined publisher can keep in flight. Callers beyond it wait.
    pub max_pending_acks: usize,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            prefix: None,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 5_000,
            lease_ttl_ms: 5_000,
            max_pending_acks: 8_192,
        }
    }
}

impl NatsOptions {
    /// Refuse settings outside the limits, naming them.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(p) = &self.prefix {
            let ok = !p.is_empty()
                && p.len() <= 32
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(Error::config(format!(
                    "NATS prefix {p:?}: use 1 to 32 letters, digits, '-' and '_'"
                )));
            }
        }
        let range = |what: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::config(format!(
                    "{what} {v} is out of range ({lo} to {hi})"
                )))
            }
        };
        range("connect_timeout_ms", self.connect_timeout_ms, 100, 600_000)?;
        range("request_timeout_ms", self.request_timeout_ms, 100, 600_000)?;
        // Ten minutes at most: the group bucket keeps entries an hour, so a live
        // member's lease never ages out of it.
        range("lease_ttl_ms", self.lease_ttl_ms, 300, 600_000)?;
        range(
            "max_pending_acks",
            self.max_pending_acks as u64,
            1,
            1_000_000,
        )?;
        Ok(())
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub(crate) fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

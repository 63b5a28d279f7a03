//! `BrokerConfig`: the `[control_plane.broker]` table of the system file.

use serde::Deserialize;
use shoal_bus::limits;
use shoal_core::Error;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The broker's settings and limits. Every limit bounds memory or work that a
/// client could otherwise grow without end.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Host the broker at all (read by the control plane).
    pub enabled: bool,
    /// Where clients reach the broker (read by the control plane; port 0 picks a
    /// free port, which `GET /v1/broker` then reports).
    pub listen: SocketAddr,
    /// Where topics, offsets and the catalogue live (the control plane's default is
    /// `<control_plane.data_dir>/broker`).
    pub data_dir: Option<PathBuf>,
    /// Open client connections at most; one more is answered `overloaded` and closed.
    pub max_connections: usize,
    /// Largest frame in either direction (length prefix excluded). Must hold one
    /// message of the bus's largest size, so at least 1 MiB + 64 KiB.
    pub max_frame_bytes: u32,
    /// Requests one connection may have in flight (pipelined) before the broker
    /// stops reading from it.
    pub max_requests_per_connection: usize,
    /// Bytes of requests one connection may have in flight before the broker stops
    /// reading from it. At least `max_frame_bytes`.
    pub max_connection_buffer_bytes: usize,
    /// Topics at most, dead-letter topics included.
    pub max_topics: usize,
    /// Partitions at most, over all topics (one log and one writer thread each).
    pub max_partitions: u32,
    /// Consumer groups at most, over all topics.
    pub max_groups: usize,
    /// Members of one group at most.
    pub max_members_per_group: usize,
    /// Deliveries one member may hold unacked, over all its partitions.
    pub max_in_flight_per_member: u32,
    /// Distance between a partition's committed offset and its next delivery at
    /// most: bounds the set of acked offsets kept above the committed one while an
    /// old delivery is still unacked.
    pub max_unacked_span: u64,
    /// Deliveries in one fetch answer at most.
    pub max_fetch_messages: u32,
    /// Longest a fetch may wait for messages (a long poll).
    pub max_fetch_wait_ms: u64,
    /// Shortest lease a member may ask for.
    pub min_lease_ms: u64,
    /// Longest lease a member may ask for.
    pub max_lease_ms: u64,
    /// Size at which a partition's log starts a new segment file; retention deletes
    /// whole segments.
    pub segment_bytes: u64,
    /// Time between retention passes over every partition.
    pub retention_interval_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            data_dir: None,
            max_connections: 1024,
            max_frame_bytes: 8 << 20,
            max_requests_per_connection: 4096,
            max_connection_buffer_bytes: 64 << 20,
            max_topics: 1000,
            max_partitions: 4096,
            max_groups: 10_000,
            max_members_per_group: 256,
            max_in_flight_per_member: 10_000,
            max_unacked_span: 100_000,
            max_fetch_messages: 1000,
            max_fetch_wait_ms: 30_000,
            min_lease_ms: 100,
            max_lease_ms: 300_000,
            segment_bytes: 128 << 20,
            retention_interval_ms: 60_000,
        }
    }
}

/// Room in a frame for everything but the message itself: the frame header, the
/// request fields and the per-message framing.
const FRAME_OVERHEAD: u32 = 64 << 10;

/// The smallest `max_frame_bytes`: one message of the bus's largest size, framed.
pub(crate) const MIN_FRAME_BYTES: u32 = limits::MAX_MESSAGE_BYTES as u32 + FRAME_OVERHEAD;

impl BrokerConfig {
    /// Refuse values that cannot work, naming the key (`broker.<key>`).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |k: &str, why: String| Err(Error::config(format!("broker.{k}: {why}")));
        let min_frame = MIN_FRAME_BYTES;
        if self.max_frame_bytes < min_frame || self.max_frame_bytes > 256 << 20 {
            return bad(
                "max_frame_bytes",
                format!(
                    "must be between {min_frame} and {} (a frame must hold one message of the largest size)",
                    256 << 20
                ),
            );
        }
        if self.max_connection_buffer_bytes < self.max_frame_bytes as usize {
            return bad(
                "max_connection_buffer_bytes",
                "must be at least max_frame_bytes".into(),
            );
        }
        for (k, v) in [
            ("max_connections", self.max_connections),
            (
                "max_requests_per_connection",
                self.max_requests_per_connection,
            ),
            ("max_topics", self.max_topics),
            ("max_groups", self.max_groups),
            ("max_members_per_group", self.max_members_per_group),
        ] {
            if v == 0 {
                return bad(k, "must be positive".into());
            }
        }
        if self.max_partitions == 0 {
            return bad("max_partitions", "must be positive".into());
        }
        if self.max_in_flight_per_member == 0 {
            return bad("max_in_flight_per_member", "must be positive".into());
        }
        if self.max_unacked_span < u64::from(limits::MAX_IN_FLIGHT) {
            return bad(
                "max_unacked_span",
                format!(
                    "must be at least {} (the bus's largest max_in_flight)",
                    limits::MAX_IN_FLIGHT
                ),
            );
        }
        if self.max_fetch_messages == 0 {
            return bad("max_fetch_messages", "must be positive".into());
        }
        if self.max_fetch_wait_ms == 0 || self.max_fetch_wait_ms > 3_600_000 {
            return bad(
                "max_fetch_wait_ms",
                "must be between 1 and 3600000 (an hour)".into(),
            );
        }
        if self.min_lease_ms < 10 || self.max_lease_ms < self.min_lease_ms {
            return bad(
                "min_lease_ms",
                "must be at least 10 and at most max_lease_ms".into(),
            );
        }
        if self.max_lease_ms > 86_400_000 {
            return bad("max_lease_ms", "must be at most 86400000 (a day)".into());
        }
        if self.segment_bytes < 1 << 20 {
            return bad("segment_bytes", "must be at least 1 MiB".into());
        }
        if self.retention_interval_ms == 0 {
            return bad("retention_interval_ms", "must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_mistakes_name_the_key() {
        assert!(BrokerConfig::default().validate().is_ok());
        let cfg = BrokerConfig {
            max_frame_bytes: 1024,
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("broker.max_frame_bytes:"), "{err}");
        let cfg = BrokerConfig {
            max_members_per_group: 0,
            ..Default::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("broker.max_members_per_group:"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = serde_json::from_str::<BrokerConfig>(r#"{"max_conections": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_conections"), "{err}");
        let cfg: BrokerConfig = serde_json::from_str(r#"{"listen": "127.0.0.1:0"}"#).unwrap();
        assert_eq!(cfg.listen.port(), 0);
        assert!(cfg.enabled);
    }
}

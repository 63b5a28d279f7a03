//! The embedded message broker: the default backend of the bus
//! ([`shoal_bus::Bus`]), hosted by the control plane and spoken to over TCP.
//!
//! - [`Broker`] keeps topics on disk, one [`shoal_log::Log`] per partition under
//!   `<data_dir>/topics/<topic>/<partition>/`, the topic catalogue in
//!   `<data_dir>/topics.json` and each topic's committed group offsets in
//!   `<data_dir>/topics/<topic>/offsets`. It runs consumer groups: leases,
//!   partition assignment, in-flight deliveries, ack timeouts, nacks with backoff,
//!   dead letters, seeks, lag.
//! - [`serve`] speaks the wire protocol of `docs/bus-protocol.md`: length-prefixed
//!   binary frames, each request with an id its answer echoes, so one connection
//!   carries many requests at once.
//! - [`EmbeddedBus`] is the client: a [`shoal_bus::Bus`] over one multiplexed
//!   connection.
//! - [`BrokerConfig`] holds the limits (the `[control_plane.broker]` table).
//!
//! # Durability
//!
//! A publish is answered after its messages are fsynced; publishes that arrive
//! while an fsync runs share the next one. An ack is answered after the committed
//! offset it moved (the first offset not yet acked) is on disk. A crash therefore
//! never loses an acknowledged publish nor an unacked message; it may redeliver
//! messages that were acked out of order above an unacked one (only the committed
//! offset is kept), and it resets attempt counts to 1.

mod broker;
mod catalog;
mod client;
mod config;
mod group;
mod message;
mod metrics;
mod offsets;
mod protocol;
mod server;
mod util;

#[cfg(test)]
mod tests;

pub use broker::Broker;
pub use client::{ClientOptions, EmbeddedBus};
pub use config::BrokerConfig;
pub use server::serve;

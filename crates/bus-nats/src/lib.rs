//! The NATS JetStream backend of the bus contract ([`shoal_bus::Bus`]), chosen by
//! configuration instead of the embedded broker.
//!
//! ```ignore
//! let bus = shoal_bus_nats::JetStreamBus::connect("nats://127.0.0.1:4222", Default::default()).await?;
//! ```
//!
//! # The mapping
//!
//! - **Topic → stream.** Topic `orders.placed` is stream `SHOAL_orders_placed` on
//!   subjects `shoal.orders.placed.<partition>`, file storage, retention from the
//!   [`TopicSpec`](shoal_bus::TopicSpec) (`retention_bytes` × partitions for the whole
//!   stream, `retention_ms` as max age, oldest dropped first). The partition count is
//!   in the stream's description, read once per topic by a publisher and cached.
//!   With [`NatsOptions::prefix`] every name gets a namespace (see `names.rs`).
//! - **Publish.** A message goes to its key's partition subject with its id in
//!   `Nats-Msg-Id` (JetStream drops a re-publish within its 2-minute duplicate
//!   window), its key in `Shoal-Bus-Key` and its headers as NATS headers. A batch is
//!   checked whole, then sent whole, then its acknowledgements are awaited: one round
//!   trip per batch, and concurrent publishers share one connection with up to
//!   [`NatsOptions::max_pending_acks`] acknowledgements pending.
//! - **Group → durable pull consumers**, one per partition (`<group>_p<n>`), filtered
//!   on the partition's subject, explicit acks, `ack_wait` = `ack_timeout_ms`,
//!   `max_ack_pending` = `max_in_flight`, made at [`StartAt`](shoal_bus::StartAt) when
//!   the group has no position yet. The last member to join sets the ack timeout and
//!   in-flight limit of the group.
//! - **Members** hold leases in the key-value bucket `shoal_groups` and split the
//!   partitions round-robin over their sorted ids (see `membership.rs`).
//! - **Ack** is sent without waiting for the server's confirmation (JetStream's
//!   default; a round trip per message otherwise): an ack lost with the connection
//!   means one more delivery. **Nack** is a NAK with the delay (the options' backoff
//!   by default), confirmed; the attempt is JetStream's delivery count. A nack on the last attempt, or a delivery fetched past its last attempt
//!   (the last one timed out), publishes the message to the dead-letter topic with the
//!   `shoal-dead-*` headers, then terminates it.
//! - **Seek** deletes the group's consumers and makes them again at the new position;
//!   **lag** is the sum over partitions of the consumers' pending plus unacked counts.
//!
//! # Where it differs from the embedded broker
//!
//! - **Offsets are stream sequences**: they start at 1, grow over the whole topic, and
//!   have gaps within a partition. They still order a partition and
//!   `StartAt::Offset(n)` still means "from the first message at or after n".
//! - **Durability**: nats-server 2.9 acknowledges a publish once written, before
//!   fsync (it syncs every 2 minutes; `sync_interval: always` exists from 2.10).
//! - **Rebalancing is not instant.** A member joining or leaving is seen by the others
//!   within milliseconds, but one that dies keeps its partitions until its lease runs
//!   out ([`NatsOptions::lease_ttl_ms`]), and its unacked deliveries come back after
//!   their ack timeout. A member that loses a partition keeps fetching it until its
//!   current pull request ends (2 s): for that long two members may get deliveries of
//!   one partition (never the same one twice, unless redelivered).
//! - **A seek from another process** reaches a member within milliseconds, but
//!   deliveries that member had already fetched may still be handed out once. A seek
//!   through the same [`JetStreamBus`] holds its local members exactly.
//! - **Headers** named `Nats-*` or `Shoal-Bus-*` are refused (`InvalidInput`); header
//!   values may not hold line breaks.
//! - **Lag** of a group that never subscribed is `NotFound`.
//! - The server's `max_payload` must leave room for the bus's largest message and its
//!   headers (`scripts/nats-server` sets 2 MiB).

mod bus;
mod codec;
mod consumer;
mod error;
mod membership;
mod names;
mod options;

pub use bus::JetStreamBus;
pub use options::NatsOptions;

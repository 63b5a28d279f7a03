//! The event store: what event sourcing and CQRS in shoal build on.
//!
//! - [`EventStore`]: streams with optimistic concurrency ([`ExpectedVersion`], a
//!   `Conflict` error when it does not hold), a global order without gaps, reads
//!   forwards and backwards, read-all from a position, catch-up then live
//!   [`Subscription`]s, snapshots, event metadata (correlation and causation ids,
//!   time), versioned event types with [`Upcasters`]; appends are durable when they
//!   return and share fsyncs through group commit; an append sent again is
//!   recognised where its first try put its events (at the versions after the one
//!   it expected, or for `ExpectedVersion::Any` as its stream's latest append);
//!   event ids are not otherwise checked for uniqueness (docs/eventstore.md);
//! - [`Aggregate`]: load (snapshot plus later events), decide, append, and decide
//!   again on a conflict;
//! - [`ProjectionRunner`]: read models fed from the global order, checkpointed in the
//!   same transaction as each change, rebuildable from zero;
//! - [`ReadThrough`]: a bounded in-process cache for another service's reference
//!   data, with a time to live and invalidation by that service's events.
//!
//! It lives in the service's own database ([`shoal_db::Db`]), SQLite or
//! PostgreSQL, in tables prefixed `_shoal_es_`; the same conformance suite runs on
//! both.

mod aggregate;
mod cache;
mod postgres;
mod projection;
mod sqlite;
mod store;
mod types;
mod upcast;

#[cfg(test)]
mod tests;

pub use aggregate::{stream_of, Aggregate, Loaded, MAX_CONFLICT_RETRIES};
pub use cache::{Invalidator, ReadThrough};
pub use projection::{Projection, ProjectionFuture, ProjectionRunner};
pub use store::{EventStore, Snapshot, Subscription};
pub use types::{
    limits, validate_stream_id, Appended, Direction, ExpectedVersion, Metadata, NewEvent,
    RecordedEvent,
};
pub use upcast::Upcasters;

/// The [`Metadata::extra`] key of the W3C `traceparent` of the request an event was
/// appended in (added by [`EventStore::append`] inside a request).
pub const TRACEPARENT_KEY: &str = "traceparent";

//! Core contracts of shoal.
//!
//! Every other platform crate builds on the small, stable types defined here:
//! - [`Error`]: the platform's error, which says where a failure came from
//!   ([`Origin`]) and whether trying again can help ([`Error::is_retryable`]);
//! - [`ApiError`]: the one JSON error body every shoal HTTP answer uses;
//! - [`registry`]: the wire types of the registry API (a non-Rust service speaks them too);
//! - [`resilience`]: the wire types of fault injection and circuit breaker listings;
//! - [`log_levels`]: the wire types of run-time log levels (`/v1/log-levels`);
//! - [`config`]: typed configuration from TOML plus `SHOAL_*` environment overrides,
//!   with unknown keys rejected;
//! - [`trace`]: W3C trace context (`traceparent`);
//! - [`deadline`]: deadlines that travel with a request (`x-shoal-deadline-ms`);
//! - [`headers`]: the header names shoal reads and writes;
//! - [`longpoll`]: the wait behind every watch API;
//! - [`shutdown`]: waiting for SIGTERM or SIGINT.
//!
//! This crate changes rarely; it holds contracts, not machinery.

mod api_error;
pub mod config;
pub mod deadline;
mod error;
pub mod headers;
pub mod log_levels;
pub mod longpoll;
pub mod names;
pub mod registry;
pub mod resilience;
pub mod shutdown;
pub mod trace;

pub use api_error::ApiError;
pub use error::{Error, ErrorKind, Origin};

/// Milliseconds since the Unix epoch, for timestamps that cross process boundaries.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

//! The shoal API gateway: the single entry point of a shoal system.
//!
//! This first version does server-side discovery: it routes path prefixes to
//! services resolved through the registry, balancing across healthy instances over
//! pooled keep-alive connections, and streams responses back. Every answer carries
//! `x-request-id`; the trace is continued or started; errors are JSON. The full
//! gateway (tokens, rate limits, validation, aggregation, canary weights, strangler
//! routes) grows from here; see ARCHITECTURE.md.

mod config;
mod proxy;

pub use config::{GatewayConfig, RouteConfig};
pub use proxy::{serve, Gateway};

//! The shoal service SDK: a service in a few lines of Rust.
//!
//! ```ignore
//! use shoal::{Ctx, Migration, Service};
//!
//! static MIGRATIONS: &[Migration] = &[Migration::new(1, "init", include_str!("../migrations/001_init.sql"))];
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     Service::new("inventory")
//!         .version(env!("CARGO_PKG_VERSION"))
//!         .database(MIGRATIONS)
//!         .routes(axum::Router::new().route("/api/stock", axum::routing::get(stock)))
//!         .main()
//!         .await
//! }
//!
//! async fn stock(ctx: Ctx) -> Result<String, shoal::ApiError> { /* ctx.db(), ctx.client("catalog") */ }
//! ```
//!
//! The SDK does the rest: typed config from a TOML file plus `SHOAL_*` overrides;
//! binds (127.0.0.1:0 by default) and registers the real address; heartbeats;
//! `/health/live`, `/health/ready` (pluggable checks) and `/metrics`; JSON logs with
//! request and trace ids; a database of the service's own with embedded migrations;
//! an HTTP client that calls other services by name with load balancing and the
//! resilience policies of its config (retry, circuit breaker, timeouts and
//! deadlines, bulkhead, rate limit); run-time fault injection for chaos tests; and
//! a graceful shutdown on SIGTERM/SIGINT (deregister, drain, stop); and, opt-in,
//! service-to-service mutual TLS with SPIFFE identities from the control plane's CA
//! and an authorization policy of callers (`[tls]`, `[authorization]`;
//! docs/mtls.md).

mod authz;
mod bus_connect;
mod config;
mod ctx;
mod health;
mod identity;
pub mod messaging;
mod service;
pub mod testing;

pub use config::{
    AuthorizationConfig, BusBackend, BusConfig, DatabaseConfig, ServiceConfig, TlsConfig, TlsMode,
    TlsSource,
};
pub use ctx::Ctx;
pub use identity::Identity;
pub use service::{RunningService, Service};
pub use shoal_core::{ApiError, Error, ErrorKind, Origin};
pub use shoal_db::{Backend, Db, DbOptions, Migration};
pub use shoal_discovery::{ClientResponse, ServiceClient, Strategy};
pub use shoal_telemetry::{Metrics, RequestContext};
/// The caller's verified identity on a mutual-mode service's requests (a request
/// extension).
pub use shoal_tls::{CertStore, PeerIdentity, SpiffeId};

/// Event sourcing and CQRS: the event store, aggregates, projections, the
/// read-through cache (`Service::event_store`, `Ctx::events`).
pub use shoal_eventstore as events;

/// Orchestrated sagas: steps with compensations, a durable saga log, resume
/// after a crash (docs/sagas.md).
pub use shoal_saga as saga;

/// The bus contract (topics, consumer groups, messages), whatever the backend.
pub use shoal_bus as bus;

/// Resilience policies and fallbacks (`shoal::resilience::with_fallback`,
/// `LastGood`); the service client applies the configured policies by itself.
pub use shoal_resilience as resilience;

/// The database driver the SDK uses, re-exported so a service needs no version of its own.
pub use sqlx;

/// Time as services show it: Unix milliseconds and RFC 3339 text (UTC).
pub mod time {
    pub use shoal_core::unix_ms;
    pub use shoal_telemetry::logging::{rfc3339, rfc3339_now};
}

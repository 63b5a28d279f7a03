//! The service registry, hosted by the control plane.
//!
//! Instances register with a lease (TTL) and keep it alive with heartbeats; an
//! instance that misses its lease expires. The registry also probes every instance's
//! readiness endpoint and takes failing instances out of discovery until they pass
//! again. Clients learn of every change through a long poll on the catalog index
//! (`GET /v1/services?index=N`), within milliseconds of the change.
//!
//! State is written to a file after each change, so a restarted control plane knows
//! the instances that keep heartbeating without waiting for them to register again.
//!
//! Instances that serve mutual TLS only (metadata `tls = "mutual"`) are probed
//! over mTLS with the control plane's identity ([`Registry::set_probe_tls`]).
//!
//! With `etcd` set ([`EtcdConfig`]) the registry is also kept in etcd: control
//! planes on several hosts then share one catalog (leases for TTLs, a watch for
//! the others' instances; see the `etcd` module).
//!
//! The HTTP/JSON API is documented in `docs/registry-api.md`.

mod api;
mod config;
mod etcd;
mod health;
mod registry;
mod store;

pub use api::router;
pub use config::{EtcdConfig, HealthCheckConfig, RegistryConfig};
pub use registry::{ProbeClients, Registry, RegistryError};

//! Client-side discovery: everything a process needs to find and call other services.
//!
//! - [`RegistryClient`]: the registry's HTTP API (register, heartbeat, deregister, watch);
//! - [`Lease`]: keeps one instance registered (heartbeats; re-registers if the registry
//!   forgot it, for example after a control-plane restart) and deregisters on shutdown;
//! - [`Discovery`]: a local copy of the catalog, kept current by a long-poll watch, so
//!   a call never waits on the registry and survives the registry being briefly away;
//! - [`Balancer`]: picks a healthy instance (round robin, or power of two choices on
//!   outstanding requests);
//! - [`Caller`]: sends a request to a service by name under its resilience policy
//!   (`shoal-resilience`) over pooled keep-alive connections, passing on request id,
//!   trace context and deadline; [`ServiceClient`] is its convenient, buffered face
//!   (`ctx.client("catalog").get("/api/products")`);
//! - [`FaultWatch`]: keeps a process's injected faults in step with the control plane;
//! - [`LogLevelWatch`]: keeps a process's log filter in step with `shoal log-level`.

mod balance;
mod body;
mod caller;
mod client;
mod discovery;
mod faults;
mod lease;
mod log_levels;
mod registry_client;
mod traces;
mod watch;

pub use balance::{Balancer, Endpoint, InflightGuard, OutlierConfig, Strategy};
pub use caller::{Caller, CallerConfig, GuardedBody, UpstreamVersion};
pub use client::{ClientResponse, RequestBuilder, ServiceClient};
pub use discovery::Discovery;
pub use faults::FaultWatch;
pub use lease::Lease;
pub use log_levels::LogLevelWatch;
pub use registry_client::RegistryClient;
pub use traces::{SpanView, TraceView};

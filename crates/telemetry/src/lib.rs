//! Logs, metrics and request context for every shoal process.
//!
//! - [`logging`]: structured JSON logs, one object per line, every line carrying the
//!   service, the instance and (inside a request) the request id and trace id;
//! - [`logread`]: reading the log store of `shoal up` back, merged and filtered
//!   (`shoal logs`, the control plane's log search);
//! - [`metrics`]: Prometheus metrics that follow `docs/metrics.md`;
//! - [`context`]: the request context (request id, trace) a request carries through
//!   a process, so outgoing calls pass it on without the handler doing anything;
//! - [`spans`]: distributed tracing, spans exported over OTLP/HTTP;
//! - [`http`]: the server middleware that does all of the above for an axum router
//!   and turns every error answer into shoal's JSON error shape.

pub mod context;
pub mod http;
pub mod logging;
pub mod logread;
pub mod metrics;
pub mod spans;

pub use context::RequestContext;
pub use metrics::Metrics;
pub use spans::{SpanKind, Tracer, TracingConfig};

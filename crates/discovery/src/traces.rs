//! Reading the control plane's trace collector (`GET /v1/traces/{id}`), for
//! `shoal trace` and tests.

use crate::registry_client::encode;
use crate::RegistryClient;
use http::Method;
use serde::Deserialize;
use shoal_core::Error;
use std::collections::BTreeMap;

/// One trace as the collector has it.
#[derive(Clone, Debug, Deserialize)]
pub struct TraceView {
    /// 32 hex digits.
    pub trace_id: String,
    /// Its spans, by start time.
    pub spans: Vec<SpanView>,
    /// Spans received but not kept (the trace was over the collector's limit).
    #[serde(default)]
    pub spans_not_kept: u64,
}

/// One span of a [`TraceView`].
#[derive(Clone, Debug, Deserialize)]
pub struct SpanView {
    /// 16 hex digits.
    pub span_id: String,
    /// Its parent's id; `None` for the root.
    #[serde(default)]
    pub parent_span_id: Option<String>,
    /// What it did.
    pub name: String,
    /// `server`, `client`, `producer`, `consumer` or `internal`.
    pub kind: String,
    /// The service that recorded it.
    pub service: String,
    /// Its instance.
    pub instance: String,
    /// Start, Unix nanoseconds.
    pub start_unix_nanos: u64,
    /// End, Unix nanoseconds.
    pub end_unix_nanos: u64,
    /// `ok` or `error`.
    pub status: String,
    /// Why it failed.
    #[serde(default)]
    pub status_message: Option<String>,
    /// Its attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

impl RegistryClient {
    /// The spans of trace `id` (32 hex digits); `NotFound` when the collector has
    /// none (not received yet, or forgotten).
    pub async fn trace(&self, id: &str) -> Result<TraceView, Error> {
        let (status, bytes) = self
            .call(
                Method::GET,
                &format!("/v1/traces/{}", encode(id)),
                None,
                self.timeout(),
            )
            .await?;
        Self::decode(status, &bytes, "trace")
    }
}

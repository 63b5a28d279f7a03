//! The shoal control plane: one process that hosts the platform's shared parts.
//!
//! Today it hosts the service registry, the fault table of run-time fault injection
//! ([`FaultTable`], `/v1/faults`) and the circuit breaker overview (`/v1/breakers`,
//! gathered from every instance on request). The embedded broker, the certificate
//! authority, the trace collector and the dashboard join it here, each as a router
//! merged into [`router`] and a background task started by [`run`].

mod breakers;
mod faults;

pub use faults::{FaultError, FaultTable};

use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use shoal_core::Error;
use shoal_registry::{Registry, RegistryConfig};
use shoal_telemetry::http::ServerTelemetry;
use shoal_telemetry::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The `[control_plane]` table of the system file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// Where services and tools reach the control plane.
    pub listen: SocketAddr,
    /// Where it keeps its state (the registry's state file, by default).
    pub data_dir: PathBuf,
    /// Log filter.
    pub log_level: String,
    /// The registry.
    pub registry: RegistryConfig,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from(".shoal/control-plane"),
            log_level: "info".into(),
            registry: RegistryConfig::default(),
        }
    }
}

/// The control plane's HTTP API: the registry's routes, the fault table's, the
/// breaker overview, health and metrics.
pub fn router(registry: Registry, faults: FaultTable, metrics: Metrics) -> Router {
    let render = metrics.clone();
    let telemetry = Arc::new(ServerTelemetry {
        metrics,
        served_by: None,
        // Watches are long polls, bounded by the registry and the fault table
        // themselves; the breaker fan-out bounds each instance's answer.
        request_timeout: None,
        honour_deadline: false,
    });
    shoal_registry::router(registry.clone())
        .merge(faults::router(faults))
        .merge(breakers::router(registry))
        .route(
            "/health/ready",
            get(|| async { Json(serde_json::json!({"status": "ready"})) }),
        )
        .merge(shoal_telemetry::http::ops_routes(render))
        .fallback(|| async { shoal_core::ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            telemetry,
            shoal_telemetry::http::layer,
        ))
}

/// Run the control plane on `listener` until `shutdown` resolves.
pub async fn run(
    mut cfg: ControlPlaneConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    if cfg.registry.state_file.is_none() {
        cfg.registry.state_file = Some(cfg.data_dir.join("registry.json"));
    }
    let registry = Registry::new(cfg.registry.clone())?;
    let metrics = Metrics::new("control-plane");
    let faults = FaultTable::new();
    let app = router(registry.clone(), faults.clone(), metrics);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let expiry = {
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = faults.run_expiry() => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        })
    };
    let background = {
        let registry = registry.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            registry
                .run_background(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
        })
    };
    let mut rx = stop_rx;
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = rx.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    let _ = stop_tx.send(true);
    // Watches are long polls: give them a moment, then stop regardless.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    let _ = background.await;
    let _ = expiry.await;
    Ok(())
}

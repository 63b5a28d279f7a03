//! The shoal control plane: one process that hosts the platform's shared parts.
//!
//! Today it hosts the service registry, the fault table of run-time fault injection
//! ([`FaultTable`], `/v1/faults`), the circuit breaker overview (`/v1/breakers`,
//! gathered from every instance on request) and the embedded message broker
//! (`shoal-broker`, on a TCP port of its own; `GET /v1/broker` says where), and
//! the certificate authority of service-to-service mTLS (`GET /v1/ca`,
//! `POST /v1/certificates`, [`CaConfig`]; docs/mtls.md), and the metrics scraper
//! with its short history and alert rules (`/v1/metrics/summary`, `/v1/alerts`,
//! [`MetricsConfig`], [`AlertRule`]; docs/observability.md), and the trace
//! collector (OTLP/HTTP `POST /v1/traces`, kept in memory for `shoal trace`,
//! [`TraceStore`]), and the dashboard (`GET /dashboard`, the page; its topology
//! and the log search of `shoal up`'s log store, `GET /v1/logs`, from the
//! [`SystemView`] the CLI gives it). Each part is a router merged into [`router`],
//! with its background task started by [`run`].

mod alerts;
mod breakers;
mod ca;
mod dashboard;
mod faults;
mod log_levels;
mod log_search;
mod prom_text;
mod scrape;
mod traces;

pub use alerts::{validate_alerts, AlertKind, AlertRule};
pub use ca::CaConfig;
pub use dashboard::{RouteView, RoutesSource, SystemView};
pub use faults::{FaultError, FaultTable};
pub use log_levels::{LogLevelError, LogLevelTable};
pub use scrape::{MetricsConfig, StaticTarget};
pub use traces::{TraceStore, TraceStoreConfig};

use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use shoal_broker::{Broker, BrokerConfig};
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
    /// The embedded message broker (`[control_plane.broker]`).
    pub broker: BrokerConfig,
    /// The certificate authority of service-to-service mTLS (`[control_plane.ca]`).
    pub ca: CaConfig,
    /// The metrics scraper and its short history (`[control_plane.metrics]`).
    pub metrics: MetricsConfig,
    /// Alert rules evaluated after every scrape (`[[control_plane.alerts]]`).
    pub alerts: Vec<AlertRule>,
    /// The trace collector's limits (`[control_plane.traces]`).
    pub traces: TraceStoreConfig,
    /// The system around it (log store, `up.json`, the gateway's routes), for the
    /// dashboard and the log search: filled by `shoal control-plane --system`,
    /// never read from the file.
    #[serde(skip)]
    pub system: SystemView,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from(".shoal/control-plane"),
            log_level: "info".into(),
            registry: RegistryConfig::default(),
            broker: BrokerConfig::default(),
            ca: CaConfig::default(),
            metrics: MetricsConfig::default(),
            alerts: Vec::new(),
            traces: TraceStoreConfig::default(),
            system: SystemView::default(),
        }
    }
}

/// The control plane's HTTP API: the registry's routes, the fault table's, the
/// breaker overview, health and metrics (`GET /v1/broker` answers that no broker
/// runs; see [`router_with_broker`]).
pub fn router(registry: Registry, faults: FaultTable, metrics: Metrics) -> Router {
    router_with_broker(registry, faults, metrics, None)
}

/// [`router`], with `GET /v1/broker` answering `{"addr": "<broker>"}` (or 404
/// `not_found` when `broker` is `None`): services find the broker from the
/// registry's URL alone.
pub fn router_with_broker(
    registry: Registry,
    faults: FaultTable,
    metrics: Metrics,
    broker: Option<SocketAddr>,
) -> Router {
    router_full(registry, faults, metrics, broker, Hosted::default())
}

/// What a running control plane adds to the bare [`router`]: the CA, the system
/// around it, the scraper, the trace collector.
#[derive(Default)]
struct Hosted {
    ca: Option<ca::Authority>,
    system: SystemView,
    observe: Option<scrape::Observatory>,
    traces: Option<traces::TraceStore>,
}

/// [`router_with_broker`], with the CA's routes when `ca` is given.
fn router_full(
    registry: Registry,
    faults: FaultTable,
    metrics: Metrics,
    broker: Option<SocketAddr>,
    hosted: Hosted,
) -> Router {
    let Hosted {
        ca,
        system,
        observe,
        traces,
    } = hosted;
    // Without a collector (`router`), traces are kept by a default-sized store.
    let traces = traces.unwrap_or_else(|| traces::TraceStore::new(TraceStoreConfig::default()));
    // Without a scraper (`router`), the summary and the alerts answer empty.
    let observe =
        observe.unwrap_or_else(|| scrape::Observatory::idle(registry.clone(), metrics.clone()));
    let render = metrics.clone();
    let telemetry = Arc::new(ServerTelemetry {
        metrics,
        served_by: None,
        // Watches are long polls, bounded by the registry and the fault table
        // themselves; the breaker fan-out bounds each instance's answer.
        request_timeout: None,
        honour_deadline: false,
        // The control plane hosts the trace collector: tracing its own API would
        // feed the collector spans of its own ingestion.
        tracer: shoal_telemetry::Tracer::disabled(),
        // Watches and heartbeats all day long: only failures are worth a line.
        access_log: false,
        record_metrics: true,
    });
    shoal_registry::router(registry.clone())
        .merge(faults::router(faults))
        // Run-time log levels (`shoal log-level`); in memory, one table per router.
        .merge(log_levels::router(LogLevelTable::new()))
        // The dashboard (`/`, `/dashboard`) and the log search it uses.
        .merge(log_search::router(&system))
        .merge(dashboard::router(registry.clone(), system))
        .merge(breakers::router(registry))
        // The trace collector (OTLP/HTTP JSON) and `shoal trace`'s reads.
        .merge(traces::router(traces))
        // `/v1/metrics/summary`, `/v1/alerts`, `/v1/prometheus/targets`.
        .merge(scrape::router(observe))
        .merge(ca.map(ca::router).unwrap_or_default())
        .route(
            "/v1/broker",
            get(move || async move {
                match broker {
                    Some(addr) => {
                        Json(serde_json::json!({"addr": addr.to_string()})).into_response()
                    }
                    None => shoal_core::ApiError::not_found(
                        "the broker is not running here ([control_plane.broker] enabled = false)",
                    )
                    .into_response(),
                }
            }),
        )
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
    cfg.metrics.validate()?;
    cfg.traces.validate()?;
    validate_alerts(&cfg.alerts)?;
    let registry = Registry::new(cfg.registry.clone())?;
    let metrics = Metrics::new("control-plane");
    let faults = FaultTable::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The CA first: a bad [control_plane.ca] stops the start before anything runs.
    let (authority, own_identity) = if cfg.ca.enabled {
        let authority = ca::Authority::open(&cfg.ca, &cfg.data_dir)?;
        let (store, renewal) = authority.own_identity(stop_rx.clone())?;
        registry.set_probe_tls(shoal_registry::ProbeClients::new(
            store,
            shoal_tls::ClientSettings {
                connect_timeout: Duration::from_millis(cfg.registry.health.timeout_ms),
                ..shoal_tls::ClientSettings::default()
            },
        ));
        (Some(authority), Some(renewal))
    } else {
        (None, None)
    };
    let broker = if cfg.broker.enabled {
        Some(start_broker(&cfg, &metrics, stop_rx.clone()).await?)
    } else {
        None
    };
    // Scrapes every instance's /metrics and evaluates the alert rules.
    let observe = scrape::Observatory::new(
        cfg.metrics.clone(),
        cfg.alerts.clone(),
        registry.clone(),
        metrics.clone(),
        listener.local_addr().ok(),
    );
    let scraper = observe.spawn(stop_rx.clone());
    let app = router_full(
        registry.clone(),
        faults.clone(),
        metrics,
        broker.as_ref().map(|b| b.addr),
        Hosted {
            ca: authority,
            system: cfg.system.clone(),
            observe: Some(observe),
            traces: Some(traces::TraceStore::new(cfg.traces.clone())),
        },
    );
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
    let _ = scraper.await;
    if let Some(r) = own_identity {
        let _ = r.await;
    }
    if let Some(b) = broker {
        // Connections first (the server stops on the same signal), then the logs.
        let _ = b.server.await;
        b.broker.close().await;
    }
    Ok(())
}

/// The broker as the control plane runs it.
struct HostedBroker {
    addr: SocketAddr,
    broker: Broker,
    server: tokio::task::JoinHandle<()>,
}

/// Opens the broker in `<data_dir>/broker` (or `broker.data_dir`), binds
/// `broker.listen` and serves until `stop` turns true.
async fn start_broker(
    cfg: &ControlPlaneConfig,
    metrics: &Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<HostedBroker, Error> {
    let b = &cfg.broker;
    b.validate()?;
    let dir = b
        .data_dir
        .clone()
        .unwrap_or_else(|| cfg.data_dir.join("broker"));
    let listener = tokio::net::TcpListener::bind(b.listen).await.map_err(|e| {
        Error::config(format!("broker.listen: cannot listen on {}", b.listen)).with_source(e)
    })?;
    let addr = listener.local_addr()?;
    let broker = Broker::open(&dir, b.clone(), metrics).await?;
    tracing::info!(%addr, dir = %dir.display(), "broker listening");
    let served = broker.clone();
    let server = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = shoal_broker::serve(listener, served, stopped).await {
            tracing::error!(error = %e, "broker server failed");
        }
    });
    Ok(HostedBroker {
        addr,
        broker,
        server,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use shoal_bus::{Bus, OutgoingMessage, TopicSpec};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-cp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// `GET path` over a fresh connection: (status, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: cp\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap();
        (status, body)
    }

    struct Running {
        addr: SocketAddr,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), Error>>,
    }

    async fn start(cfg: ControlPlaneConfig) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(cfg, listener, async {
            let _ = rx.await;
        }));
        Running { addr, stop, task }
    }

    fn config(dir: &std::path::Path) -> ControlPlaneConfig {
        ControlPlaneConfig {
            data_dir: dir.to_path_buf(),
            broker: BrokerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..BrokerConfig::default()
            },
            ..ControlPlaneConfig::default()
        }
    }

    #[tokio::test]
    async fn hosts_the_broker_says_where_and_counts_it_in_metrics() {
        let dir = temp_dir("broker");
        for round in 0..2 {
            let cp = start(config(&dir)).await;
            // The control plane answers once it serves; the broker was opened before.
            let (status, body) = loop {
                if let Ok(s) = tokio::net::TcpStream::connect(cp.addr).await {
                    drop(s);
                    break get(cp.addr, "/v1/broker").await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
            assert_ne!(addr.port(), 0);
            let bus = shoal_broker::EmbeddedBus::connect(addr).await.unwrap();
            // The topic survives the restart of round 1.
            bus.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
            let p = bus
                .publish("t", vec![OutgoingMessage::new(&b"x"[..])])
                .await
                .unwrap();
            assert_eq!(p[0].offset, round);
            let (_, metrics) = get(cp.addr, "/metrics").await;
            assert!(
                metrics.contains("shoal_broker_published_total{"),
                "{metrics}"
            );
            drop(bus);
            cp.stop.send(()).unwrap();
            cp.task.await.unwrap().unwrap();
        }
        assert!(dir.join("broker").join("topics.json").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_disabled_broker_is_not_found_and_a_bad_one_names_its_key() {
        let dir = temp_dir("no-broker");
        let mut cfg = config(&dir);
        cfg.broker.enabled = false;
        let cp = start(cfg).await;
        let (status, body) = get(cp.addr, "/v1/broker").await;
        assert_eq!(status, 404, "{body}");
        cp.stop.send(()).unwrap();
        cp.task.await.unwrap().unwrap();
        assert!(!dir.join("broker").exists());

        let mut cfg = config(&dir);
        cfg.broker.max_topics = 0;
        let err = start(cfg).await.task.await.unwrap().unwrap_err();
        assert!(err.to_string().starts_with("broker.max_topics"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

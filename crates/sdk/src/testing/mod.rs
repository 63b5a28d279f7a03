//! Helpers for tests of services: a plain HTTP client for one address, and
//! [`TlsClient`], an mTLS client with a certificate of a control plane's CA for
//! instances in mutual TLS mode.
//!
//! Tests talk to a service the way a client would, over real HTTP on 127.0.0.1.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::Duration;

/// A whole HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    ///
    /// # Panics
    /// If the body is not JSON (a test failure, with the body in the message).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Send one request to `addr` with optional headers and body; errors as text.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    let res = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// GET `path` from `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Answer, String> {
    request(addr, Method::GET, path, &[], Bytes::new()).await
}

/// A data directory of a test's own under the system's temporary folder, removed
/// when dropped (so a test leaves nothing behind, pass or fail).
#[derive(Debug)]
pub struct DataDir(std::path::PathBuf);

impl DataDir {
    /// A fresh, empty directory whose name includes `tag`, the process id and a counter.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("shoal-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl std::ops::Deref for DataDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Start `service` on its own, the way a provider's tests run it: not registered
/// anywhere, its data in `dir`, logging warnings only.
pub async fn start_alone(
    service: crate::Service,
    dir: &std::path::Path,
) -> Result<crate::RunningService, crate::Error> {
    service
        .env([
            ("SHOAL_REGISTER".to_string(), "false".to_string()),
            ("SHOAL_LOG_LEVEL".to_string(), "warn".to_string()),
            ("SHOAL_DATA_DIR".to_string(), dir.display().to_string()),
        ])
        .start()
        .await
}

/// An embedded broker of a test's own, served on 127.0.0.1: point a service at it
/// with `SHOAL_BUS__URL` (see [`TestBroker::env`]) to test its messaging without a
/// control plane. Stopped and its files removed when dropped.
pub struct TestBroker {
    addr: SocketAddr,
    broker: shoal_broker::Broker,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: DataDir,
}

impl TestBroker {
    /// Open a fresh broker on a free port.
    pub async fn start() -> Result<Self, crate::Error> {
        let dir = DataDir::new("broker");
        let metrics = shoal_telemetry::Metrics::new("test-broker");
        let broker =
            shoal_broker::Broker::open(&*dir, shoal_broker::BrokerConfig::default(), &metrics)
                .await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = broker.clone();
        tokio::spawn(async move {
            let _ = shoal_broker::serve(listener, served, async {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Self {
            addr,
            broker,
            stop: Some(stop),
            _dir: dir,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The variable that points a service at it.
    pub fn env(&self) -> (String, String) {
        ("SHOAL_BUS__URL".into(), self.addr.to_string())
    }

    /// A client of it, to publish or read in a test.
    pub async fn bus(&self) -> Result<shoal_bus::SharedBus, crate::Error> {
        Ok(std::sync::Arc::new(
            shoal_broker::EmbeddedBus::connect(self.addr).await?,
        ))
    }

    /// A reader of `topic` from its start, in `group` (a group of the test's own).
    /// Waits at most 20 s for the topic to exist: a dead-letter topic appears only
    /// once something was dead-lettered.
    pub async fn reader(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Box<dyn shoal_bus::Consumer>, crate::Error> {
        let bus = self.bus().await?;
        let options = shoal_bus::SubscribeOptions {
            start: shoal_bus::StartAt::Earliest,
            ..shoal_bus::SubscribeOptions::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match bus.subscribe(topic, group, options.clone()).await {
                Ok(c) => return Ok(c),
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The broker itself.
    pub fn broker(&self) -> &shoal_broker::Broker {
        &self.broker
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A control plane (registry and health checks, no broker) in the test's process,
/// on a free port, checking health every 100 ms: services started against it
/// register and find each other by name, as under `shoal up`. Stopped and its files
/// removed by [`ControlPlane::stop`] (or when dropped, without waiting).
pub struct ControlPlane {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: DataDir,
}

impl ControlPlane {
    /// Start one.
    pub async fn start() -> Result<Self, crate::Error> {
        let dir = DataDir::new("cp");
        std::fs::create_dir_all(&*dir)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut registry = shoal_registry::RegistryConfig::default();
        registry.health.interval_ms = 100;
        registry.health.timeout_ms = 500;
        let mut cfg = shoal_control_plane::ControlPlaneConfig {
            listen: addr,
            data_dir: dir.to_path_buf(),
            log_level: "warn".into(),
            registry,
            ..Default::default()
        };
        // Messaging tests bring their own broker ([`TestBroker`]).
        cfg.broker.enabled = false;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = shoal_control_plane::run(cfg, listener, async {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Self {
            url: format!("http://{addr}"),
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        })
    }

    /// Its URL (`SHOAL_REGISTRY_URL`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The environment of a service registered here, its data in `dir`, logging
    /// warnings only, deregistering quickly at shutdown.
    pub fn env(&self, dir: &std::path::Path) -> Vec<(String, String)> {
        [
            ("SHOAL_REGISTRY_URL", self.url.clone()),
            ("SHOAL_LOG_LEVEL", "warn".to_string()),
            ("SHOAL_DATA_DIR", dir.display().to_string()),
            ("SHOAL_DEREGISTER_GRACE_MS", "50".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Start `service` registered here, its data in `dir`.
    pub async fn start_service(
        &self,
        service: crate::Service,
        dir: &std::path::Path,
    ) -> Result<crate::RunningService, crate::Error> {
        service.env(self.env(dir)).start().await
    }

    /// Stop it and wait (at most 5 s) until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub mod contract;
mod tls;

pub use tls::TlsClient;

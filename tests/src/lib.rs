//! Helpers for shoal's integration tests: start real control planes and gateways on
//! 127.0.0.1:0 inside the test process, and find the workspace's binaries.

use shoal_control_plane::ControlPlaneConfig;
use shoal_registry::RegistryConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server running inside the test process.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop it and wait until it has stopped.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Server {
    /// Run `serve` in a task; it gets the future that resolves when [`Server::stop`]
    /// is called.
    fn spawn<F, Fut>(addr: SocketAddr, serve: F) -> Self
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let stopped = Box::pin(async {
            let _ = rx.await;
        });
        Self {
            addr,
            stop: Some(tx),
            task: Some(tokio::spawn(serve(stopped))),
        }
    }
}

/// Registry settings for tests: fast probes.
pub fn fast_registry() -> RegistryConfig {
    let mut cfg = RegistryConfig::default();
    cfg.health.interval_ms = 100;
    cfg.health.timeout_ms = 500;
    cfg
}

/// A unique temporary folder.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("shoal-it-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Start a control plane on `addr` (port 0 for any) keeping state in `data_dir`.
pub async fn control_plane_at(
    addr: SocketAddr,
    registry: RegistryConfig,
    data_dir: PathBuf,
) -> Server {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind control plane");
    let addr = listener.local_addr().expect("addr");
    let mut cfg = ControlPlaneConfig {
        listen: addr,
        data_dir,
        log_level: "info".into(),
        registry,
        ..ControlPlaneConfig::default()
    };
    // Tests run many control planes at once: each broker on a free port.
    cfg.broker.listen = "127.0.0.1:0".parse().expect("addr");
    Server::spawn(addr, |stopped| async move {
        let _ = shoal_control_plane::run(cfg, listener, stopped).await;
    })
}

/// Start a control plane on a free port with fast health checks.
pub async fn control_plane() -> Server {
    control_plane_at(
        "127.0.0.1:0".parse().expect("addr"),
        fast_registry(),
        temp_dir("cp"),
    )
    .await
}

/// Start a gateway on a free port over the registry at `registry_url`.
pub async fn gateway(registry_url: &str, routes: &[(&str, &str)]) -> Server {
    let mut cfg = shoal_gateway::GatewayConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    };
    cfg.body_limit_bytes = 64 * 1024;
    cfg.routes = routes
        .iter()
        .map(|(prefix, service)| shoal_gateway::RouteConfig::to(prefix, service))
        .collect();
    gateway_with(registry_url, cfg).await
}

/// Start a gateway with `cfg` (its listen address is replaced by a free port).
/// Its client rate limits are raised far above what a test sends, unless the test
/// set its own.
pub async fn gateway_with(registry_url: &str, mut cfg: shoal_gateway::GatewayConfig) -> Server {
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    let defaults = shoal_gateway::ClientLimits::default();
    if cfg.rate_limit.anonymous == defaults.anonymous {
        cfg.rate_limit.anonymous.per_second = 1_000_000;
        cfg.rate_limit.anonymous.burst = 1_000_000;
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .expect("bind gateway");
    let addr = listener.local_addr().expect("addr");
    let discovery = shoal_discovery::Discovery::start(
        shoal_discovery::RegistryClient::new(registry_url).expect("registry url"),
    );
    Server::spawn(addr, |stopped| async move {
        let _ = shoal_gateway::serve(&cfg, listener, discovery, stopped).await;
    })
}

/// Poll `f` every 20 ms until it is true or `limit` passes; returns whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait (at most `limit`) until `GET path` on `addr` answers 200.
pub async fn answers_ok(addr: SocketAddr, path: &str, limit: Duration) -> bool {
    eventually(limit, || async {
        shoal::testing::get(addr, path)
            .await
            .is_ok_and(|a| a.status == 200)
    })
    .await
}

/// The folder cargo puts this build's binaries in (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test binary>
    exe.parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .expect("target dir")
}

/// Build the binaries the process tests run: the same command as `scripts/test`'s
/// build step, so that there it is a no-op. (A narrower `-p` list would unify
/// features differently and rebuild binaries on every call.)
pub fn build_binaries() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--workspace", "--bins"])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the binaries failed");
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test
/// leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

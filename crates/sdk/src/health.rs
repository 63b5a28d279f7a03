//! `/health/ready`: readiness from pluggable checks; and the plain-HTTP health
//! port (`health_listen`) that answers the same two probes to callers without a
//! certificate, such as Kubernetes' kubelet.

use crate::Ctx;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde_json::{json, Map, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest a single readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
pub(crate) type Check = Arc<dyn Fn(Ctx) -> CheckFuture + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Health {
    pub(crate) checks: Arc<Vec<(String, Check)>>,
    /// Set at shutdown: readiness fails so nothing new is routed here.
    pub(crate) draining: Arc<AtomicBool>,
}

pub(crate) fn wrap<F, Fut>(check: F) -> Check
where
    F: Fn(Ctx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move |ctx| Box::pin(check(ctx)))
}

/// `/health/ready` (the SDK's checks); `/health/live` and `/metrics` come from
/// [`shoal_telemetry::http::ops_routes`].
pub(crate) fn router(health: Health) -> Router {
    Router::new().route(
        "/health/ready",
        get(move |ctx: Ctx| {
            let health = health.clone();
            async move { ready(ctx, health).await }
        }),
    )
}

async fn ready(ctx: Ctx, health: Health) -> Response {
    let mut results = Map::new();
    let mut ok = true;
    if health.draining.load(Ordering::SeqCst) {
        ok = false;
        results.insert("shutdown".into(), Value::from("draining"));
    }
    for (name, check) in health.checks.iter() {
        let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check(ctx.clone())).await {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {} ms", CHECK_TIMEOUT.as_millis()),
        };
        ok &= outcome == "ok";
        results.insert(name.clone(), Value::from(outcome));
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "checks": results,
    });
    // 503 here is a health answer, not an error: it stays this shape (JSON).
    (status, Json(body)).into_response()
}

/// The only paths the plain health port answers.
const PROBE_PATHS: [&str; 2] = ["/health/live", "/health/ready"];

/// The plain-HTTP health port: `/health/live` and `/health/ready` with the main
/// port's own handlers (so the same answers), everything else 404. It carries
/// neither the authorization policy (a probe has no identity to check) nor the
/// request telemetry (probes every few seconds would count as traffic).
/// Stops when dropped.
pub(crate) struct HealthServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HealthServer {
    /// Bind `listen` and serve the probes of `health` there.
    pub(crate) async fn start(
        listen: SocketAddr,
        health: Health,
        metrics: shoal_telemetry::Metrics,
        ctx: Ctx,
    ) -> Result<Self, shoal_core::Error> {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            shoal_core::Error::config(format!("health_listen: cannot listen on {listen}"))
                .with_source(e)
        })?;
        let addr = listener.local_addr()?;
        // `ops_routes` brings `/metrics` too, which stays on the main port only.
        let app = router(health)
            .merge(shoal_telemetry::http::ops_routes(metrics))
            .layer(axum::middleware::from_fn(only_probes))
            .layer(axum::Extension(ctx));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "health port stopped");
            }
        });
        Ok(Self { addr, task })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn only_probes(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if PROBE_PATHS.contains(&req.uri().path()) {
        next.run(req).await
    } else {
        shoal_core::ApiError::not_found(
            "the health port serves /health/live and /health/ready only",
        )
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::testing::{self, ControlPlane, DataDir, TlsClient};
    use crate::{Service, ServiceConfig};

    #[tokio::test]
    async fn the_health_port_answers_probes_in_plain_http_while_the_main_port_is_mutual_tls() {
        let cp = ControlPlane::start().await.unwrap();
        let dir = DataDir::new("health-port");
        let running = Service::new("probed")
            .env(cp.env(&dir))
            .env([
                ("SHOAL_REGISTER", "false"),
                ("SHOAL_TLS__MODE", "mutual"),
                ("SHOAL_HEALTH_LISTEN", "127.0.0.1:0"),
            ])
            .start()
            .await
            .unwrap();
        let health = running.health_addr().unwrap();
        assert_ne!(health, running.addr());

        let live = testing::get(health, "/health/live").await.unwrap();
        assert_eq!(live.status, 200);
        assert_eq!(live.json()["status"], "live");
        let ready = testing::get(health, "/health/ready").await.unwrap();
        assert_eq!(ready.status, 200, "{}", ready.text());
        // Nothing but the two probes: metrics and routes stay behind mTLS.
        for path in ["/metrics", "/ops/breakers", "/api/anything"] {
            assert_eq!(
                testing::get(health, path).await.unwrap().status,
                404,
                "{path}"
            );
        }

        // The main port refuses plain HTTP, and over mTLS readiness answers the same.
        assert!(testing::get(running.addr(), "/health/live").await.is_err());
        let tls = TlsClient::issue(cp.url(), "operator").await.unwrap();
        let over_tls = tls
            .request(
                "probed",
                running.addr(),
                http::Method::GET,
                "/health/ready",
                &[],
                "",
            )
            .await
            .unwrap();
        assert_eq!(over_tls.status, 200);
        assert_eq!(over_tls.json(), ready.json());

        running.shutdown().await.unwrap();
        cp.stop().await;
    }

    #[test]
    fn the_health_port_must_differ_from_the_main_port() {
        let mut cfg = ServiceConfig {
            listen: "127.0.0.1:7301".parse().unwrap(),
            health_listen: Some("127.0.0.1:7301".parse().unwrap()),
            ..ServiceConfig::default()
        };
        let e = cfg.validate().unwrap_err();
        assert!(e.message().contains("health_listen"), "{e}");
        cfg.health_listen = Some("127.0.0.1:8081".parse().unwrap());
        cfg.validate().unwrap();
        // Two free ports are two addresses.
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.health_listen = Some("127.0.0.1:0".parse().unwrap());
        cfg.validate().unwrap();
    }
}

//! `/health/ready`: readiness from pluggable checks.

use crate::Ctx;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde_json::{json, Map, Value};
use std::future::Future;
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

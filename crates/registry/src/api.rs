//! The registry's HTTP/JSON API (see `docs/registry-api.md`).

use crate::{Registry, RegistryError};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use shoal_core::registry::{limits, Registration, ServiceEntry};
use shoal_core::ApiError;
use std::time::Duration;

/// The registry's routes, to be merged into the control plane's router.
pub fn router(registry: Registry) -> Router {
    Router::new()
        .route("/v1/instances", post(register))
        .route("/v1/instances/{id}", get(instance).delete(deregister))
        .route("/v1/instances/{id}/heartbeat", put(heartbeat))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service))
        .layer(DefaultBodyLimit::max(limits::MAX_BODY_BYTES))
        .with_state(registry)
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            RegistryError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_registration"),
            RegistryError::UnknownInstance(_) => (StatusCode::NOT_FOUND, "unknown_instance"),
            RegistryError::Full(_) => (StatusCode::SERVICE_UNAVAILABLE, "registry_full"),
        };
        ApiError::new(status, code, self.to_string()).into_response()
    }
}

async fn register(State(r): State<Registry>, body: Bytes) -> Response {
    // Parsed by hand (not the Json extractor) so every malformed payload gets one
    // clear 400 that says what is wrong and where, whatever the content type.
    let reg: Registration = match serde_json::from_slice(&body) {
        Ok(reg) => reg,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_registration",
                format!("invalid registration: {e}"),
            )
            .into_response()
        }
    };
    match r.register(reg) {
        Ok(done) => (StatusCode::CREATED, Json(done)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn heartbeat(State(r): State<Registry>, Path(id): Path<String>) -> Response {
    match r.heartbeat(&id) {
        Ok(ttl_ms) => Json(serde_json::json!({ "ttl_ms": ttl_ms })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn deregister(State(r): State<Registry>, Path(id): Path<String>) -> Response {
    match r.deregister(&id) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn instance(State(r): State<Registry>, Path(id): Path<String>) -> Response {
    match r.instance(&id) {
        Some(i) => Json(i).into_response(),
        None => RegistryError::UnknownInstance(id).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    /// Last index the client saw; absent answers at once.
    index: Option<u64>,
    /// How long to wait for a change (capped by the registry's `max_wait_ms`).
    wait_ms: Option<u64>,
    /// With `true`, only healthy instances are listed.
    #[serde(default)]
    healthy: bool,
}

async fn services(State(r): State<Registry>, Query(q): Query<WatchQuery>) -> Response {
    let mut catalog = match q.index {
        Some(index) => {
            let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000));
            r.wait_for_change(index, wait).await
        }
        None => r.catalog(),
    };
    if q.healthy {
        for s in &mut catalog.services {
            s.instances.retain(|i| i.healthy);
        }
        catalog.services.retain(|s| !s.instances.is_empty());
    }
    Json(catalog).into_response()
}

async fn service(
    State(r): State<Registry>,
    Path(name): Path<String>,
    Query(q): Query<WatchQuery>,
) -> Response {
    let catalog = match q.index {
        Some(index) => {
            r.wait_for_change(index, Duration::from_millis(q.wait_ms.unwrap_or(30_000)))
                .await
        }
        None => r.catalog(),
    };
    let mut instances = catalog.instances(&name).to_vec();
    if q.healthy {
        instances.retain(|i| i.healthy);
    }
    let mut res = Json(ServiceEntry { name, instances }).into_response();
    if let Ok(v) = catalog.index.to_string().parse() {
        res.headers_mut().insert("x-shoal-index", v);
    }
    res
}

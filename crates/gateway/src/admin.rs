//! Operators' endpoints under `/admin`: the route table (which paths still go to
//! the legacy system), live traffic weights (canary, blue-green), reloads and
//! breakers. Open only to an allowed source address and, when tokens are
//! configured, to a token with the admin scope.

use crate::gateway::{forbidden, Gateway};
use crate::guard;
use axum::extract::{ConnectInfo, Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use shoal_core::resilience::BreakerList;
use shoal_core::ApiError;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Most versions in one weights change.
const MAX_VERSIONS: usize = 16;

/// `Ok` when the caller may use the admin API.
async fn allowed(gw: &Gateway, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Response> {
    let inner = &gw.inner;
    let client = guard::client_ip(peer.ip(), headers, &inner.trusted);
    if !inner.admin_allow.permits(client) {
        tracing::warn!(%client, "admin call refused: source address not allowed");
        return Err(forbidden("admin endpoints are not open to this address"));
    }
    if let Some(v) = &inner.verifier {
        let claims = v
            .verify_bearer(headers.get(http::header::AUTHORIZATION))
            .await
            .map_err(|e| crate::proxy::token_refused(&e))?;
        if !claims.has_scope(&inner.cfg.admin.scope) {
            tracing::warn!(sub = %claims.sub, "admin call refused: no admin scope");
            return Err(forbidden("the token lacks the admin scope"));
        }
    }
    Ok(())
}

/// `GET /admin/routes`: the table as it runs, weights included.
pub(crate) async fn routes(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = allowed(&gw, peer, &headers).await {
        return r;
    }
    let table = gw.table();
    let list: Vec<Value> = table
        .routes()
        .iter()
        .map(|r| {
            let c = &r.cfg;
            let weights: BTreeMap<String, u32> = r.weights().into_iter().collect();
            let kind = if c.aggregate.is_some() {
                "aggregate"
            } else if c.legacy {
                "legacy"
            } else {
                "migrated"
            };
            json!({
                "name": r.name,
                "prefix": c.prefix,
                "path": c.path,
                "methods": c.methods,
                "host": c.host,
                "service": c.service,
                "services": c.services(),
                "upstream": kind,
                "legacy": c.legacy,
                "weights": weights,
                "auth": c.needs_token(),
                "scopes": c.scopes,
                "cached": c.cache.is_some(),
                "rewrite": c.rewrite,
                "strip_prefix": c.strip_prefix,
            })
        })
        .collect();
    let inner = &gw.inner;
    Json(json!({
        "generation": table.generation,
        "routes": list,
        "cache": {"entries": inner.cache.len(), "bytes": inner.cache.bytes()},
        "rate_limited_clients": {
            "anonymous": inner.anonymous.tracked_keys(),
            "authenticated": inner.authenticated.tracked_keys(),
        },
    }))
    .into_response()
}

/// `DELETE /admin/cache?prefix=/api/products`: drop cached answers under a path
/// prefix (all without one), for example after a price change.
pub(crate) async fn purge_cache(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = allowed(&gw, peer, &headers).await {
        return r;
    }
    let prefix = q.get("prefix").map_or("/", String::as_str);
    if !prefix.starts_with('/') {
        return ApiError::bad_request("prefix must start with '/'").into_response();
    }
    let dropped = gw.inner.cache.invalidate_prefix(prefix);
    Json(json!({"dropped": dropped})).into_response()
}

/// `PUT /admin/routes/{route}/weights` with `{"v1":90,"v2":10}`: the split changes
/// for the next request. A version at 0 gets no new requests; those in flight end
/// normally, so it drains without a failure.
pub(crate) async fn set_weights(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(route): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = allowed(&gw, peer, &headers).await {
        return r;
    }
    let table = gw.table();
    let Some(r) = table.by_name(&route) else {
        return ApiError::not_found(format!("no route named {route:?}")).into_response();
    };
    if r.cfg.service.is_none() {
        return ApiError::bad_request("an aggregate route has no weights").into_response();
    }
    let weights: BTreeMap<String, u32> = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                format!("weights must be an object of version to a whole number: {e}"),
            )
            .into_response()
        }
    };
    let bad =
        |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", m).into_response();
    if weights.is_empty() || weights.len() > MAX_VERSIONS {
        return bad("give 1 to 16 versions");
    }
    if weights.values().all(|w| *w == 0) {
        return bad("at least one weight must be positive");
    }
    if weights.values().any(|w| *w > 10_000) {
        return bad("a weight is at most 10000");
    }
    if weights
        .keys()
        .any(|v| v.is_empty() || v.len() > shoal_core::registry::limits::MAX_VERSION_LEN)
    {
        return bad("a version is 1 to 64 characters");
    }
    r.set_weights(weights.iter().map(|(k, v)| (k.clone(), *v)).collect());
    tracing::info!(route, ?weights, "route weights changed");
    Json(json!({"route": route, "weights": weights})).into_response()
}

/// `POST /admin/routes/reload`: read the routes file again now.
pub(crate) async fn reload(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = allowed(&gw, peer, &headers).await {
        return r;
    }
    match gw.reload() {
        Ok(g) => Json(json!({"generation": g})).into_response(),
        Err(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, "config_refused", e.to_string()).into_response()
        }
    }
}

/// `GET /admin/breakers`: the gateway's own breakers and every service instance's
/// (through the control plane).
pub(crate) async fn breakers(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = allowed(&gw, peer, &headers).await {
        return r;
    }
    let caller = &gw.inner.caller;
    let mut list = BreakerList {
        breakers: caller.resilience().breakers(),
        unreachable: Vec::new(),
    };
    if let Some(registry) = caller.balancer().discovery().registry() {
        match registry.breakers().await {
            Ok(services) => {
                list.breakers.extend(services.breakers);
                list.unreachable.extend(services.unreachable);
            }
            Err(e) => {
                tracing::warn!(error = %e, "control plane breaker listing failed");
                list.unreachable.push("control-plane".into());
            }
        }
    }
    Json(list).into_response()
}

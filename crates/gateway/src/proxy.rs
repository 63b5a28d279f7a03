use crate::config::{GatewayConfig, RouteConfig};
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use shoal_core::resilience::BreakerList;
use shoal_core::{ApiError, Error, ErrorKind};
use shoal_discovery::{Balancer, Caller, Discovery, FaultWatch};
use shoal_resilience::fault::FaultInjector;
use shoal_resilience::{Resilience, Scope};
use shoal_telemetry::http::ServerTelemetry;
use shoal_telemetry::Metrics;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection and are never
/// forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A running gateway's shared state.
#[derive(Clone)]
pub struct Gateway {
    caller: Caller,
    routes: Arc<Vec<RouteConfig>>,
    body_limit: usize,
    admin_allow: Arc<Vec<IpAddr>>,
    faults: FaultInjector,
}

struct RouteState {
    gw: Gateway,
    route: RouteConfig,
    /// The route's own policy scope, when it names a policy.
    scope: Option<&'static Scope>,
}

impl Gateway {
    /// A gateway over `discovery` with `cfg`'s routes.
    pub fn new(cfg: &GatewayConfig, discovery: Discovery, metrics: Metrics) -> Result<Self, Error> {
        cfg.validate()?;
        let resilience = Resilience::new(
            cfg.resilience.clone(),
            "gateway",
            Duration::from_millis(cfg.upstream.timeout_ms),
            Some(&metrics),
        )?;
        let faults = FaultInjector::new("gateway", resilience.metrics().cloned());
        let caller = Caller::new(
            Balancer::new(discovery, cfg.load_balancing),
            cfg.upstream.clone(),
            resilience,
            Some(metrics),
        );
        Ok(Self {
            caller,
            routes: Arc::new(cfg.routes.clone()),
            body_limit: cfg.body_limit_bytes,
            admin_allow: Arc::new(cfg.admin_allow.clone()),
            faults,
        })
    }

    /// The gateway's router: its own endpoints, then one route per prefix.
    pub fn router(&self, metrics: Metrics) -> Router {
        let mut router = Router::new();
        for route in self.routes.iter() {
            let scope = route.policy.as_ref().map(|p| {
                self.caller
                    .resilience()
                    .route_scope(&route.service, &route.prefix, p)
            });
            let st = Arc::new(RouteState {
                gw: self.clone(),
                route: route.clone(),
                scope,
            });
            let rest = if route.prefix == "/" {
                "/{*rest}".to_string()
            } else {
                format!("{}/{{*rest}}", route.prefix)
            };
            router = router
                .route(&route.prefix, any(proxy).with_state(st.clone()))
                .route(&rest, any(proxy).with_state(st));
        }
        let gw = self.clone();
        let admin = self.clone();
        router
            .route("/health/ready", get(move || ready(gw.clone())))
            .route("/admin/breakers", get(breakers).with_state(admin))
            .merge(shoal_resilience::ops_routes(
                self.caller.resilience().clone(),
            ))
            .merge(shoal_telemetry::http::ops_routes(metrics))
            .layer(DefaultBodyLimit::max(self.body_limit))
    }
}

/// 200 once every route has a healthy upstream; 503 naming the routes without one.
async fn ready(gw: Gateway) -> Response {
    let d = gw.caller.balancer().discovery();
    let missing: Vec<String> = gw
        .routes
        .iter()
        .filter(|r| d.healthy(&r.service).is_empty())
        .map(|r| format!("{} -> {}", r.prefix, r.service))
        .collect();
    if missing.is_empty() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not_ready", "no_healthy_upstream": missing})),
        )
            .into_response()
    }
}

/// `GET /admin/breakers`: the gateway's own breakers and every service instance's
/// (through the control plane). Operators only: an allowed source address.
async fn breakers(
    State(gw): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !gw.admin_allow.contains(&peer.ip()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "admin endpoints are not open to this address",
        )
        .into_response();
    }
    let mut list = BreakerList {
        breakers: gw.caller.resilience().breakers(),
        unreachable: Vec::new(),
    };
    if let Some(registry) = gw.caller.balancer().discovery().registry() {
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

/// True for a path that could mean something else after normalisation (dot
/// segments, encoded slashes or dots, backslashes, empty segments): such a path is
/// refused rather than forwarded.
fn ambiguous_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains('\\')
        || lower.contains("//")
        || lower.split('/').any(|s| s == "." || s == "..")
}

async fn proxy(
    State(st): State<Arc<RouteState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_string();
    if ambiguous_path(&path) {
        return ApiError::bad_request(
            "the path has dot segments, encoded separators or empty segments",
        )
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, st.gw.body_limit)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the request body is over {} bytes", st.gw.body_limit),
                )
                .into_response();
            }
            return ApiError::bad_request("the request body could not be read").into_response();
        }
    };

    let upstream_path = if st.route.strip_prefix && st.route.prefix != "/" {
        let rest = &path[st.route.prefix.len()..];
        if rest.is_empty() {
            "/".to_string()
        } else {
            rest.to_string()
        }
    } else {
        path.clone()
    };
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{upstream_path}?{q}"),
        None => upstream_path,
    };

    let mut out = match http::Request::builder()
        .method(parts.method.clone())
        .uri(&path_and_query)
        .body(Full::new(body))
    {
        Ok(r) => r,
        Err(_) => return ApiError::bad_request("invalid request target").into_response(),
    };
    let headers = out.headers_mut();
    copy_end_to_end(&parts.headers, headers);
    headers.remove(http::header::HOST);
    headers.remove(http::header::CONTENT_LENGTH);
    append_forwarded(headers, &parts.headers, peer);

    let sent = match &st.scope {
        Some(scope) => st.gw.caller.send_in(scope, out).await,
        None => st.gw.caller.send(&st.route.service, out).await,
    };
    match sent {
        Ok(res) => {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            let none_healthy = st
                .gw
                .caller
                .balancer()
                .discovery()
                .healthy(&st.route.service)
                .is_empty();
            upstream_error(&st.route.service, &e, none_healthy).into_response()
        }
    }
}

/// The gateway's answer for a failed upstream call, by the error's kind.
fn upstream_error(service: &str, e: &Error, none_healthy: bool) -> ApiError {
    tracing::warn!(service, error = %e, "upstream call failed");
    let (status, code, message) = match e.kind() {
        ErrorKind::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!("{service} did not answer in time"),
        ),
        ErrorKind::CircuitOpen => (
            StatusCode::SERVICE_UNAVAILABLE,
            "circuit_open",
            format!("{service} is failing; calls are paused"),
        ),
        ErrorKind::Overloaded => (
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("too many calls to {service} in flight"),
        ),
        ErrorKind::Unavailable if none_healthy => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_upstream",
            format!("no healthy instance of {service}"),
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            format!("{service} could not be reached"),
        ),
    };
    ApiError::new(status, code, message)
}

fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = from
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|c| c == n) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

fn append_forwarded(headers: &mut HeaderMap, original: &HeaderMap, peer: SocketAddr) {
    let xff = HeaderName::from_static("x-forwarded-for");
    // This gateway is the edge: a client's own X-Forwarded-For is not trusted
    // (trusted proxies come with the full gateway).
    headers.remove(&xff);
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        headers.insert(xff, v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if let Some(host) = original.get(http::header::HOST) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
}

/// Serve the gateway on `listener` until `shutdown` resolves.
pub async fn serve(
    cfg: &GatewayConfig,
    listener: tokio::net::TcpListener,
    discovery: Discovery,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let metrics = Metrics::new("gateway");
    let registry = discovery.registry().cloned();
    let gw = Gateway::new(cfg, discovery, metrics.clone())?;
    let _fault_watch = registry.map(|r| FaultWatch::start(r, gw.faults.clone()));
    let telemetry = Arc::new(ServerTelemetry {
        metrics: metrics.clone(),
        // Services say who served; the gateway adds nothing of its own.
        served_by: None,
        // The edge sets the deadline (its request timeout), which travels to every
        // service the request reaches; a client's own deadline header is not trusted.
        request_timeout: Some(Duration::from_millis(cfg.request_timeout_ms)),
        honour_deadline: false,
    });
    let app = gw
        .router(metrics)
        .fallback(|| async { ApiError::not_found("no route for this path") })
        .layer(axum::middleware::from_fn_with_state(
            gw.faults.clone(),
            shoal_resilience::fault::middleware,
        ))
        .layer(axum::middleware::from_fn_with_state(
            telemetry,
            shoal_telemetry::http::layer,
        ));
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguous_paths_are_caught() {
        for p in [
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api/%2E./x",
            "/api/a%2fb",
            "/a//b",
            "/a/./b",
            "/a\\b",
        ] {
            assert!(ambiguous_path(p), "{p}");
        }
        for p in ["/api/products", "/api/products/p-1", "/api/a.b", "/"] {
            assert!(!ambiguous_path(p), "{p}");
        }
    }

    #[test]
    fn connection_named_headers_are_not_forwarded() {
        let mut from = HeaderMap::new();
        from.insert("connection", HeaderValue::from_static("close, x-secret"));
        from.insert("x-secret", HeaderValue::from_static("1"));
        from.insert("x-kept", HeaderValue::from_static("2"));
        from.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to);
        assert!(to.get("x-secret").is_none());
        assert!(to.get("transfer-encoding").is_none());
        assert_eq!(to.get("x-kept").unwrap(), "2");
    }
}

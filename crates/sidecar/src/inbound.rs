//! The way in: every request the sidecar serves (other than the SDK's own routes)
//! goes on to the app, streamed both ways, and the app's health is the instance's
//! readiness.

use crate::headers::strip_hop_by_hop;
use crate::SidecarSettings;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderValue, StatusCode, Uri};
use http_body_util::Limited;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use shoal::{ApiError, PeerIdentity};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The header that tells the app who called, from the caller's verified mTLS
/// certificate (a caller's own value is removed first, so the app can trust it).
pub(crate) const X_SHOAL_CALLER: &str = "x-shoal-caller";

/// Idle keep-alive connections kept to the app: the hop is loopback, so a small
/// pool covers a busy app.
const APP_POOL_IDLE: usize = 32;

/// The app behind the sidecar: its address and a pooled plain-HTTP client.
pub(crate) struct App {
    addr: SocketAddr,
    health_uri: Uri,
    health_timeout: Duration,
    timeout: Duration,
    body_limit: usize,
    http: Client<HttpConnector, Body>,
}

impl App {
    pub(crate) fn new(s: &SidecarSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(s.app_timeout_ms)));
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(APP_POOL_IDLE)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        // Checked by `SidecarSettings::validate`: a path, and an address.
        let health_uri = format!("http://{}{}", s.app_addr, s.health_path)
            .parse()
            .unwrap_or_else(|_| Uri::from_static("http://127.0.0.1/health"));
        Self {
            addr: s.app_addr,
            health_uri,
            health_timeout: Duration::from_millis(s.health_timeout_ms),
            timeout: Duration::from_millis(s.app_timeout_ms),
            body_limit: s.body_limit_bytes,
            http,
        }
    }

    /// The readiness check: the app's health path answers 2xx in time.
    pub(crate) async fn healthy(&self) -> Result<(), String> {
        let req = http::Request::get(self.health_uri.clone())
            .body(Body::empty())
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.health_timeout, self.http.request(req)).await {
            Ok(Ok(res)) if res.status().is_success() => Ok(()),
            Ok(Ok(res)) => Err(format!("app health answered {}", res.status().as_u16())),
            Ok(Err(e)) => Err(format!("app does not answer: {e}")),
            Err(_) => Err(format!(
                "app health: no answer within {} ms",
                self.health_timeout.as_millis()
            )),
        }
    }

    /// Send `req` on to the app and stream its answer back.
    async fn forward(&self, req: Request) -> Response {
        let too_big = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > self.body_limit as u64);
        if too_big {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {} bytes", self.body_limit),
            )
            .into_response();
        }
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri = match format!("http://{}{}", self.addr, path).parse() {
            Ok(u) => u,
            Err(_) => {
                return ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "invalid path")
                    .into_response()
            }
        };
        let caller = parts
            .extensions
            .get::<PeerIdentity>()
            .map(|p| p.0.to_string());
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        headers.remove(X_SHOAL_CALLER);
        if let Some(v) = caller.and_then(|c| HeaderValue::from_str(&c).ok()) {
            headers.insert(X_SHOAL_CALLER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.addr.to_string()) {
            headers.insert(HOST, v);
        }
        parts.uri = uri;
        // HTTP/2 from the caller is HTTP/1.1 to the app: what any standard library
        // server speaks.
        parts.version = http::Version::HTTP_11;
        // A chunked body longer than the limit is cut: the app sees a broken body.
        let body = Body::new(Limited::new(body, self.body_limit));
        let req = http::Request::from_parts(parts, body);
        match tokio::time::timeout(self.timeout, self.http.request(req)).await {
            Ok(Ok(res)) => {
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, app = %self.addr, "app did not answer");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "app_unavailable",
                    "the service's app process did not answer",
                )
                .into_response()
            }
            Err(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "app_timeout",
                format!(
                    "the service's app process did not answer within {} ms",
                    self.timeout.as_millis()
                ),
            )
            .into_response(),
        }
    }
}

/// Every path not the SDK's own goes to the app.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new().fallback(move |req: Request| {
        let app = app.clone();
        async move { app.forward(req).await }
    })
}

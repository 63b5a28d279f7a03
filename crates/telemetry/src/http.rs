//! Server middleware shared by every shoal HTTP server (services, control plane,
//! gateway): request id, trace context, a server span, metrics, a request time limit, the
//! served-by header and JSON error bodies.

use crate::context::{accept_request_id, new_request_id, RequestContext};
use crate::spans::{SpanKind, Tracer};
use crate::Metrics;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use shoal_core::deadline::Deadline;
use shoal_core::headers::{TRACEPARENT, X_REQUEST_ID, X_SHOAL_SERVED_BY};
use shoal_core::trace::TraceContext;
use shoal_core::ApiError;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long past its own time limit a handler may take to answer for itself.
const OWN_LIMIT_GRACE: Duration = Duration::from_millis(50);

/// The most of a non-JSON error body kept as the JSON error's message.
const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// What the middleware needs; build one per server and share it.
#[derive(Clone)]
pub struct ServerTelemetry {
    /// Where request series go.
    pub metrics: Metrics,
    /// `service@version` for `x-shoal-served-by`; `None` switches the header off.
    pub served_by: Option<HeaderValue>,
    /// Longest time a handler may take before the request is answered 503.
    pub request_timeout: Option<Duration>,
    /// Honour a caller's `x-shoal-deadline-ms`: stop working on the request (and
    /// answer 504) once the caller has given up. The request timeout still applies
    /// when it is sooner. Off at an edge that does not trust its clients' headers.
    pub honour_deadline: bool,
    /// Records a server span per request ([`Tracer::disabled`] for none).
    pub tracer: Tracer,
    /// Log every request at `info` (`served`, with its trace id: what `shoal logs
    /// --trace` finds); off, only failures are logged at `info` and above.
    pub access_log: bool,
    /// Count requests in [`Self::metrics`]; off only to measure what counting
    /// costs (the gateway's `metrics = false`).
    pub record_metrics: bool,
}

/// A response extension naming the route that served a request, for servers that
/// route by themselves (the gateway's route table) rather than by axum's router:
/// metrics are labelled with it instead of `unmatched`.
#[derive(Clone, Debug)]
pub struct RouteLabel(pub Arc<str>);

/// `GET /health/live` and `GET /metrics`, which every shoal server answers the same
/// way. Each server adds its own `/health/ready`: what "ready" means differs.
pub fn ops_routes(metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/health/live",
            get(|| async { Json(serde_json::json!({"status": "live"})) }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
                        metrics.render(),
                    )
                }
            }),
        )
}

/// Apply with `router.layer(axum::middleware::from_fn_with_state(state, shoal_telemetry::http::layer))`.
pub async fn layer(
    State(st): State<Arc<ServerTelemetry>>,
    mut req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let request_id = req
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| accept_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    // Continue the caller's trace with a span of our own, or start one.
    let caller = req
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let trace = caller
        .map(|t| t.child())
        .unwrap_or_else(|| st.tracer.new_root());
    // Axum's matched path is shared (a clone counts a reference, copies nothing).
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let method = req.method().clone();
    req.headers_mut()
        .insert(TRACEPARENT, trace.to_header_value());
    // Checked by `accept_request_id` or made here: always a valid header value.
    let request_id_header = HeaderValue::from_str(&request_id).ok();
    if let Some(v) = &request_id_header {
        req.headers_mut().insert(X_REQUEST_ID, v.clone());
    }
    // The caller's deadline and our own time limit: the sooner one ends the request
    // (dropping the handler's future cancels its work, its calls included).
    let caller_deadline = if st.honour_deadline {
        Deadline::from_headers(req.headers())
    } else {
        None
    };
    let own_limit = st.request_timeout.map(Deadline::after);
    let deadline = Deadline::earliest(caller_deadline, own_limit);
    // Log lines written while the request is handled take its request id and
    // trace id from this context (see `logging::JsonLayer`): no `tracing` span per
    // request, whose fields would be formatted whether anything logs or not.
    let ctx = RequestContext {
        request_id,
        trace,
        deadline,
        tracer: st.tracer.clone(),
    };
    let mut server_span = st.tracer.span(
        trace,
        caller.map(|c| c.span_id),
        SpanKind::Server,
        String::new(),
    );

    if st.record_metrics {
        st.metrics.http_server.in_flight.inc();
    }
    let res = if caller_deadline.is_some_and(|d| d.expired()) {
        deadline_passed()
    } else {
        let run = ctx.scope(next.run(req));
        // At the caller's deadline no one waits: cut at once. At our own limit the
        // handler, whose calls carry the same deadline, gets a moment to answer for
        // itself (a gateway's 504 `upstream_timeout` says more than our 503).
        let cut = match deadline {
            Some(d) if Some(d) == caller_deadline => Some(d.0),
            Some(d) => Some(d.0 + OWN_LIMIT_GRACE),
            None => None,
        };
        match cut {
            Some(at) => match tokio::time::timeout_at(at, run).await {
                Ok(res) => res,
                Err(_) if deadline.is_some() && deadline == caller_deadline => deadline_passed(),
                Err(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    format!(
                        "the request took longer than {} ms",
                        st.request_timeout.unwrap_or_default().as_millis()
                    ),
                )
                .into_response(),
            },
            None => run.await,
        }
    };
    if st.record_metrics {
        st.metrics.http_server.in_flight.dec();
    }

    let mut res = normalise_error(res).await;
    let headers = res.headers_mut();
    if let Some(v) = &request_id_header {
        headers.insert(X_REQUEST_ID, v.clone());
    }
    if let Some(sb) = &st.served_by {
        headers.insert(X_SHOAL_SERVED_BY, sb.clone());
    }
    let status = res.status().as_u16();
    let elapsed = start.elapsed();
    let label = res.extensions().get::<RouteLabel>().map(|r| r.0.clone());
    let route: &str = match (&label, &matched) {
        (Some(l), _) => l,
        (None, Some(m)) => m.as_str(),
        (None, None) => "unmatched",
    };
    if st.record_metrics {
        st.metrics
            .observe_server(route, method.as_str(), status, elapsed.as_secs_f64());
    }
    if st.tracer.is_enabled() {
        server_span.rename(format!("{method} {route}"));
        server_span.set("http.route", route.to_string());
        server_span.set("http.response.status_code", status);
        if status >= 500 {
            server_span.fail(format!("answered {status}"));
        }
    }
    drop(server_span);
    let duration_ms = elapsed.as_millis() as u64;
    // tracing evaluates the fields only for a line that is written.
    let request_id = request_id_header.as_ref().and_then(|v| v.to_str().ok());
    macro_rules! served {
        ($level:ident) => {
            tracing::$level!(
                status,
                duration_ms,
                method = %method,
                route,
                request_id,
                trace_id = %trace.trace_id_hex(),
                "served"
            )
        };
    }
    if status >= 500 {
        served!(warn);
    } else if st.access_log {
        served!(info);
    } else {
        served!(debug);
    }
    res
}

fn deadline_passed() -> Response {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "deadline_exceeded",
        "the caller's deadline passed; the request was not completed",
    )
    .into_response()
}

/// Turn an error answer that is not JSON (a rejected extractor, an unknown path, a
/// 405) into shoal's JSON error shape, keeping its status and other headers.
pub async fn normalise_error(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_ERROR_MESSAGE_BYTES * 4);
    let text = match limited.collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
        Err(_) => String::new(),
    };
    let mut message: String = text.chars().take(MAX_ERROR_MESSAGE_BYTES).collect();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_string();
    }
    let err = ApiError::new(status, ApiError::code_for(status), message);
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(err.to_json()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_text_errors_become_json() {
        let res = (StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded").into_response();
        let res = normalise_error(res).await;
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":{"code":"payload_too_large","message":"length limit exceeded"}}"#
        );
    }

    #[tokio::test]
    async fn empty_error_gets_reason_and_success_is_untouched() {
        let res = normalise_error(StatusCode::NOT_FOUND.into_response()).await;
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(std::str::from_utf8(&body)
            .unwrap()
            .contains("\"Not Found\""));
        let ok = normalise_error((StatusCode::OK, "hi").into_response()).await;
        let body = ok.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hi");
    }
}

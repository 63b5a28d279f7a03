//! The way out: a plain-HTTP listener on loopback where the app sends its calls to
//! other services, `http://127.0.0.1:<port>/<service>/<path>`. Each call goes out
//! through the SDK's client, so it is balanced, under the dependency's resilience
//! policy, over mTLS with the callee's identity, a client span of the trace the app
//! passed on (`traceparent`), and bounded by the app's deadline.

use crate::headers::strip_hop_by_hop;
use crate::SidecarSettings;
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use shoal::{ApiError, Ctx};
use shoal_core::deadline::Deadline;
use shoal_core::headers::{TRACEPARENT, X_REQUEST_ID, X_SHOAL_DEADLINE_MS};
use shoal_core::trace::TraceContext;
use shoal_core::Error;
use shoal_telemetry::context::{accept_request_id, new_request_id};
use shoal_telemetry::RequestContext;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Bind the outbound listener (loopback only: checked by the settings).
pub(crate) async fn bind(s: &SidecarSettings) -> Result<TcpListener, Error> {
    TcpListener::bind(s.outbound_listen).await.map_err(|e| {
        Error::config(format!(
            "settings.outbound_listen: cannot listen on {}",
            s.outbound_listen
        ))
        .with_source(e)
    })
}

struct Outbound {
    ctx: Ctx,
    body_limit: usize,
    in_flight: Arc<Semaphore>,
}

/// Serve the app's outbound calls until the sidecar stops.
pub(crate) async fn serve(ctx: Ctx, listener: TcpListener, s: Arc<SidecarSettings>) {
    let out = Arc::new(Outbound {
        ctx: ctx.clone(),
        body_limit: s.body_limit_bytes,
        in_flight: Arc::new(Semaphore::new(s.max_outbound_in_flight)),
    });
    let app = Router::new().fallback(move |req: Request| {
        let out = out.clone();
        async move { out.call(req).await }
    });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(ctx.stopping())
        .await
    {
        tracing::error!(error = %e, "outbound listener failed");
    }
}

/// `/catalog/api/products?x=1` → (`catalog`, `/api/products?x=1`).
fn split_target(path_and_query: &str) -> Option<(&str, String)> {
    let rest = path_and_query.strip_prefix('/')?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (service, tail) = rest.split_at(end);
    let tail = if tail.starts_with('?') || tail.is_empty() {
        format!("/{tail}")
    } else {
        tail.to_string()
    };
    Some((service, tail))
}

impl Outbound {
    async fn call(&self, req: Request) -> Response {
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many outbound calls in flight at the sidecar",
            )
            .into_response();
        };
        let (mut parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let Some((service, path)) = split_target(&pq) else {
            return bad_target(&pq);
        };
        if shoal_core::names::validate_service_name(service).is_err() {
            return bad_target(&pq);
        }
        let body: Bytes = match Limited::new(body, self.body_limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the body is larger than {} bytes (or was cut)",
                        self.body_limit
                    ),
                )
                .into_response()
            }
        };
        // The trace the app passed on (the sidecar's own server span, when the app
        // copies `traceparent` from the request it is serving) or a new one; the
        // app's deadline when it sent one.
        let headers = &mut parts.headers;
        let trace = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse)
            .unwrap_or_else(|| self.ctx.tracer().new_root());
        let request_id = headers
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| accept_request_id(v))
            .map(str::to_string)
            .unwrap_or_else(new_request_id);
        let deadline = Deadline::from_headers(headers);
        strip_hop_by_hop(headers);
        // The client sets these itself, for the instance it picks and each attempt.
        for h in [HOST, CONTENT_LENGTH] {
            headers.remove(h);
        }
        for h in [TRACEPARENT, X_REQUEST_ID, X_SHOAL_DEADLINE_MS] {
            headers.remove(h);
        }
        let mut call = self.ctx.client(service).request(parts.method, &path);
        for (name, value) in headers.iter() {
            if let Ok(v) = value.to_str() {
                call = call.header(name.as_str(), v);
            }
        }
        let cx = RequestContext {
            request_id,
            trace,
            deadline,
            tracer: self.ctx.tracer().clone(),
        };
        match cx.scope(call.body(body).send()).await {
            Ok(res) => {
                let mut answer = Response::new(Body::from(res.body));
                *answer.status_mut() = res.status;
                *answer.headers_mut() = res.headers;
                strip_hop_by_hop(answer.headers_mut());
                answer.headers_mut().remove(CONTENT_LENGTH);
                answer
            }
            Err(e) => {
                tracing::info!(service, error = %e, "outbound call failed");
                ApiError::from(e).into_response()
            }
        }
    }
}

fn bad_target(path: &str) -> Response {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_target",
        format!("{path:?}: call http://<sidecar>/<service>/<path>, with a service name first"),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_segment_names_the_service() {
        assert_eq!(
            split_target("/catalog/api/products?x=1"),
            Some(("catalog", "/api/products?x=1".to_string()))
        );
        assert_eq!(split_target("/catalog"), Some(("catalog", "/".to_string())));
        assert_eq!(
            split_target("/catalog?x=1"),
            Some(("catalog", "/?x=1".to_string()))
        );
        assert_eq!(split_target("/"), Some(("", "/".to_string())));
        assert_eq!(split_target("catalog"), None);
    }
}

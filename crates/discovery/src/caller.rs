use crate::{Balancer, InflightGuard};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use shoal_core::headers::{TRACEPARENT, X_REQUEST_ID};
use shoal_core::{Error, ErrorKind, Origin};
use shoal_telemetry::{Metrics, RequestContext};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Settings of outgoing calls (the `[client]` table of a service's config).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallerConfig {
    /// Longest wait for a response head, per attempt.
    pub timeout_ms: u64,
    /// Longest wait for a TCP connection.
    pub connect_timeout_ms: u64,
    /// Most instances tried when connections are refused (a refused connection never
    /// reached the service, so trying another instance is always safe).
    pub max_connect_attempts: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout_ms: u64,
    /// Most idle connections kept per instance.
    pub pool_max_idle_per_host: usize,
}

impl Default for CallerConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            connect_timeout_ms: 1_000,
            max_connect_attempts: 3,
            pool_idle_timeout_ms: 30_000,
            pool_max_idle_per_host: 64,
        }
    }
}

/// Sends requests to services by name: picks an instance, passes on request id and
/// trace context, and counts the call in metrics.
#[derive(Clone)]
pub struct Caller {
    balancer: Balancer,
    http: Client<HttpConnector, Full<Bytes>>,
    cfg: CallerConfig,
    metrics: Option<Metrics>,
}

/// A response body that keeps its instance's outstanding-request count until it is
/// finished or dropped, so the balancer sees streaming responses as load.
pub struct GuardedBody {
    inner: Incoming,
    _guard: InflightGuard,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Caller {
    /// A caller over `balancer`; `metrics` receives the client series when given.
    pub fn new(balancer: Balancer, cfg: CallerConfig, metrics: Option<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(cfg.pool_idle_timeout_ms))
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(connector);
        Self {
            balancer,
            http,
            cfg,
            metrics,
        }
    }

    /// The balancer it picks instances with.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Send `req` (its URI is a path and query) to an instance of `service`.
    ///
    /// Adds `x-request-id` and `traceparent` from the current request context when the
    /// request has none. Errors are typed: no healthy instance and refused connections
    /// are `Unavailable` and retryable; a timeout is `Timeout`, retryable only for
    /// idempotent methods (the service may have acted on the request).
    pub async fn send(
        &self,
        service: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<GuardedBody>, Error> {
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string());
        add_context_headers(&mut parts.headers);
        let method = parts.method.clone();
        let idempotent = method.is_idempotent();

        if !self.balancer.discovery().is_loaded() {
            // Only at process start: give the first catalog a moment to arrive.
            self.balancer
                .discovery()
                .loaded(Duration::from_secs(2))
                .await;
        }
        let mut tried: Vec<String> = Vec::new();
        let mut last_err: Option<Error> = None;
        for _ in 0..self.cfg.max_connect_attempts.max(1) {
            let Some(guard) = self.balancer.pick(service, &tried) else {
                break;
            };
            let ep = guard.endpoint();
            let uri: Uri = format!("http://{}{}", ep.instance.addr, path_and_query)
                .parse()
                .map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        Origin::Internal,
                        "bad request path",
                    )
                    .with_source(e)
                })?;
            let mut attempt = Request::from_parts(parts.clone(), body.clone());
            *attempt.uri_mut() = uri;
            let timeout = Duration::from_millis(self.cfg.timeout_ms);
            match tokio::time::timeout(timeout, self.http.request(attempt)).await {
                Ok(Ok(res)) => {
                    self.observe(service, method.as_str(), res.status().as_u16(), start);
                    return Ok(res.map(|inner| GuardedBody {
                        inner,
                        _guard: guard,
                    }));
                }
                Ok(Err(e)) if e.is_connect() => {
                    tracing::debug!(service, instance = %ep.instance.id, error = %e, "connection refused; trying another instance");
                    tried.push(ep.instance.id.clone());
                    last_err = Some(
                        Error::unavailable(format!(
                            "no connection to {service} instance {}",
                            ep.instance.id
                        ))
                        .with_source(e),
                    );
                }
                Ok(Err(e)) => {
                    self.observe(service, method.as_str(), 0, start);
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        Origin::Upstream,
                        format!("call to {service} failed"),
                    )
                    .with_source(e)
                    .with_retryable(idempotent));
                }
                Err(_) => {
                    self.observe(service, method.as_str(), 0, start);
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        Origin::Upstream,
                        format!("{service} did not answer within {} ms", timeout.as_millis()),
                    )
                    .with_retryable(idempotent));
                }
            }
        }
        self.observe(service, method.as_str(), 0, start);
        Err(last_err
            .unwrap_or_else(|| Error::unavailable(format!("no healthy instance of {service}"))))
    }

    fn observe(&self, service: &str, method: &str, status: u16, start: Instant) {
        if let Some(m) = &self.metrics {
            m.observe_client(service, method, status, start.elapsed().as_secs_f64());
        }
    }
}

/// Pass the current request's id and trace on (a new span of the same trace).
fn add_context_headers(headers: &mut http::HeaderMap) {
    let ctx = RequestContext::current().unwrap_or_else(RequestContext::new_root);
    if !headers.contains_key(X_REQUEST_ID) {
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            headers.insert(X_REQUEST_ID, v);
        }
    }
    if !headers.contains_key(TRACEPARENT) {
        if let Ok(v) = HeaderValue::from_str(&ctx.trace.child().to_header()) {
            headers.insert(TRACEPARENT, v);
        }
    }
}

use crate::{Balancer, InflightGuard, OutlierConfig};
use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use shoal_core::deadline::Deadline;
use shoal_core::headers::{TRACEPARENT, X_REQUEST_ID};
use shoal_core::trace::TraceContext;
use shoal_core::{Error, ErrorKind, Origin};
use shoal_resilience::{safe_to_repeat, Resilience, Scope, Shared};
use shoal_telemetry::spans::ActiveSpan;
use shoal_telemetry::{Metrics, RequestContext, SpanKind};
use shoal_tls::{CertStore, ClientSettings, TlsClients};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

/// Settings of outgoing calls (the `[client]` table of a service's config).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallerConfig {
    /// Longest wait for a response head, per attempt, when the dependency's
    /// resilience policy sets no `timeout_ms` of its own.
    pub timeout_ms: u64,
    /// Longest wait for a TCP connection.
    pub connect_timeout_ms: u64,
    /// Most instances tried within one attempt when connections are refused (a
    /// refused connection never reached the service, so trying another instance is
    /// always safe, and not counted as a retry).
    pub max_connect_attempts: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout_ms: u64,
    /// Most idle connections kept per instance.
    pub pool_max_idle_per_host: usize,
    /// Passive outlier detection of instances.
    pub outlier: OutlierConfig,
    /// Speak HTTP/2 to instances (cleartext, by prior knowledge: every shoal
    /// service accepts it): many requests share one connection per instance.
    pub http2: bool,
}

/// A request extension: send only to instances of this version (the gateway's
/// weighted routes choose the version before the call).
#[derive(Clone, Debug)]
pub struct UpstreamVersion(pub Arc<str>);

impl Default for CallerConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            connect_timeout_ms: 1_000,
            max_connect_attempts: 3,
            pool_idle_timeout_ms: 30_000,
            pool_max_idle_per_host: 64,
            outlier: OutlierConfig::default(),
            http2: false,
        }
    }
}

/// Sends requests to services by name: applies the dependency's resilience policy
/// (retry, breaker, rate limit, bulkhead, timeout, deadline), picks an instance,
/// passes on request id, trace context and deadline, and counts each attempt in
/// metrics. Cheap to clone.
#[derive(Clone)]
pub struct Caller {
    inner: Arc<CallerInner>,
}

struct CallerInner {
    balancer: Balancer,
    http: Client<HttpConnector, Full<Bytes>>,
    /// In mutual TLS mode: one client per target service, presenting this
    /// process's certificate and accepting only that service's identity.
    tls: Option<TlsClients<Full<Bytes>>>,
    cfg: CallerConfig,
    resilience: Resilience,
    metrics: Option<Metrics>,
}

/// One attempt at a service: pick an instance and send (the innermost service of
/// the policy stack).
#[derive(Clone)]
struct Attempt {
    caller: Arc<CallerInner>,
    service: Arc<str>,
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
    /// A caller over `balancer` with `resilience`'s policies; `metrics` receives the
    /// client series when given.
    pub fn new(
        balancer: Balancer,
        cfg: CallerConfig,
        resilience: Resilience,
        metrics: Option<Metrics>,
    ) -> Self {
        Self::with_tls(balancer, cfg, resilience, metrics, None)
    }

    /// [`Caller::new`], in mutual TLS mode when `tls` is given: every call goes
    /// over mTLS presenting the store's certificate, and an instance counts only if
    /// it proves to be `spiffe://<trust domain>/service/<the service called>` (a
    /// caller in mutual mode never falls back to plain text, whatever the registry
    /// says).
    pub fn with_tls(
        balancer: Balancer,
        cfg: CallerConfig,
        resilience: Resilience,
        metrics: Option<Metrics>,
        tls: Option<Arc<CertStore>>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(cfg.pool_idle_timeout_ms))
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .http2_only(cfg.http2)
            .build(connector);
        let balancer = balancer.with_outlier(cfg.outlier.clone());
        let tls = tls.map(|store| {
            TlsClients::new(
                store,
                ClientSettings {
                    connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
                    pool_idle_timeout: Duration::from_millis(cfg.pool_idle_timeout_ms),
                    pool_max_idle_per_host: cfg.pool_max_idle_per_host,
                    http2: cfg.http2,
                },
            )
        });
        Self {
            inner: Arc::new(CallerInner {
                balancer,
                http,
                tls,
                cfg,
                resilience,
                metrics,
            }),
        }
    }

    /// The balancer it picks instances with.
    pub fn balancer(&self) -> &Balancer {
        &self.inner.balancer
    }

    /// The certificate store it presents in mutual TLS mode (`None` in mode off).
    pub fn tls_store(&self) -> Option<&Arc<CertStore>> {
        self.inner.tls.as_ref().map(TlsClients::store)
    }

    /// The policies it applies.
    pub fn resilience(&self) -> &Resilience {
        &self.inner.resilience
    }

    /// Send `req` (its URI is a path and query) to an instance of `service`, under
    /// the policy configured for `service` (and the request's route).
    ///
    /// Adds `x-request-id` and `traceparent` from the current request context when
    /// the request has none, and sets `x-shoal-deadline-ms` to the time left of the
    /// call's deadline (the sooner of the request context's and the policy's). Errors are typed: no healthy
    /// instance and refused connections are `Unavailable`; an attempt that timed out
    /// is `Timeout`, retryable only for requests safe to repeat; a passed deadline is
    /// `Timeout` and final; an open breaker is `CircuitOpen`; a full bulkhead or a
    /// spent rate limit is `Overloaded`.
    pub async fn send(
        &self,
        service: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<GuardedBody>, Error> {
        let scope = self.inner.resilience.scope(service, req.uri().path());
        self.send_in(scope, req).await
    }

    /// Send `req` to `scope`'s dependency under `scope`'s policy (the gateway
    /// passes its route's scope).
    pub async fn send_in(
        &self,
        scope: &Scope,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<GuardedBody>, Error> {
        add_context_headers(req.headers_mut());
        let outer = RequestContext::with_current(|c| c.deadline).flatten();
        if let Some(d) = scope.deadline(outer) {
            if d.expired() {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    Origin::Internal,
                    format!(
                        "not calling {}: the request's deadline has passed",
                        scope.dependency()
                    ),
                )
                .with_retryable(false));
            }
            req.extensions_mut().insert(d);
        }
        if !self.inner.balancer.discovery().is_loaded() {
            // Only at process start: give the first catalog a moment to arrive.
            self.inner
                .balancer
                .discovery()
                .loaded(Duration::from_secs(2))
                .await;
        }
        let attempt = Attempt {
            caller: self.inner.clone(),
            service: scope.dependency_arc(),
        };
        scope.stack(attempt).oneshot(Arc::new(req)).await
    }
}

impl Service<Shared<Full<Bytes>>> for Attempt {
    type Response = Response<GuardedBody>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GuardedBody>, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Shared<Full<Bytes>>) -> Self::Future {
        let caller = self.caller.clone();
        let service = self.service.clone();
        Box::pin(async move { caller.attempt(&service, &req).await })
    }
}

impl CallerInner {
    /// `path_and_query` on `ep`'s instance, over TLS when calls are mutual TLS.
    fn instance_uri(
        &self,
        ep: &crate::Endpoint,
        path_and_query: &PathAndQuery,
    ) -> Result<Uri, Error> {
        let scheme = if self.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let bad = |e: http::Error| {
            Error::new(
                ErrorKind::InvalidInput,
                Origin::Internal,
                "bad request path",
            )
            .with_source(e)
        };
        let builder = Uri::builder().scheme(scheme);
        let builder = match ep.authority() {
            Some(a) => builder.authority(a.clone()),
            None => builder.authority(ep.instance.addr.to_string()),
        };
        builder
            .path_and_query(path_and_query.clone())
            .build()
            .map_err(bad)
    }

    /// One attempt: an instance, then the request. A refused connection never
    /// reached the service, so another instance is tried (always safe).
    async fn attempt(
        &self,
        service: &str,
        req: &Request<Full<Bytes>>,
    ) -> Result<Response<GuardedBody>, Error> {
        let start = Instant::now();
        // Shared, not copied: each attempt's URI takes a reference.
        let path_and_query = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let method = req.method().clone();
        let version = req
            .extensions()
            .get::<UpstreamVersion>()
            .map(|v| v.0.clone());
        // Each attempt is a client span of the current request, and the callee's
        // parent: the header names this attempt, not the request.
        let current = RequestContext::with_current(|c| {
            (c.trace, c.tracer.is_enabled().then(|| c.tracer.clone()))
        });
        let (span_ctx, parent) = match &current {
            Some((t, _)) => (t.child(), Some(t.span_id)),
            None => {
                let sent = req
                    .headers()
                    .get(TRACEPARENT)
                    .and_then(|v| v.to_str().ok())
                    .and_then(TraceContext::parse);
                (
                    sent.map(|t| t.child())
                        .unwrap_or_else(TraceContext::new_root),
                    sent.map(|t| t.span_id),
                )
            }
        };
        let traceparent = span_ctx.to_header_value();
        let deadline = req.extensions().get::<Deadline>();
        let span = current.and_then(|(_, tracer)| tracer).map(|tracer| {
            let mut s = tracer.span(
                span_ctx,
                parent,
                SpanKind::Client,
                format!("{method} {service}"),
            );
            s.set("peer.service", service.to_string());
            s.set("url.path", req.uri().path().to_string());
            s
        });
        // Counted however the attempt ends, even when its timeout drops it midway.
        let mut observed = Observed {
            caller: self,
            service,
            method: method.as_str(),
            start,
            status: 0,
            span,
        };
        let mut tried: Vec<String> = Vec::new();
        let mut last_err: Option<Error> = None;
        for _ in 0..self.cfg.max_connect_attempts.max(1) {
            let Some(guard) = self
                .balancer
                .pick_version(service, &tried, version.as_deref())
            else {
                break;
            };
            let ep = guard.endpoint();
            let uri = self.instance_uri(ep, &path_and_query)?;
            let mut attempt = Request::new(req.body().clone());
            *attempt.method_mut() = method.clone();
            *attempt.uri_mut() = uri;
            *attempt.version_mut() = req.version();
            // One copy of the request's headers per attempt, with this attempt's
            // deadline and trace position.
            let headers = attempt.headers_mut();
            *headers = req.headers().clone();
            if let Some(d) = deadline {
                d.to_headers(headers);
            }
            headers.insert(TRACEPARENT, traceparent.clone());
            if let Some(host) = ep.host_header() {
                headers
                    .entry(http::header::HOST)
                    .or_insert_with(|| host.clone());
            }
            let sent = match &self.tls {
                None => self.http.request(attempt).await,
                Some(tls) => match tls.client(service) {
                    Ok(client) => client.request(attempt).await,
                    Err(e) => {
                        return Err(Error::new(
                            ErrorKind::InvalidInput,
                            Origin::Internal,
                            format!("no TLS identity for {service}: {e}"),
                        ))
                    }
                },
            };
            match sent {
                Ok(res) => {
                    observed.status = res.status().as_u16();
                    self.balancer
                        .report(service, ep, !res.status().is_server_error());
                    return Ok(res.map(|inner| GuardedBody {
                        inner,
                        _guard: guard,
                    }));
                }
                Err(e) if e.is_connect() => {
                    self.balancer.report(service, ep, false);
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
                Err(e) => {
                    self.balancer.report(service, ep, false);
                    // The request may have reached the service: repeat it only if
                    // that is safe.
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        Origin::Upstream,
                        format!("call to {service} failed"),
                    )
                    .with_source(e)
                    .with_retryable(safe_to_repeat(req)));
                }
            }
        }
        Err(last_err
            .unwrap_or_else(|| Error::unavailable(format!("no healthy instance of {service}"))))
    }
}

/// Records one attempt in the client metrics when dropped: with its status, or `0`
/// when no answer came (refused everywhere, failed, or cut by its timeout).
struct Observed<'a> {
    caller: &'a CallerInner,
    service: &'a str,
    method: &'a str,
    start: Instant,
    status: u16,
    span: Option<ActiveSpan>,
}

impl Drop for Observed<'_> {
    fn drop(&mut self) {
        if let Some(m) = &self.caller.metrics {
            m.observe_client(
                self.service,
                self.method,
                self.status,
                self.start.elapsed().as_secs_f64(),
            );
        }
        if let Some(span) = &mut self.span {
            span.set("http.response.status_code", self.status);
            if self.status == 0 || self.status >= 500 {
                span.fail(match self.status {
                    0 => "no answer".to_string(),
                    s => format!("answered {s}"),
                });
            }
        }
    }
}

/// Pass the current request's id on (a new one outside a request). The trace is
/// set per attempt, each its own span.
fn add_context_headers(headers: &mut http::HeaderMap) {
    if headers.contains_key(X_REQUEST_ID) {
        return;
    }
    let id = RequestContext::with_current(|c| HeaderValue::from_str(&c.request_id).ok())
        .unwrap_or_else(|| HeaderValue::from_str(&shoal_telemetry::context::new_request_id()).ok());
    if let Some(v) = id {
        headers.insert(X_REQUEST_ID, v);
    }
}

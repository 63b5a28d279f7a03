//! The running gateway: its shared state, its router, the live route table and
//! its reloads, and `serve`.

use crate::cache::ResponseCache;
use crate::config::{GatewayConfig, RouteConfig};
use crate::guard::{IpNet, IpRules, RateLimiter};
use crate::table::Table;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use shoal_auth::{FileJwks, JwksSource, Verifier};
use shoal_core::{ApiError, Error, ErrorKind, Origin};
use shoal_discovery::{Balancer, Caller, Discovery, FaultWatch};
use shoal_resilience::fault::FaultInjector;
use shoal_resilience::Resilience;
use shoal_telemetry::http::ServerTelemetry;
use shoal_telemetry::Metrics;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Largest JWKS document fetched from the identity service.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A running gateway's shared state. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cfg: GatewayConfig,
    pub(crate) caller: Caller,
    table: RwLock<Arc<Table>>,
    /// The routes file's modification time at the last (attempted) load.
    routes_stamp: RwLock<Option<std::time::SystemTime>>,
    pub(crate) faults: FaultInjector,
    pub(crate) verifier: Option<Verifier>,
    pub(crate) anonymous: RateLimiter,
    pub(crate) authenticated: RateLimiter,
    pub(crate) cache: ResponseCache,
    pub(crate) trusted: Vec<IpNet>,
    pub(crate) ip: IpRules,
    pub(crate) admin_allow: IpRules,
    pub(crate) body_limit: usize,
    openapi: Option<Bytes>,
}

/// The JWKS from the identity service, through discovery and its policy.
struct ServiceJwks {
    caller: Caller,
    service: String,
    path: String,
}

impl JwksSource for ServiceJwks {
    fn fetch(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, Error>> + Send + '_>>
    {
        Box::pin(async move {
            let req = http::Request::get(&self.path)
                .body(Full::new(Bytes::new()))
                .map_err(|e| Error::config("bad JWKS path").with_source(e))?;
            let res = self.caller.send(&self.service, req).await?;
            if !res.status().is_success() {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    Origin::Upstream,
                    format!("{} answered {} for its JWKS", self.service, res.status()),
                ));
            }
            let body = http_body_util::Limited::new(res.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Unavailable,
                        Origin::Upstream,
                        format!("the JWKS could not be read: {e}"),
                    )
                })?;
            Ok(body.to_bytes())
        })
    }
}

impl Gateway {
    /// A gateway over `discovery` with `cfg`'s routes.
    pub fn new(cfg: &GatewayConfig, discovery: Discovery, metrics: Metrics) -> Result<Self, Error> {
        Self::with_tls(cfg, discovery, metrics, None)
    }

    /// [`Gateway::new`], calling services over mutual TLS with `tls`'s
    /// certificate when given.
    pub fn with_tls(
        cfg: &GatewayConfig,
        discovery: Discovery,
        metrics: Metrics,
        tls: Option<Arc<shoal_tls::CertStore>>,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        let resilience = Resilience::new(
            cfg.resilience.clone(),
            "gateway",
            Duration::from_millis(cfg.upstream.timeout_ms),
            cfg.metrics.then_some(&metrics),
        )?;
        let faults = FaultInjector::new("gateway", resilience.metrics().cloned());
        let caller = Caller::with_tls(
            Balancer::new(discovery, cfg.load_balancing),
            cfg.upstream.clone(),
            resilience,
            cfg.metrics.then_some(metrics),
            tls,
        );
        let verifier = cfg.auth.as_ref().map(|a| {
            let source: Arc<dyn JwksSource> = match &a.jwks_file {
                Some(f) => Arc::new(FileJwks(cfg.resolve(f))),
                None => Arc::new(ServiceJwks {
                    caller: caller.clone(),
                    service: a.jwks_service.clone(),
                    path: a.jwks_path.clone(),
                }),
            };
            Verifier::new(a.verifier.clone(), source)
        });
        let routes = cfg.load_routes()?;
        let table = Table::compile(cfg, &routes, None)?;
        let stamp = cfg
            .routes_file
            .as_ref()
            .and_then(|f| std::fs::metadata(cfg.resolve(f)).ok())
            .and_then(|m| m.modified().ok());
        Ok(Self {
            inner: Arc::new(Inner {
                caller,
                table: RwLock::new(Arc::new(table)),
                routes_stamp: RwLock::new(stamp),
                faults,
                verifier,
                anonymous: RateLimiter::new(&cfg.rate_limit.anonymous, cfg.rate_limit.max_clients),
                authenticated: RateLimiter::new(
                    &cfg.rate_limit.authenticated,
                    cfg.rate_limit.max_clients,
                ),
                cache: ResponseCache::new(cfg.cache.clone()),
                trusted: cfg.trusted_proxies.clone(),
                ip: cfg.ip.clone(),
                admin_allow: IpRules {
                    allow: cfg.admin.allow.clone(),
                    deny: Vec::new(),
                },
                body_limit: cfg.body_limit_bytes,
                openapi: cfg.load_openapi()?,
                cfg: cfg.clone(),
            }),
        })
    }

    /// The live route table.
    pub(crate) fn table(&self) -> Arc<Table> {
        self.inner
            .table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Compile `routes` and swap them in; on error the running table stays.
    pub(crate) fn replace_routes(&self, routes: &[RouteConfig]) -> Result<u64, Error> {
        let mut slot = self
            .inner
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = Table::compile(&self.inner.cfg, routes, Some(&slot))?;
        let generation = next.generation;
        *slot = Arc::new(next);
        // Cached answers may come from routes that changed.
        self.inner.cache.clear();
        Ok(generation)
    }

    /// Reload the routes file (`/admin/routes/reload`, or its change on disk).
    pub(crate) fn reload(&self) -> Result<u64, Error> {
        let Some(f) = &self.inner.cfg.routes_file else {
            return Err(Error::config(
                "the gateway's routes are inline in the system file (no routes_file to reload)",
            ));
        };
        let path = self.inner.cfg.resolve(f);
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| m.modified().ok());
        *self
            .inner
            .routes_stamp
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = stamp;
        let routes = self.inner.cfg.load_routes()?;
        let g = self.replace_routes(&routes)?;
        tracing::info!(
            generation = g,
            routes = routes.len(),
            "route table reloaded"
        );
        Ok(g)
    }

    /// Watch the routes file: reload when its modification time changes.
    async fn watch_routes_file(self) {
        let Some(f) = self.inner.cfg.routes_file.clone() else {
            return;
        };
        let path = self.inner.cfg.resolve(&f);
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.inner.cfg.reload_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = std::fs::metadata(&path)
                .ok()
                .and_then(|m| m.modified().ok());
            let last = *self
                .inner
                .routes_stamp
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if now.is_some() && now != last {
                if let Err(e) = self.reload() {
                    tracing::error!(error = %e, "routes file refused; the running table stays");
                }
            }
        }
    }

    /// The gateway's router: its own endpoints, then the route table.
    pub fn router(&self, metrics: Metrics) -> Router {
        let gw = self.clone();
        let doc = self.inner.openapi.clone();
        Router::new()
            .route("/health/ready", get(move || ready(gw.clone())))
            .route(
                "/openapi.json",
                get(move || {
                    let doc = doc.clone();
                    async move {
                        match doc {
                            Some(d) => ([(http::header::CONTENT_TYPE, "application/json")], d)
                                .into_response(),
                            None => ApiError::not_found("no API description is configured")
                                .into_response(),
                        }
                    }
                }),
            )
            .route("/admin/routes", get(crate::admin::routes))
            .route("/admin/routes/reload", post(crate::admin::reload))
            .route(
                "/admin/routes/{route}/weights",
                put(crate::admin::set_weights),
            )
            .route("/admin/breakers", get(crate::admin::breakers))
            .route(
                "/admin/cache",
                axum::routing::delete(crate::admin::purge_cache),
            )
            .fallback(crate::proxy::dispatch)
            .with_state(self.clone())
            .merge(shoal_resilience::ops_routes(
                self.inner.caller.resilience().clone(),
            ))
            .merge(shoal_telemetry::http::ops_routes(metrics))
    }
}

/// 200 once every route has a healthy upstream; 503 naming the routes without one.
async fn ready(gw: Gateway) -> Response {
    let d = gw.inner.caller.balancer().discovery();
    let table = gw.table();
    let mut missing = Vec::new();
    for r in table.routes() {
        let ok = match (&r.cfg.service, &r.cfg.aggregate) {
            (Some(s), _) => {
                let healthy = d.healthy(s);
                r.pick_version(|v| healthy.iter().any(|i| i.version == v))
                    .is_ok()
                    && !healthy.is_empty()
            }
            (None, Some(a)) => a
                .parts
                .iter()
                .filter(|p| p.required)
                .all(|p| !d.healthy(&p.service).is_empty()),
            (None, None) => true,
        };
        if !ok {
            missing.push(format!("{} -> {}", r.name, r.cfg.services().join(",")));
        }
    }
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

/// Serve the gateway on `listener` until `shutdown` resolves.
pub async fn serve(
    cfg: &GatewayConfig,
    listener: tokio::net::TcpListener,
    discovery: Discovery,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let metrics = Metrics::new("gateway");
    let registry = discovery.registry().cloned();
    cfg.validate()?;
    // The certificate first: in mutual mode no upstream call can go without it.
    let tls = if cfg.tls.is_mutual() {
        let id = cfg.tls.identity("gateway")?;
        let mut tls_cfg = cfg.tls.clone();
        for f in [
            &mut tls_cfg.cert_file,
            &mut tls_cfg.key_file,
            &mut tls_cfg.ca_file,
        ]
        .into_iter()
        .flatten()
        {
            *f = cfg.resolve(f);
        }
        let url = match (&registry, tls_cfg.source) {
            (Some(r), _) => r.base().to_string(),
            (None, shoal_tls::SourceKind::Files) => String::new(),
            (None, shoal_tls::SourceKind::ControlPlane) => {
                return Err(Error::config(
                    "gateway.tls.source: control_plane needs the registry's control plane",
                ))
            }
        };
        Some(shoal_tls::start(tls_cfg.cert_source(&url, "gateway", "gateway"), &id).await?)
    } else {
        None
    };
    let gw = Gateway::with_tls(
        cfg,
        discovery,
        metrics.clone(),
        tls.as_ref().map(|t| t.store().clone()),
    )?;
    let tracer = match (&cfg.tracing.endpoint, &registry) {
        _ if !cfg.tracing.enabled => shoal_telemetry::Tracer::disabled(),
        (Some(e), _) => start_tracer(e, cfg, &metrics)?,
        (None, Some(r)) => start_tracer(
            &format!("{}/v1/traces", r.base().trim_end_matches('/')),
            cfg,
            &metrics,
        )?,
        (None, None) => shoal_telemetry::Tracer::disabled(),
    };
    let _fault_watch = registry.map(|r| FaultWatch::start(r, gw.inner.faults.clone()));
    let watcher = tokio::spawn(gw.clone().watch_routes_file());
    let telemetry = Arc::new(ServerTelemetry {
        metrics: metrics.clone(),
        // Services say who served; the gateway adds nothing of its own.
        served_by: None,
        // The edge sets the deadline (its request timeout), which travels to every
        // service the request reaches; a client's own deadline header is not trusted.
        request_timeout: Some(Duration::from_millis(cfg.request_timeout_ms)),
        honour_deadline: false,
        tracer,
        // The proxy writes its own access line (`shoal::access`).
        access_log: false,
        record_metrics: cfg.metrics,
    });
    let app = gw
        .router(metrics)
        .layer(axum::middleware::from_fn_with_state(
            gw.inner.faults.clone(),
            shoal_resilience::fault::middleware,
        ))
        .layer(axum::middleware::from_fn_with_state(
            telemetry,
            shoal_telemetry::http::layer,
        ));
    let out = crate::server::run(listener, app, &cfg.server, shutdown).await;
    watcher.abort();
    drop(tls);
    out
}

fn start_tracer(
    endpoint: &str,
    cfg: &GatewayConfig,
    metrics: &Metrics,
) -> Result<shoal_telemetry::Tracer, Error> {
    shoal_telemetry::Tracer::start(
        shoal_telemetry::spans::Resource {
            service: "gateway".into(),
            instance: "gateway".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        endpoint,
        &cfg.tracing,
        metrics,
    )
}

/// The JSON error for a refused admin call or a bad route name, shared by admin.rs.
pub(crate) fn forbidden(message: &str) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response()
}

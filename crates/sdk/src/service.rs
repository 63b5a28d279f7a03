use crate::ctx::CtxInner;
use crate::health::{self, Check, Health};
use crate::messaging::{self, Handler, Outbox};
use crate::{Ctx, Db, DbOptions, Migration, ServiceConfig};
use axum::extract::DefaultBodyLimit;
use axum::{Extension, Router};
use http::HeaderValue;
use shoal_bus::{SharedBus, SubscribeOptions, TopicSpec};
use shoal_core::registry::Registration;
use shoal_core::Error;
use shoal_discovery::{Balancer, Caller, Discovery, FaultWatch, Lease, RegistryClient};
use shoal_eventstore::{EventStore, Projection, ProjectionRunner, Upcasters};
use shoal_resilience::fault::FaultInjector;
use shoal_resilience::Resilience;
use shoal_telemetry::http::ServerTelemetry;
use shoal_telemetry::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Describes a service; [`Service::main`] (or [`Service::run`]) runs it.
pub struct Service {
    name: String,
    version: String,
    migrations: Option<&'static [Migration]>,
    router: Router,
    checks: Vec<(String, Check)>,
    config_file: Option<PathBuf>,
    env: Option<Vec<(String, String)>>,
    event_store: Option<Upcasters>,
    projections: Vec<Arc<dyn Projection>>,
    bus: Option<SharedBus>,
    topics: Vec<TopicSpec>,
    consumers: Vec<messaging::Consumer>,
    outbox: bool,
    settings: Option<ReadSettings>,
    setup: Option<SetupFn>,
}

/// Builds the routes that need the service's context (see [`Service::setup`]).
type SetupFn = Box<
    dyn FnOnce(
            Ctx,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Router, Error>> + Send>>
        + Send,
>;

/// Reads `[settings]` into the service's own type.
type ReadSettings = fn(&toml::Table) -> Result<Arc<dyn std::any::Any + Send + Sync>, Error>;

impl Service {
    /// A service called `name` (a DNS label: `catalog`, `order-history`).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            version: "0.0.0".into(),
            migrations: None,
            router: Router::new(),
            checks: Vec::new(),
            config_file: None,
            env: None,
            event_store: None,
            projections: Vec::new(),
            bus: None,
            topics: Vec::new(),
            consumers: Vec::new(),
            outbox: false,
            settings: None,
            setup: None,
        }
    }

    /// Finish the service once its context exists, before it serves or registers:
    /// `f(ctx)` opens what needs the database or the bus (a saga orchestrator,
    /// caches), starts its background work with [`Ctx::spawn`], and returns the
    /// routes that use it, merged with [`Service::routes`]. An error stops the start.
    pub fn setup<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce(Ctx) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Router, Error>> + Send + 'static,
    {
        self.setup = Some(Box::new(move |ctx| Box::pin(f(ctx))));
        self
    }

    /// The service's own settings: the `[settings]` table of its config (and
    /// `SHOAL_SETTINGS__*` overrides), read into `T` at start, so a wrong key or type
    /// stops the start naming it (give `T` `#[serde(deny_unknown_fields, default)]`).
    /// Handlers read them with [`Ctx::settings`]. A service that names no type
    /// refuses a non-empty `[settings]`.
    pub fn settings<T: serde::de::DeserializeOwned + Send + Sync + 'static>(mut self) -> Self {
        self.settings = Some(|table| {
            let value: T = toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e| Error::config(format!("settings: {e}")))?;
            Ok(Arc::new(value))
        });
        self
    }

    /// The version this code is (config `version` overrides it).
    pub fn version(mut self, version: &str) -> Self {
        self.version = version.to_string();
        self
    }

    /// Give the service its own database, with these migrations applied at start.
    /// Adds a `database` readiness check.
    pub fn database(mut self, migrations: &'static [Migration]) -> Self {
        self.migrations = Some(migrations);
        self.checks.push((
            "database".into(),
            health::wrap(
                |ctx: Ctx| async move { ctx.db().ping().await.map_err(|e| e.to_string()) },
            ),
        ));
        self
    }

    /// Keep state as events: an event store in the service's database (which
    /// [`Service::database`] gives it), reached with [`Ctx::events`]. `upcasters`
    /// bring old event shapes up to date when read.
    pub fn event_store(mut self, upcasters: Upcasters) -> Self {
        self.event_store = Some(upcasters);
        self
    }

    /// Keep a read model from the event store: the projection runs in the
    /// background from start to shutdown, its lag in the service's metrics.
    pub fn projection(mut self, projection: Arc<dyn Projection>) -> Self {
        self.projections.push(projection);
        self
    }

    /// Make sure `topic` exists at start (created if missing; a start error if it
    /// exists with other partitions).
    pub fn topic(mut self, topic: TopicSpec) -> Self {
        self.topics.push(topic);
        self
    }

    /// Consume `topic` in the group named after the service, with default options:
    /// each message is handled once per group, its effects and its id committed
    /// together (the inbox), so a redelivery has no second effect. Needs
    /// [`Service::database`].
    pub fn consume(self, topic: &str, handler: Arc<dyn Handler>) -> Self {
        self.consume_with(topic, None, SubscribeOptions::default(), handler)
    }

    /// [`Service::consume`] with a group of another name and other options.
    pub fn consume_with(
        mut self,
        topic: &str,
        group: Option<&str>,
        options: SubscribeOptions,
        handler: Arc<dyn Handler>,
    ) -> Self {
        self.consumers.push(messaging::Consumer {
            topic: topic.to_string(),
            group: group.map(str::to_string),
            options,
            handler,
        });
        self
    }

    /// Publish through the transactional outbox ([`Ctx::outbox`]): messages put in
    /// it in a database transaction are published after it commits, by a relay in
    /// the background. Needs [`Service::database`].
    pub fn outbox(mut self) -> Self {
        self.outbox = true;
        self
    }

    /// Use this bus instead of the one `[bus]` configures (tests, other backends).
    pub fn bus(mut self, bus: SharedBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// The service's routes. Handlers extract [`Ctx`] for the database and clients.
    /// `/health/live`, `/health/ready` and `/metrics` are the SDK's.
    pub fn routes(mut self, router: Router) -> Self {
        self.router = self.router.merge(router);
        self
    }

    /// Add a readiness check: the instance is ready only while every check passes.
    pub fn readiness<F, Fut>(mut self, name: &str, check: F) -> Self
    where
        F: Fn(Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((name.to_string(), health::wrap(check)));
        self
    }

    /// Ready only while at least one healthy instance of `service` is known.
    pub fn depends_on(self, service: &str) -> Self {
        let dep = service.to_string();
        self.readiness(&format!("dependency:{service}"), move |ctx: Ctx| {
            let dep = dep.clone();
            async move {
                if ctx.discovery().healthy(&dep).is_empty() {
                    Err(format!("no healthy instance of {dep}"))
                } else {
                    Ok(())
                }
            }
        })
    }

    /// Read config from this file instead of the one `SHOAL_CONFIG` names.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// Use these variables instead of the process environment (tests); called
    /// again, adds to them (a later value of the same name wins).
    pub fn env<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env
            .get_or_insert_with(Vec::new)
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Run until SIGTERM or SIGINT, then shut down gracefully. For `main`: logs a
    /// start-up error and returns a failing exit code instead of panicking.
    pub async fn main(self) -> ExitCode {
        let name = self.name.clone();
        match self.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "service stopped with an error");
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    }

    /// Run until SIGTERM or SIGINT, then shut down gracefully.
    pub async fn run(self) -> Result<(), Error> {
        let running = self.start().await?;
        shoal_core::shutdown::signal().await;
        running.shutdown().await
    }

    /// Start serving and return a handle; [`RunningService::shutdown`] stops it.
    pub async fn start(mut self) -> Result<RunningService, Error> {
        shoal_core::names::validate_service_name(&self.name).map_err(Error::config)?;
        let env: Vec<(String, String)> = self.env.unwrap_or_else(|| std::env::vars().collect());
        let file = self.config_file.or_else(|| {
            env.iter()
                .find(|(k, _)| k == shoal_core::config::CONFIG_ENV)
                .map(|(_, v)| PathBuf::from(v))
        });
        let cfg: ServiceConfig = shoal_core::config::load(file.as_deref(), env)?;
        cfg.validate()?;
        let settings = match self.settings {
            Some(read) => Some(read(&cfg.settings)?),
            None if cfg.settings.is_empty() => None,
            None => {
                return Err(Error::config(format!(
                    "settings: service {} takes no settings",
                    self.name
                )))
            }
        };
        let version = cfg.version.clone().unwrap_or(self.version);
        let instance_id = cfg.instance_id.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                self.name,
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            )
        });
        let logs = shoal_telemetry::logging::init(&self.name, &instance_id, &cfg.log_level)?;

        let db = match self.migrations {
            Some(migrations) => {
                let url = match &cfg.database.url {
                    Some(url) => url.clone(),
                    None => {
                        let dir = cfg
                            .data_dir
                            .clone()
                            .unwrap_or_else(|| PathBuf::from(".shoal/data").join(&self.name));
                        format!(
                            "sqlite://{}",
                            dir.join(format!("{}.db", self.name)).display()
                        )
                    }
                };
                let opts = DbOptions {
                    url,
                    schema: cfg.database.schema.clone(),
                    max_connections: cfg.database.max_connections,
                    acquire_timeout: Duration::from_millis(cfg.database.acquire_timeout_ms),
                };
                Some(Db::open(&opts, migrations).await?)
            }
            None => None,
        };

        if self.event_store.is_some() && db.is_none() {
            return Err(Error::config(
                "an event store lives in the service's database: call Service::database",
            ));
        }
        if !self.projections.is_empty() && self.event_store.is_none() {
            return Err(Error::config(
                "projections read the event store: call Service::event_store",
            ));
        }
        let events = match (self.event_store, &db) {
            (Some(upcasters), Some(db)) => Some(EventStore::open(db, upcasters).await?),
            _ => None,
        };

        let uses_bus = self.bus.is_some()
            || !self.topics.is_empty()
            || !self.consumers.is_empty()
            || self.outbox;
        if (self.outbox || !self.consumers.is_empty()) && db.is_none() {
            return Err(Error::config(
                "the outbox and consumers keep their state in the service's database: call Service::database",
            ));
        }
        let bus: Option<SharedBus> = match self.bus.take() {
            Some(bus) => Some(bus),
            None if uses_bus => Some(crate::bus_connect::connect(&cfg).await?),
            None => None,
        };
        if let Some(bus) = &bus {
            for t in &self.topics {
                bus.create_topic(t).await.map_err(|e| {
                    Error::new(e.kind(), e.origin(), format!("topic {}: {e}", t.name))
                })?;
            }
            if let Some(db) = &db {
                if self.outbox || !self.consumers.is_empty() {
                    messaging::prepare(db).await?;
                }
            }
        }

        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| {
                Error::config(format!("cannot listen on {}", cfg.listen)).with_source(e)
            })?;
        let bound = listener.local_addr()?;
        let addr = match cfg.advertise_ip {
            Some(ip) => SocketAddr::new(ip, bound.port()),
            None => bound,
        };

        let registry = RegistryClient::new(&cfg.registry_url)?;
        let metrics = Metrics::new(&self.name);
        // The certificate before anything serves or calls: with mutual TLS the
        // service can do neither without it.
        let tls = if cfg.tls.is_mutual() {
            if matches!(self.name.as_str(), "gateway" | "control-plane") {
                return Err(Error::config(format!(
                    "tls: {:?} is the platform's own identity; a service cannot use that name with mutual TLS",
                    self.name
                )));
            }
            let id = shoal_tls::SpiffeId::service(&cfg.tls.trust_domain, &self.name)?;
            let source = cfg
                .tls
                .cert_source(&cfg.registry_url, &self.name, &instance_id);
            Some(
                shoal_tls::start(source, &id)
                    .await
                    .map_err(|e| Error::from(e).with_retryable(true))?,
            )
        } else {
            None
        };
        let discovery = if cfg.register {
            Discovery::start(registry.clone())
        } else {
            Discovery::fixed(cfg.peer_catalog())
        };
        let resilience = Resilience::new(
            cfg.resilience.clone(),
            &instance_id,
            Duration::from_millis(cfg.client.timeout_ms),
            Some(&metrics),
        )?;
        let faults = FaultInjector::new(&self.name, resilience.metrics().cloned());
        let tracer = match cfg.traces_endpoint() {
            Some(endpoint) => shoal_telemetry::Tracer::start(
                shoal_telemetry::spans::Resource {
                    service: self.name.clone(),
                    instance: instance_id.clone(),
                    version: version.clone(),
                },
                &endpoint,
                &cfg.tracing,
                &metrics,
            )?,
            None => shoal_telemetry::Tracer::disabled(),
        };
        let caller = Caller::with_tls(
            Balancer::new(discovery, cfg.load_balancing),
            cfg.client.clone(),
            resilience.clone(),
            Some(metrics.clone()),
            tls.as_ref().map(|t| t.store().clone()),
        );
        let (projections_stop, projections_stopped) = tokio::sync::watch::channel(false);
        let ctx = Ctx(Arc::new(CtxInner {
            name: self.name.clone(),
            version: version.clone(),
            instance_id: instance_id.clone(),
            db,
            events: events.clone(),
            caller,
            metrics: metrics.clone(),
            config: cfg.clone(),
            bus: bus.clone(),
            outbox: self.outbox.then(Outbox::new),
            settings,
            stopping: projections_stopped.clone(),
            tasks: std::sync::Mutex::new(Vec::new()),
            tracer: tracer.clone(),
        }));
        let projections: Vec<JoinHandle<()>> = match &events {
            Some(store) => self
                .projections
                .into_iter()
                .map(|p| {
                    let runner =
                        ProjectionRunner::new(store.clone(), p, 1_000).with_metrics(&metrics);
                    let mut stopped = projections_stopped.clone();
                    tokio::spawn(runner.run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    }))
                })
                .collect(),
            None => Vec::new(),
        };
        let mut background = projections;
        if let Some(bus) = &bus {
            let settings = messaging::Settings {
                poll: Duration::from_millis(cfg.bus.outbox_poll_ms),
                batch: cfg.bus.outbox_batch,
                inbox_retention_ms: cfg.bus.inbox_retention_ms,
                tracer: ctx.tracer().clone(),
            };
            let mm = messaging::MessagingMetrics::new(&metrics);
            if let (Some(outbox), Some(db)) = (&ctx.0.outbox, &ctx.0.db) {
                background.push(tokio::spawn(messaging::relay(
                    db.clone(),
                    bus.clone(),
                    outbox.clone(),
                    instance_id.clone(),
                    settings.clone(),
                    mm.clone(),
                    projections_stopped.clone(),
                )));
            }
            for c in self.consumers {
                background.push(tokio::spawn(messaging::consume(
                    ctx.clone(),
                    bus.clone(),
                    c,
                    settings.clone(),
                    mm.clone(),
                    projections_stopped.clone(),
                )));
            }
        }

        let draining = Arc::new(AtomicBool::new(false));
        let health = Health {
            checks: Arc::new(self.checks),
            draining: draining.clone(),
        };
        // Plain-HTTP probes for callers without a certificate (kubelet): docs/service-config.md.
        let health_server = match cfg.health_listen {
            Some(listen) => {
                let h = health::HealthServer::start(
                    listen,
                    health.clone(),
                    ctx.metrics().clone(),
                    ctx.clone(),
                )
                .await?;
                tracing::info!(addr = %h.addr(), "health port listening");
                Some(h)
            }
            None => None,
        };
        let telemetry = Arc::new(ServerTelemetry {
            metrics,
            served_by: if cfg.served_by_header {
                HeaderValue::from_str(&format!("{}@{}", self.name, version)).ok()
            } else {
                None
            },
            request_timeout: Some(Duration::from_millis(cfg.request_timeout_ms)),
            honour_deadline: true,
            tracer,
            access_log: cfg.access_log,
            record_metrics: true,
        });
        let mut router = self.router;
        if let Some(setup) = self.setup {
            router = router.merge(setup(ctx.clone()).await?);
        }
        let mut app = router
            .merge(health::router(health))
            .merge(shoal_telemetry::http::ops_routes(ctx.metrics().clone()))
            .merge(shoal_resilience::ops_routes(resilience))
            .layer(DefaultBodyLimit::max(cfg.body_limit_bytes))
            .layer(Extension(ctx.clone()));
        if let Some(policy) = &cfg.authorization {
            // Inside the telemetry layer (a refusal is a served 403 in the metrics),
            // outside fault injection (a refused caller never meets a fault).
            app = app.layer(axum::middleware::from_fn_with_state(
                crate::authz::Policy::new(policy, ctx.metrics()),
                crate::authz::middleware,
            ));
        }
        let app = app
            .layer(axum::middleware::from_fn_with_state(
                faults.clone(),
                shoal_resilience::fault::middleware,
            ))
            .layer(axum::middleware::from_fn_with_state(
                telemetry,
                shoal_telemetry::http::layer,
            ));

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let stopped = async {
            let _ = stop_rx.await;
        };
        let server = match &tls {
            None => tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }),
            Some(t) => {
                // TLS only: plain-text and certificate-less connections end at the
                // handshake.
                let config = shoal_tls::server_config(t.store().clone())?;
                tokio::spawn(shoal_tls::serve(listener, config, app, stopped))
            }
        };

        let fault_watch = cfg
            .register
            .then(|| FaultWatch::start(registry.clone(), faults));
        // `shoal log-level`: the control plane's level for this service, applied to
        // this process's filter without a restart.
        let log_watch = cfg.register.then(|| {
            shoal_discovery::LogLevelWatch::start(
                registry.clone(),
                &self.name,
                logs,
                &cfg.log_level,
            )
        });
        let lease = if cfg.register {
            let reg = Registration {
                service: self.name.clone(),
                version: version.clone(),
                addr,
                id: Some(instance_id.clone()),
                pid: Some(std::process::id()),
                // Tells the registry to probe this instance over mTLS.
                metadata: if tls.is_some() {
                    [(
                        shoal_tls::TLS_METADATA_KEY.to_string(),
                        shoal_tls::TLS_MUTUAL.to_string(),
                    )]
                    .into()
                } else {
                    Default::default()
                },
                ttl_ms: Some(cfg.ttl_ms),
            };
            match Lease::start(registry, reg).await {
                Ok(l) => Some(l),
                Err(e) => {
                    server.abort();
                    return Err(e);
                }
            }
        } else {
            None
        };
        tracing::info!(addr = %addr, version = %version, "service started");
        Ok(RunningService {
            addr,
            ctx,
            lease,
            draining,
            _fault_watch: fault_watch,
            _log_watch: log_watch,
            projections: background,
            projections_stop,
            stop: Some(stop_tx),
            server: Some(server),
            grace: Duration::from_millis(cfg.deregister_grace_ms),
            drain: Duration::from_millis(cfg.shutdown_drain_ms),
            _tls: tls,
            health: health_server,
        })
    }
}

/// A started service.
pub struct RunningService {
    addr: SocketAddr,
    ctx: Ctx,
    lease: Option<Lease>,
    draining: Arc<AtomicBool>,
    _fault_watch: Option<FaultWatch>,
    /// Follows `shoal log-level` (registered services only).
    _log_watch: Option<shoal_discovery::LogLevelWatch>,
    projections: Vec<JoinHandle<()>>,
    projections_stop: tokio::sync::watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    grace: Duration,
    drain: Duration,
    /// The certificate and its renewal task (mutual TLS only).
    _tls: Option<shoal_tls::Renewal>,
    /// The plain-HTTP health port (`health_listen`); stops when dropped.
    health: Option<health::HealthServer>,
}

impl RunningService {
    /// The address it serves on (as registered).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the plain-HTTP health port listens (`health_listen`), if configured.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|h| h.addr())
    }

    /// Its context (database, clients).
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// Graceful shutdown: fail readiness, deregister, keep serving for the grace
    /// period so callers' caches drop this instance, stop accepting, then wait for
    /// in-flight requests up to the drain limit.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        tracing::info!("shutting down: deregistering and draining");
        self.draining.store(true, Ordering::SeqCst);
        if let Some(lease) = self.lease.take() {
            if let Err(e) = lease.deregister().await {
                // The lease will expire on its own; shutting down goes on.
                tracing::warn!(error = %e, "deregistration failed");
            }
            tokio::time::sleep(self.grace).await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(self.drain, &mut server).await {
                Ok(Ok(Ok(()))) => tracing::info!("drained; stopped"),
                Ok(Ok(Err(e))) => return Err(Error::from(e)),
                Ok(Err(e)) => return Err(Error::internal("server task failed").with_source(e)),
                Err(_) => {
                    tracing::warn!(
                        limit_ms = self.drain.as_millis() as u64,
                        "drain limit reached; cutting remaining requests"
                    );
                    server.abort();
                }
            }
        }
        self.stop_projections().await;
        Ok(())
    }
}

impl RunningService {
    /// Stop the projection runners (each finishes the batch it is in), the outbox
    /// relay and the consumers (each finishes the message it is handling).
    async fn stop_projections(&mut self) {
        let _ = self.projections_stop.send(true);
        for p in self.projections.drain(..) {
            let _ = p.await;
        }
        for t in self.ctx.take_tasks() {
            let _ = t.await;
        }
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        for p in &self.projections {
            p.abort();
        }
        for t in self.ctx.take_tasks() {
            t.abort();
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

pub use crate::authz::AuthorizationConfig;
use serde::Deserialize;
use shoal_discovery::{CallerConfig, Strategy};
use shoal_resilience::ResilienceConfig;
use shoal_telemetry::TracingConfig;
pub use shoal_tls::{SourceKind as TlsSource, TlsConfig, TlsMode};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// A service's configuration: the file named by `SHOAL_CONFIG` (if any), then
/// `SHOAL_*` environment overrides (`SHOAL_LISTEN`, `SHOAL_DATABASE__URL`, …).
/// Unknown keys are rejected at start.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Where to listen. Port 0 takes a free port; the real one is registered.
    pub listen: SocketAddr,
    /// Address to register when listening on 0.0.0.0 or ::.
    pub advertise_ip: Option<IpAddr>,
    /// A second, plain-HTTP address answering only `/health/live` and
    /// `/health/ready` (`SHOAL_HEALTH_LISTEN`): under mutual TLS the main address
    /// refuses any caller without a certificate of the CA, and Kubernetes' kubelet
    /// probes present none. Off when absent.
    pub health_listen: Option<SocketAddr>,
    /// The control plane's registry.
    pub registry_url: String,
    /// Register with the registry at all (off for a service run alone).
    pub register: bool,
    /// Lease asked of the registry.
    pub ttl_ms: u64,
    /// This instance's id; made from the service name when absent.
    pub instance_id: Option<String>,
    /// Overrides the version compiled in (one binary run as two versions for a canary).
    pub version: Option<String>,
    /// Directory of the service's own files (its SQLite database).
    pub data_dir: Option<PathBuf>,
    /// Log filter: `info`, `debug`, `info,sqlx=warn`, …
    pub log_level: String,
    /// Send `x-shoal-served-by: service@version` on every response.
    pub served_by_header: bool,
    /// Log every request served at `info` (`served`, with its trace id; what
    /// `shoal logs --trace` finds); off, a request is logged at `debug` unless it
    /// failed.
    pub access_log: bool,
    /// Largest request body accepted (413 beyond).
    pub body_limit_bytes: usize,
    /// Longest a handler may run (503 beyond).
    pub request_timeout_ms: u64,
    /// After deregistering, keep serving this long so callers' caches drop this
    /// instance before it stops accepting.
    pub deregister_grace_ms: u64,
    /// Longest wait for in-flight requests at shutdown; those still running are cut.
    pub shutdown_drain_ms: u64,
    /// How `ctx.client(..)` picks among instances.
    pub load_balancing: Strategy,
    /// Outgoing call settings.
    pub client: CallerConfig,
    /// Resilience policies of outgoing calls (`docs/resilience.md`).
    pub resilience: ResilienceConfig,
    /// The service's database.
    pub database: DatabaseConfig,
    /// The message bus (`[bus]`).
    pub bus: BusConfig,
    /// Fixed addresses of other services (`[peers] inventory = ["127.0.0.1:7101"]`):
    /// with `register = false`, `ctx.client(..)` calls these instead of asking the
    /// registry (a service's own tests, or a deployment without discovery).
    pub peers: std::collections::BTreeMap<String, Vec<SocketAddr>>,
    /// The service's own settings (`[settings]`, `SHOAL_SETTINGS__*`), read into the
    /// type the service names with [`crate::Service::settings`].
    pub settings: toml::Table,
    /// Service-to-service mutual TLS (`[tls]`, docs/mtls.md).
    pub tls: TlsConfig,
    /// Which callers may call which routes (`[authorization]`, docs/mtls.md); needs
    /// `tls.mode = "mutual"`, which proves who the caller is.
    pub authorization: Option<AuthorizationConfig>,
    /// Spans and where they go (`[tracing]`, docs/observability.md): by default
    /// the control plane's collector at `<registry_url>/v1/traces`.
    pub tracing: TracingConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_ip: None,
            health_listen: None,
            registry_url: "http://127.0.0.1:7070".into(),
            register: true,
            ttl_ms: 10_000,
            instance_id: None,
            version: None,
            data_dir: None,
            log_level: "info".into(),
            served_by_header: true,
            access_log: true,
            body_limit_bytes: 1024 * 1024,
            request_timeout_ms: 30_000,
            deregister_grace_ms: 250,
            shutdown_drain_ms: 10_000,
            load_balancing: Strategy::default(),
            client: CallerConfig::default(),
            resilience: ResilienceConfig::default(),
            database: DatabaseConfig::default(),
            bus: BusConfig::default(),
            peers: Default::default(),
            settings: toml::Table::new(),
            tls: TlsConfig::default(),
            authorization: None,
            tracing: TracingConfig::default(),
        }
    }
}

/// The `[database]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// A database URL; by default `sqlite://<data_dir>/<service>.db`. For
    /// PostgreSQL, `postgres://user:password@host:port/database` with the service's
    /// own credentials (or set it from the environment: `SHOAL_DATABASE__URL`).
    pub url: Option<String>,
    /// PostgreSQL only: the schema the service's tables live in, when services
    /// share a database (created if missing; put first on the search path).
    pub schema: Option<String>,
    /// Most pooled connections.
    pub max_connections: u32,
    /// Longest wait for a pooled connection.
    pub acquire_timeout_ms: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            schema: None,
            max_connections: 8,
            acquire_timeout_ms: 5_000,
        }
    }
}

/// Which bus backend a service uses.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BusBackend {
    /// The embedded broker the control plane hosts.
    #[default]
    Embedded,
    /// A NATS JetStream server.
    Jetstream,
}

/// The `[bus]` table: used only by a service that publishes or consumes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// `embedded` (default) or `jetstream`.
    pub backend: BusBackend,
    /// Embedded: the broker's address (`127.0.0.1:7071`); by default the control
    /// plane at `registry_url` says where its broker is. JetStream: the server's URL
    /// (`nats://127.0.0.1:4222`); required.
    pub url: Option<String>,
    /// How often the outbox relay looks for committed messages when idle.
    pub outbox_poll_ms: u64,
    /// Messages the relay publishes per round, at most.
    pub outbox_batch: u32,
    /// How long the inbox remembers a processed message id.
    pub inbox_retention_ms: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            backend: BusBackend::Embedded,
            url: None,
            outbox_poll_ms: 100,
            outbox_batch: 500,
            inbox_retention_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl ServiceConfig {
    /// Where this service's spans go: the configured endpoint, else the control
    /// plane's collector when the service registers with one, else nowhere (a
    /// service run alone has no collector to send to).
    pub fn traces_endpoint(&self) -> Option<String> {
        if !self.tracing.enabled {
            return None;
        }
        match &self.tracing.endpoint {
            Some(e) => Some(e.clone()),
            None if self.register => Some(format!(
                "{}/v1/traces",
                self.registry_url.trim_end_matches('/')
            )),
            None => None,
        }
    }

    /// Reject settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), shoal_core::Error> {
        let bad = |k: &str, why: &str| Err(shoal_core::Error::config(format!("{k}: {why}")));
        if self.listen.ip().is_unspecified() && self.advertise_ip.is_none() {
            return bad("advertise_ip", "required when listen is 0.0.0.0 or ::");
        }
        if let Some(h) = self.health_listen {
            // Two free ports (both port 0) are two addresses; one fixed port cannot
            // serve both TLS and plain HTTP.
            if h == self.listen && h.port() != 0 {
                return bad("health_listen", "must differ from listen");
            }
        }
        if self.body_limit_bytes == 0 {
            return bad("body_limit_bytes", "must be positive");
        }
        self.tracing.validate("tracing")?;
        if self.request_timeout_ms == 0 {
            return bad("request_timeout_ms", "must be positive");
        }
        if self.database.max_connections == 0 {
            return bad("database.max_connections", "must be positive");
        }
        if self.client.max_connect_attempts == 0 {
            return bad("client.max_connect_attempts", "must be at least 1");
        }
        use shoal_core::registry::limits::{MAX_TTL_MS, MIN_TTL_MS};
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&self.ttl_ms) {
            return bad("ttl_ms", "must be between 1000 and 300000");
        }
        if !(10..=60_000).contains(&self.bus.outbox_poll_ms) {
            return bad("bus.outbox_poll_ms", "must be between 10 and 60000");
        }
        if !(1..=shoal_bus::limits::MAX_BATCH as u32).contains(&self.bus.outbox_batch) {
            return bad("bus.outbox_batch", "must be between 1 and 1000");
        }
        if self.bus.inbox_retention_ms < 60_000 {
            return bad("bus.inbox_retention_ms", "must be at least 60000");
        }
        if self.bus.backend == BusBackend::Jetstream && self.bus.url.is_none() {
            return bad("bus.url", "required for the jetstream backend");
        }
        if !self.peers.is_empty() && self.register {
            return bad(
                "peers",
                "fixed peers replace the registry: set register = false",
            );
        }
        for (name, addrs) in &self.peers {
            shoal_core::names::validate_service_name(name)
                .map_err(|e| shoal_core::Error::config(format!("peers.{name}: {e}")))?;
            if addrs.is_empty() || addrs.len() > 64 {
                return bad(&format!("peers.{name}"), "must list 1 to 64 addresses");
            }
        }
        self.tls.validate("tls")?;
        if let Some(policy) = &self.authorization {
            if !self.tls.is_mutual() {
                return bad(
                    "authorization",
                    "a policy needs tls.mode = \"mutual\": without a client certificate the caller is unknown",
                );
            }
            policy.validate()?;
        }
        self.resilience.validate("resilience")
    }

    /// The fixed catalog `peers` describes, every instance healthy.
    pub(crate) fn peer_catalog(&self) -> shoal_core::registry::Catalog {
        let services = self
            .peers
            .iter()
            .map(|(name, addrs)| shoal_core::registry::ServiceEntry {
                name: name.clone(),
                instances: addrs
                    .iter()
                    .enumerate()
                    .map(|(i, addr)| shoal_core::registry::Instance {
                        id: format!("{name}-peer-{}", i + 1),
                        service: name.clone(),
                        version: String::new(),
                        addr: *addr,
                        pid: None,
                        metadata: Default::default(),
                        healthy: true,
                        registered_at_ms: 0,
                    })
                    .collect(),
            })
            .collect();
        shoal_core::registry::Catalog { index: 1, services }
    }
}

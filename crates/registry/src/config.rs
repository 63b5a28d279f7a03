use serde::Deserialize;
use std::path::PathBuf;

/// Registry settings (the `[registry]` table of the control plane's config).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Lease given to an instance that does not ask for one.
    pub default_ttl_ms: u64,
    /// How often expired leases are swept.
    pub sweep_interval_ms: u64,
    /// Most instances the registry holds; registrations beyond are refused (503).
    pub max_instances: usize,
    /// Longest a watch (long poll) may wait before answering unchanged.
    pub max_wait_ms: u64,
    /// Where state is kept across restarts; `None` keeps it in memory only.
    pub state_file: Option<PathBuf>,
    /// Active health checks.
    pub health: HealthCheckConfig,
    /// Keep the registry in etcd (`[control_plane.registry.etcd]`, or the system
    /// file's `[backends] etcd`): control planes on several hosts then share one
    /// catalog. See docs/registry-api.md#etcd.
    pub etcd: Option<EtcdConfig>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            default_ttl_ms: 10_000,
            sweep_interval_ms: 250,
            max_instances: 10_000,
            max_wait_ms: 60_000,
            state_file: None,
            health: HealthCheckConfig::default(),
            etcd: None,
        }
    }
}

/// How the registry probes instances.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Probe at all. Off, every registered instance counts as healthy.
    pub enabled: bool,
    /// Path probed on each instance; 2xx is a pass, anything else (or no answer) a fail.
    pub path: String,
    /// Time between probe rounds.
    pub interval_ms: u64,
    /// Longest a probe may take.
    pub timeout_ms: u64,
    /// Consecutive fails that take a healthy instance out of discovery.
    pub unhealthy_threshold: u32,
    /// Consecutive passes that bring an unhealthy instance back.
    pub healthy_threshold: u32,
    /// Most probes in flight at once.
    pub max_concurrent_probes: usize,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/health/ready".into(),
            interval_ms: 1_000,
            timeout_ms: 800,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            max_concurrent_probes: 64,
        }
    }
}

impl RegistryConfig {
    /// Reject settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), shoal_core::Error> {
        use shoal_core::registry::limits::{MAX_TTL_MS, MIN_TTL_MS};
        let bad =
            |k: &str, why: &str| Err(shoal_core::Error::config(format!("registry.{k}: {why}")));
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&self.default_ttl_ms) {
            return bad("default_ttl_ms", "must be between 1000 and 300000");
        }
        if self.sweep_interval_ms == 0 {
            return bad("sweep_interval_ms", "must be positive");
        }
        if self.max_wait_ms == 0 {
            return bad(
                "max_wait_ms",
                "must be positive (0 turns every watch into a busy loop)",
            );
        }
        if self.max_instances == 0 {
            return bad("max_instances", "must be positive");
        }
        let h = &self.health;
        if h.interval_ms == 0 || h.timeout_ms == 0 {
            return bad("health", "interval_ms and timeout_ms must be positive");
        }
        if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
            return bad("health", "thresholds must be at least 1");
        }
        if !h.path.starts_with('/') {
            return bad("health.path", "must start with '/'");
        }
        if h.max_concurrent_probes == 0 {
            return bad("health.max_concurrent_probes", "must be positive");
        }
        if let Some(etcd) = &self.etcd {
            etcd.validate("registry.etcd")?;
        }
        Ok(())
    }
}

/// Where and how the registry keeps its instances in etcd.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// etcd's client URLs (`http://127.0.0.1:2379`); tried in turn.
    pub endpoints: Vec<String>,
    /// Key prefix of this system's instances: `<prefix>/instances/<id>`. Systems
    /// sharing one etcd keep apart by prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Longest one etcd request may take.
    #[serde(default = "default_etcd_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_prefix() -> String {
    "/shoal".into()
}

fn default_etcd_timeout_ms() -> u64 {
    2_000
}

impl EtcdConfig {
    /// Reject settings that cannot work, naming the key (`at`).
    pub fn validate(&self, at: &str) -> Result<(), shoal_core::Error> {
        let bad = |k: &str, why: String| Err(shoal_core::Error::config(format!("{at}.{k}: {why}")));
        if self.endpoints.is_empty() || self.endpoints.len() > 16 {
            return bad("endpoints", "must list 1 to 16 URLs".into());
        }
        for e in &self.endpoints {
            let uri: Result<http::Uri, _> = e.parse();
            if !uri.is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some()) {
                return bad("endpoints", format!("{e:?} must be http://host:port"));
            }
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() > 128 {
            return bad(
                "prefix",
                format!(
                    "{:?} must start with '/', not end with one, and be at most 128 bytes",
                    self.prefix
                ),
            );
        }
        if self.timeout_ms == 0 {
            return bad("timeout_ms", "must be positive".into());
        }
        Ok(())
    }
}

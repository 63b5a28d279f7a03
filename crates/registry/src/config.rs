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
        Ok(())
    }
}

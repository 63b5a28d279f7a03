use serde::Deserialize;
use shoal_control_plane::ControlPlaneConfig;
use shoal_core::Error;
use shoal_gateway::GatewayConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A system file (`shoal.toml`): what `shoal up` runs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemFile {
    /// A name for people.
    #[serde(default)]
    pub name: Option<String>,
    /// Run once before anything starts.
    #[serde(default)]
    pub build: Option<BuildSpec>,
    /// The control plane.
    #[serde(default)]
    pub control_plane: ControlPlaneConfig,
    /// The gateway.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// Restart and stop behaviour.
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    /// The services, by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
}

/// The build step.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// Program and arguments, run in the system file's folder.
    pub command: Vec<String>,
}

/// One service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Program and arguments, relative to the system file's folder.
    pub command: Vec<String>,
    /// How many processes of it to run on this host.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Extra environment (for example `SHOAL_LOG_LEVEL = "debug"`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A config file for it (passed as `SHOAL_CONFIG`).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// The service name its processes register under, when it differs from the
    /// entry's name: a second version of one service (`[services.catalog-v2]` with
    /// `service = "catalog"`). Replicas of both share the service's data folder.
    #[serde(default)]
    pub service: Option<String>,
    /// The version its processes register (passed as `SHOAL_VERSION`), for a
    /// canary or blue-green pair run from one binary.
    #[serde(default)]
    pub version: Option<String>,
}

impl ServiceSpec {
    /// The name the processes of entry `key` register under.
    pub fn registers_as<'a>(&'a self, key: &'a str) -> &'a str {
        self.service.as_deref().unwrap_or(key)
    }
}

fn one() -> u32 {
    1
}

/// How the supervisor restarts and stops processes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Where logs and state go, relative to the system file.
    pub state_dir: PathBuf,
    /// First pause before restarting a process that died.
    pub restart_backoff_initial_ms: u64,
    /// Longest pause; the pause doubles up to it.
    pub restart_backoff_max_ms: u64,
    /// A process that ran this long counts as stable: its backoff starts over.
    pub stable_after_ms: u64,
    /// This many restarts within `crash_loop_window_ms` is reported as a crash loop.
    pub crash_loop_restarts: usize,
    /// See `crash_loop_restarts`.
    pub crash_loop_window_ms: u64,
    /// After SIGTERM, how long a process gets before SIGKILL.
    pub stop_timeout_ms: u64,
    /// How long `up` waits for everything to be healthy before saying it is not.
    pub ready_timeout_ms: u64,
    /// The log store: rotation and retention of every process's log
    /// (`[supervisor.logs]`).
    pub logs: crate::logstore::LogStoreConfig,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(".shoal"),
            restart_backoff_initial_ms: 250,
            restart_backoff_max_ms: 10_000,
            stable_after_ms: 30_000,
            crash_loop_restarts: 5,
            crash_loop_window_ms: 60_000,
            stop_timeout_ms: 15_000,
            ready_timeout_ms: 120_000,
            logs: crate::logstore::LogStoreConfig::default(),
        }
    }
}

/// Most replicas of one service on one host.
pub(crate) const MAX_REPLICAS: u32 = 64;

impl SystemFile {
    /// Read and check a system file. Unknown keys are errors naming the key and line.
    pub fn load(path: &Path) -> Result<Self, Error> {
        // The process environment does not override the system file: `SHOAL_*`
        // variables belong to services.
        let mut sys: Self = shoal_core::config::load(Some(path), Vec::new())?;
        // The gateway reads its routes file and schemas relative to this file.
        sys.gateway.base_dir = Some(
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
        );
        sys.validate()
            .map_err(|e| Error::config(format!("{}: {}", path.display(), e.message())))?;
        Ok(sys)
    }

    /// Check what deserialisation cannot.
    pub fn validate(&self) -> Result<(), Error> {
        self.gateway.validate()?;
        self.control_plane.registry.validate()?;
        self.control_plane.broker.validate()?;
        for (name, s) in &self.services {
            shoal_core::names::validate_service_name(name)
                .map_err(|e| Error::config(format!("services.{name}: {e}")))?;
            if s.command.is_empty() || s.command[0].is_empty() {
                return Err(Error::config(format!(
                    "services.{name}.command: must name a program"
                )));
            }
            if s.replicas == 0 || s.replicas > MAX_REPLICAS {
                return Err(Error::config(format!(
                    "services.{name}.replicas: must be 1 to {MAX_REPLICAS}"
                )));
            }
            if let Some(svc) = &s.service {
                shoal_core::names::validate_service_name(svc)
                    .map_err(|e| Error::config(format!("services.{name}.service: {e}")))?;
            }
            if s.version
                .as_deref()
                .is_some_and(|v| v.is_empty() || v.len() > 64)
            {
                return Err(Error::config(format!(
                    "services.{name}.version: must be 1 to 64 characters"
                )));
            }
            for k in s.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(Error::config(format!(
                        "services.{name}.env: invalid variable name {k:?}"
                    )));
                }
            }
        }
        for r in &self.gateway.load_routes()? {
            for s in r.services() {
                if !self
                    .services
                    .iter()
                    .any(|(k, spec)| spec.registers_as(k) == s)
                {
                    return Err(Error::config(format!(
                        "gateway route {} names service {s:?}, which is not in [services]",
                        r.name()
                    )));
                }
            }
        }
        if let Some(b) = &self.build {
            if b.command.is_empty() {
                return Err(Error::config("build.command: must name a program"));
            }
        }
        let s = &self.supervisor;
        if s.restart_backoff_initial_ms == 0
            || s.restart_backoff_max_ms < s.restart_backoff_initial_ms
        {
            return Err(Error::config("supervisor: restart_backoff_initial_ms must be positive and at most restart_backoff_max_ms"));
        }
        s.logs.validate()?;
        if s.crash_loop_restarts == 0 {
            return Err(Error::config(
                "supervisor.crash_loop_restarts: must be positive",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SystemFile, Error> {
        let s: SystemFile = shoal_core::config::load_str(text, "shoal.toml", Vec::new())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn the_shops_system_file_is_valid() {
        let text = include_str!("../../../shoal.toml");
        let mut s: SystemFile =
            shoal_core::config::load_str(text, "shoal.toml", Vec::new()).unwrap();
        // Its paths (schemas, the OpenAPI document) are relative to the repository.
        s.gateway.base_dir = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../..").into());
        s.validate().unwrap();
        assert!(s.services.contains_key("catalog"));
        assert!(s.services.contains_key("inventory"));
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse("[services.catalog]\ncommand = [\"x\"]\nreplica = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replica") && e.contains("line 3"), "{e}");
        let e = parse("[services.catalog]\ncommand = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("services.catalog.command"), "{e}");
        let e = parse("[services.catalog]\ncommand = [\"x\"]\nreplicas = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replicas"), "{e}");
        let e = parse("[[gateway.routes]]\nprefix = \"/api\"\nservice = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let e = parse("[services.Bad]\ncommand = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("services.Bad"), "{e}");
        let e = parse("[services.v2]\ncommand = [\"x\"]\nservice = \"Catalog\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("services.v2.service"), "{e}");
    }

    #[test]
    fn the_log_store_is_configured_and_checked() {
        let s = parse("").unwrap();
        assert_eq!(s.supervisor.logs.max_file_bytes, 16 * 1024 * 1024);
        assert_eq!(s.supervisor.logs.max_files, 4);
        assert_eq!(s.supervisor.logs.retention_ms, 7 * 24 * 3600 * 1000);
        let s = parse("[supervisor.logs]\nmax_file_bytes = 1048576\nmax_files = 0\n").unwrap();
        assert_eq!(s.supervisor.logs.max_file_bytes, 1_048_576);
        assert_eq!(s.supervisor.logs.max_files, 0);
        let e = parse("[supervisor.logs]\nmax_files_kept = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_files_kept"), "{e}");
        let e = parse("[supervisor.logs]\nmax_file_bytes = 10\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("supervisor.logs.max_file_bytes"), "{e}");
    }

    #[test]
    fn two_versions_of_one_service_are_two_entries() {
        let s = parse(
            "[[gateway.routes]]\nprefix = \"/api/products\"\nservice = \"catalog\"\n\
             [services.catalog-v2]\ncommand = [\"x\"]\nservice = \"catalog\"\nversion = \"2.0.0\"\n",
        )
        .unwrap();
        let v2 = &s.services["catalog-v2"];
        assert_eq!(v2.registers_as("catalog-v2"), "catalog");
        assert_eq!(v2.version.as_deref(), Some("2.0.0"));
    }
}

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
    /// Service-to-service mutual TLS of the whole system (`[tls]`): on by default.
    #[serde(default)]
    pub tls: SystemTls,
    /// Distributed engines that replace the embedded defaults (`[backends]`: etcd,
    /// NATS JetStream, PostgreSQL, an OTLP endpoint).
    #[serde(default)]
    pub backends: crate::Backends,
    /// The services, by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
}

/// The `[tls]` table: whether the system's services and gateway speak mutual TLS
/// to each other (docs/mtls.md). Mutual unless `mode = "off"`: a system turns
/// mutual all at once, so the supervisor hands the mode to every service and to
/// the gateway.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SystemTls {
    /// `mutual` (default): every service gets `SHOAL_TLS__MODE=mutual` (unless its
    /// own `env` or config file sets `[tls]`) and the gateway `[gateway.tls] mode =
    /// "mutual"` (unless the file has `[gateway.tls]`). `off`: plain HTTP, each
    /// service as its own config says.
    pub mode: shoal_tls::TlsMode,
    /// The SPIFFE trust domain of every identity; also the CA's
    /// (`[control_plane.ca] trust_domain`, which must agree when set).
    pub trust_domain: String,
}

impl Default for SystemTls {
    fn default() -> Self {
        Self {
            mode: shoal_tls::TlsMode::Mutual,
            trust_domain: shoal_tls::DEFAULT_TRUST_DOMAIN.into(),
        }
    }
}

impl SystemTls {
    /// Whether the system runs on mutual TLS.
    pub fn is_mutual(&self) -> bool {
        self.mode == shoal_tls::TlsMode::Mutual
    }
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
    /// Run the service's `command` as an app in any language behind `shoal sidecar`
    /// (docs/sidecar.md): the app gets `PORT` and `SHOAL_SIDECAR_URL`, the sidecar
    /// registers, serves mTLS and calls out for it.
    #[serde(default)]
    pub sidecar: Option<SidecarSpec>,
}

/// A service entry's `sidecar = { … }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarSpec {
    /// The app's health path: its 2xx answer is the instance's readiness.
    #[serde(default = "default_health_path")]
    pub health_path: String,
}

fn default_health_path() -> String {
    "/health".into()
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
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!("cannot read config file {}", path.display())).with_source(e)
        })?;
        let mut sys = Self::parse(&text, &format!("config file {}", path.display()))?;
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

    /// Parse system file text (`origin` names it in errors), with the system's
    /// `[tls]` applied to the gateway and the CA where the file does not set theirs.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        // The process environment does not override the system file: `SHOAL_*`
        // variables belong to services.
        let mut sys: Self = shoal_core::config::load_str(text, origin, Vec::new())?;
        let raw: toml::Table =
            toml::from_str(text).map_err(|e| Error::config(format!("{origin}: {e}")))?;
        let set = |table: &str, key: &str| {
            raw.get(table)
                .and_then(|t| t.as_table())
                .is_some_and(|t| t.contains_key(key))
        };
        if !set("gateway", "tls") {
            sys.gateway.tls.mode = sys.tls.mode;
            sys.gateway.tls.trust_domain = sys.tls.trust_domain.clone();
        }
        let ca_domain_set = raw
            .get("control_plane")
            .and_then(|t| t.get("ca"))
            .and_then(|t| t.as_table())
            .is_some_and(|t| t.contains_key("trust_domain"));
        if !ca_domain_set {
            sys.control_plane.ca.trust_domain = sys.tls.trust_domain.clone();
        }
        // `[backends]` fills in the parts' own keys where the file leaves them out.
        if sys.control_plane.registry.etcd.is_none() {
            sys.control_plane.registry.etcd = sys.backends.etcd.clone();
        }
        if let Some(otlp) = &sys.backends.otlp {
            if sys.gateway.tracing.endpoint.is_none() {
                sys.gateway.tracing.endpoint = Some(otlp.endpoint.clone());
            }
        }
        let broker_enabled_set = raw
            .get("control_plane")
            .and_then(|t| t.get("broker"))
            .and_then(|t| t.as_table())
            .is_some_and(|t| t.contains_key("enabled"));
        if sys.backends.jetstream.is_some() && !broker_enabled_set {
            // Every service's bus is JetStream: the embedded broker would serve no one.
            sys.control_plane.broker.enabled = false;
        }
        Ok(sys)
    }

    /// Check what deserialisation cannot.
    pub fn validate(&self) -> Result<(), Error> {
        self.backends.validate()?;
        shoal_tls::validate_trust_domain(&self.tls.trust_domain)
            .map_err(|e| Error::config(format!("tls.trust_domain: {e}")))?;
        if self.tls.is_mutual() {
            if !self.control_plane.ca.enabled {
                return Err(Error::config(
                    "tls.mode = \"mutual\" (the default) needs the control plane's CA: \
                     remove control_plane.ca.enabled = false, or set [tls] mode = \"off\"",
                ));
            }
            if self.control_plane.ca.trust_domain != self.tls.trust_domain {
                return Err(Error::config(format!(
                    "control_plane.ca.trust_domain {:?} and tls.trust_domain {:?} must agree",
                    self.control_plane.ca.trust_domain, self.tls.trust_domain
                )));
            }
        }
        self.gateway.validate()?;
        self.control_plane.registry.validate()?;
        self.control_plane.broker.validate()?;
        self.control_plane.metrics.validate()?;
        shoal_control_plane::validate_alerts(&self.control_plane.alerts)?;
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
            if let Some(sc) = &s.sidecar {
                if !sc.health_path.starts_with('/') || sc.health_path.len() > 256 {
                    return Err(Error::config(format!(
                        "services.{name}.sidecar.health_path: must start with / (at most 256 characters)"
                    )));
                }
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
        let s = SystemFile::parse(text, "shoal.toml")?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn the_shops_system_file_is_valid() {
        let text = include_str!("../../../shoal.toml");
        let mut s = SystemFile::parse(text, "shoal.toml").unwrap();
        // Its paths (schemas, the OpenAPI document) are relative to the repository.
        s.gateway.base_dir = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../..").into());
        s.validate().unwrap();
        assert!(s.services.contains_key("catalog"));
        assert!(s.services.contains_key("inventory"));
        // The shop runs on mutual TLS, the gateway included.
        assert!(s.tls.is_mutual() && s.gateway.tls.is_mutual());
    }

    #[test]
    fn mutual_tls_is_the_default_and_reaches_the_gateway_and_the_ca() {
        let s = parse("").unwrap();
        assert!(s.tls.is_mutual());
        assert!(s.gateway.tls.is_mutual());
        assert_eq!(s.gateway.tls.trust_domain, "shoal.local");
        let s = parse("[tls]\nmode = \"off\"\n").unwrap();
        assert!(!s.tls.is_mutual() && !s.gateway.tls.is_mutual());
        // One trust domain for all.
        let s = parse("[tls]\ntrust_domain = \"shop.example\"\n").unwrap();
        assert_eq!(s.gateway.tls.trust_domain, "shop.example");
        assert_eq!(s.control_plane.ca.trust_domain, "shop.example");
        // The file's own [gateway.tls] wins.
        let s = parse("[gateway.tls]\nmode = \"off\"\n").unwrap();
        assert!(s.tls.is_mutual() && !s.gateway.tls.is_mutual());
        for (text, key) in [
            ("[tls]\nmod = \"off\"\n", "mod"),
            ("[tls]\nmode = \"tls\"\n", "tls"),
            ("[tls]\ntrust_domain = \"Bad Domain\"\n", "tls.trust_domain"),
            (
                "[control_plane.ca]\nenabled = false\n",
                "control plane's CA",
            ),
            (
                "[control_plane.ca]\ntrust_domain = \"other.local\"\n",
                "must agree",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        assert!(parse("[tls]\nmode = \"off\"\n[control_plane.ca]\nenabled = false\n").is_ok());
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

    #[test]
    fn a_sidecar_entry_is_read_and_checked() {
        let s =
            parse("[services.rec]\ncommand = [\"python3\", \"app.py\"]\nsidecar = {}\n").unwrap();
        assert_eq!(
            s.services["rec"].sidecar.as_ref().unwrap().health_path,
            "/health"
        );
        let e = parse("[services.rec]\ncommand = [\"x\"]\nsidecar = { health_path = \"ok\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("services.rec.sidecar.health_path"), "{e}");
        let e = parse("[services.rec]\ncommand = [\"x\"]\nsidecar = { health = \"/ok\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("health"), "{e}");
    }
}

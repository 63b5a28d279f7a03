//! Wire types of the registry's HTTP/JSON API (documented in `docs/registry-api.md`).
//!
//! These are the only shapes the control plane and its clients exchange, so a
//! service in any language can register, heartbeat and discover with them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Limits on what one registration may carry: the registry is shared by every
/// service, so no one instance may make it large.
pub mod limits {
    /// Longest version string.
    pub const MAX_VERSION_LEN: usize = 64;
    /// Longest instance id.
    pub const MAX_ID_LEN: usize = 128;
    /// Most metadata entries per instance.
    pub const MAX_METADATA_ENTRIES: usize = 32;
    /// Longest metadata key or value.
    pub const MAX_METADATA_LEN: usize = 256;
    /// Shortest lease an instance may ask for.
    pub const MIN_TTL_MS: u64 = 1_000;
    /// Longest lease an instance may ask for.
    pub const MAX_TTL_MS: u64 = 300_000;
    /// Largest request body the registry reads.
    pub const MAX_BODY_BYTES: usize = 64 * 1024;
}

/// `POST /v1/instances`: an instance announces itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Service name (a DNS label).
    pub service: String,
    /// Version of the code this instance runs.
    pub version: String,
    /// Address the instance serves on (the real bound address, never port 0).
    pub addr: SocketAddr,
    /// The instance's own id; the registry makes one when absent. Registering an id
    /// again replaces that instance (so re-registration after a restart is idempotent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// OS process id, shown by `shoal status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Free-form labels (for example `zone`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Lease length; the instance expires if no heartbeat arrives within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

impl Registration {
    /// Check every field against [`limits`]; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        crate::names::validate_service_name(&self.service).map_err(|e| format!("service: {e}"))?;
        if self.version.is_empty() || self.version.len() > limits::MAX_VERSION_LEN {
            return Err(format!(
                "version: must be 1 to {} characters",
                limits::MAX_VERSION_LEN
            ));
        }
        if self.addr.port() == 0 {
            return Err("addr: port 0 is not an address anyone can call".into());
        }
        if self.addr.ip().is_unspecified() {
            return Err("addr: an unspecified address (0.0.0.0 or ::) cannot be called".into());
        }
        if let Some(id) = &self.id {
            let ok = id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if id.is_empty() || id.len() > limits::MAX_ID_LEN || !ok {
                return Err(format!(
                    "id: must be 1 to {} characters of letters, digits, '-', '_' and '.'",
                    limits::MAX_ID_LEN
                ));
            }
        }
        if self.metadata.len() > limits::MAX_METADATA_ENTRIES {
            return Err(format!(
                "metadata: at most {} entries",
                limits::MAX_METADATA_ENTRIES
            ));
        }
        for (k, v) in &self.metadata {
            if k.is_empty()
                || k.len() > limits::MAX_METADATA_LEN
                || v.len() > limits::MAX_METADATA_LEN
            {
                return Err(format!(
                    "metadata: keys must be 1 to {0} characters and values at most {0}",
                    limits::MAX_METADATA_LEN
                ));
            }
        }
        if let Some(ttl) = self.ttl_ms {
            if !(limits::MIN_TTL_MS..=limits::MAX_TTL_MS).contains(&ttl) {
                return Err(format!(
                    "ttl_ms: must be between {} and {}",
                    limits::MIN_TTL_MS,
                    limits::MAX_TTL_MS
                ));
            }
        }
        Ok(())
    }
}

/// Answer to a registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The instance's id, to heartbeat and deregister with.
    pub id: String,
    /// The lease granted.
    pub ttl_ms: u64,
    /// How often the registry expects a heartbeat (a third of the lease).
    pub heartbeat_interval_ms: u64,
}

/// One registered instance, as discovery sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique id.
    pub id: String,
    /// Service name.
    pub service: String,
    /// Version it runs.
    pub version: String,
    /// Where to call it.
    pub addr: SocketAddr,
    /// OS process id, when it said.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Its labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Whether the registry's last health checks passed. Discovery skips unhealthy ones.
    pub healthy: bool,
    /// When it (last) registered, milliseconds since the Unix epoch.
    pub registered_at_ms: u64,
}

/// All instances of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// Service name.
    pub name: String,
    /// Its instances, ordered by id.
    pub instances: Vec<Instance>,
}

/// `GET /v1/services`: the whole catalog at one index.
///
/// The index grows with every change the registry makes; a client passes the last
/// index it saw (`?index=N&wait_ms=M`) to wait for the next change (a long poll).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Change counter of this snapshot.
    pub index: u64,
    /// Every service with at least one instance, ordered by name.
    pub services: Vec<ServiceEntry>,
}

impl Catalog {
    /// The instances of one service, healthy or not.
    pub fn instances(&self, service: &str) -> &[Instance] {
        self.services
            .iter()
            .find(|s| s.name == service)
            .map(|s| s.instances.as_slice())
            .unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registration {
        Registration {
            service: "catalog".into(),
            version: "1.0.0".into(),
            addr: "127.0.0.1:4000".parse().unwrap(),
            id: None,
            pid: None,
            metadata: BTreeMap::new(),
            ttl_ms: None,
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(reg().validate().is_ok());
        let mut r = reg();
        r.addr = "127.0.0.1:0".parse().unwrap();
        assert!(r.validate().unwrap_err().starts_with("addr:"));
        let mut r = reg();
        r.ttl_ms = Some(10);
        assert!(r.validate().unwrap_err().starts_with("ttl_ms:"));
        let mut r = reg();
        r.id = Some("a b".into());
        assert!(r.validate().unwrap_err().starts_with("id:"));
        let mut r = reg();
        r.service = "Bad".into();
        assert!(r.validate().unwrap_err().starts_with("service:"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<Registration>(
            r#"{"service":"a","version":"1","addr":"127.0.0.1:1","colour":"red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}

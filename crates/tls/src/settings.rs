//! The `[tls]` table a service (and `[gateway.tls]` the gateway) is configured with.

use crate::{CertSource, SpiffeId};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Whether a process speaks mutual TLS to its peers.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain HTTP (today's default).
    #[default]
    Off,
    /// TLS with a client certificate both ways: a service serves mTLS only and
    /// calls every service over mTLS.
    Mutual,
}

/// Where the certificate comes from.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The control plane's CA (`POST /v1/certificates`), renewed by the process.
    #[default]
    ControlPlane,
    /// Files renewed by another tool (`cert_file`, `key_file`, `ca_file`).
    Files,
}

/// The `[tls]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `off` (default) or `mutual`.
    pub mode: TlsMode,
    /// `control_plane` (default) or `files`.
    pub source: SourceKind,
    /// The SPIFFE trust domain: the process's own identity and every peer's must
    /// be in it.
    pub trust_domain: String,
    /// `control_plane` source: ask for a certificate life shorter than the CA's
    /// default (at least 1000 ms). Unset, the CA's default.
    pub cert_ttl_ms: Option<u64>,
    /// `files` source: the certificate chain, leaf first, PEM.
    pub cert_file: Option<PathBuf>,
    /// `files` source: its private key, PEM.
    pub key_file: Option<PathBuf>,
    /// `files` source: the CA certificates to trust, PEM.
    pub ca_file: Option<PathBuf>,
    /// `files` source: how often the files are checked for a change.
    pub reload_interval_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            mode: TlsMode::Off,
            source: SourceKind::ControlPlane,
            trust_domain: crate::DEFAULT_TRUST_DOMAIN.into(),
            cert_ttl_ms: None,
            cert_file: None,
            key_file: None,
            ca_file: None,
            reload_interval_ms: 10_000,
        }
    }
}

impl TlsConfig {
    /// Whether mutual TLS is on.
    pub fn is_mutual(&self) -> bool {
        self.mode == TlsMode::Mutual
    }

    /// Reject settings that cannot work, naming the key (under `prefix`, `tls` or
    /// `gateway.tls`).
    pub fn validate(&self, prefix: &str) -> Result<(), shoal_core::Error> {
        let bad =
            |k: &str, why: String| Err(shoal_core::Error::config(format!("{prefix}.{k}: {why}")));
        if let Err(e) = crate::validate_trust_domain(&self.trust_domain) {
            return bad("trust_domain", e.to_string());
        }
        if matches!(self.cert_ttl_ms, Some(t) if t < 1_000) {
            return bad("cert_ttl_ms", "must be at least 1000".into());
        }
        if !(100..=3_600_000).contains(&self.reload_interval_ms) {
            return bad(
                "reload_interval_ms",
                "must be between 100 and 3600000".into(),
            );
        }
        let files = [
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
            ("ca_file", &self.ca_file),
        ];
        match self.source {
            SourceKind::Files => {
                if let Some((k, _)) = files.iter().find(|(_, f)| f.is_none()) {
                    return bad(k, "required with source = \"files\"".into());
                }
            }
            SourceKind::ControlPlane => {
                if let Some((k, _)) = files.iter().find(|(_, f)| f.is_some()) {
                    return bad(k, "only read with source = \"files\"".into());
                }
            }
        }
        Ok(())
    }

    /// The process's identity as workload `name`.
    pub fn identity(&self, name: &str) -> Result<SpiffeId, crate::TlsError> {
        SpiffeId::for_name(&self.trust_domain, name)
    }

    /// Where workload `name`'s certificate comes from; `control_plane` is the
    /// control plane's URL.
    pub fn cert_source(&self, control_plane: &str, name: &str, instance_id: &str) -> CertSource {
        match self.source {
            SourceKind::ControlPlane => CertSource::ControlPlane {
                url: control_plane.to_string(),
                name: name.to_string(),
                instance_id: instance_id.to_string(),
                ttl_ms: self.cert_ttl_ms,
            },
            SourceKind::Files => CertSource::Files {
                cert: self.cert_file.clone().unwrap_or_default(),
                key: self.key_file.clone().unwrap_or_default(),
                ca: self.ca_file.clone().unwrap_or_default(),
                interval: Duration::from_millis(self.reload_interval_ms),
            },
        }
    }
}

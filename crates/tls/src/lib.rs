//! Service-to-service mutual TLS for shoal, with SPIFFE-style identities.
//!
//! - [`SpiffeId`]: `spiffe://<trust domain>/service/<name>`, `…/gateway`,
//!   `…/control-plane`, and how one is read from a certificate;
//! - [`Ca`]: the local certificate authority the control plane hosts (a key and a
//!   self-signed certificate kept in its data directory), signing short-lived leaf
//!   certificates for CSRs ([`CertificateRequest`] → [`CertificateResponse`]);
//! - [`CertStore`]: one process's current key, certificate and trust roots, swapped
//!   in place on renewal, so rustls picks the new certificate for the next handshake
//!   while open connections go on;
//! - [`server_config`] and [`client_config`]: rustls configs over a store: the
//!   server requires a client certificate from the CA, the client checks the
//!   server's chain and that its SPIFFE id is the one it meant to call;
//! - [`TlsConnector`] and [`TlsClients`]: hyper clients over TLS, one per target
//!   identity; [`serve`]: the accept loop of a mutual-mode service, which passes the
//!   caller's verified identity ([`PeerIdentity`]) to the handlers;
//! - [`CertSource`] and [`start`]: where a process gets its certificate (the
//!   control plane's CA, or files another tool renews) and the task that renews it;
//!   [`TlsConfig`]: the `[tls]` table that chooses all this.
//!
//! ring is the one crypto backend. See docs/mtls.md.

mod ca;
mod config;
mod connector;
mod error;
mod server;
mod settings;
mod source;
mod spiffe;
mod store;
mod verify;

pub use ca::{Ca, CertificateRequest, CertificateResponse, MAX_CSR_BYTES};
pub use config::{client_config, server_config};
pub use connector::{ClientSettings, TlsClients, TlsConn, TlsConnector};
pub use error::TlsError;
pub use server::{serve, PeerIdentity};
pub use settings::{SourceKind, TlsConfig, TlsMode};
pub use source::{request_certificate, start, CertSource, Renewal};
pub use spiffe::{spiffe_id_of, validate_trust_domain, SpiffeId, Workload, DEFAULT_TRUST_DOMAIN};
pub use store::{CertStore, Material};

/// The instance metadata key a mutual-mode instance registers with
/// ([`TLS_MUTUAL`] as its value), so the registry probes it over mTLS.
pub const TLS_METADATA_KEY: &str = "tls";
/// The value of [`TLS_METADATA_KEY`] of an instance that serves mutual TLS only.
pub const TLS_MUTUAL: &str = "mutual";

/// Whether an instance's metadata says it serves mutual TLS only.
pub fn serves_mutual_tls(metadata: &std::collections::BTreeMap<String, String>) -> bool {
    metadata.get(TLS_METADATA_KEY).map(String::as_str) == Some(TLS_MUTUAL)
}

/// The one crypto provider: ring.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Milliseconds since the Unix epoch of `t` (0 before it).
pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;

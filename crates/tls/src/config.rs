//! rustls configs over a [`CertStore`].

use crate::verify::{ClientVerifier, ServerVerifier};
use crate::{provider, CertStore, SpiffeId, TlsError};
use rustls::{ClientConfig, ServerConfig};
use std::sync::Arc;

/// A mutual-mode server: a client certificate from the CA is required, the
/// server's own certificate is the store's current one. Offers HTTP/2 and HTTP/1.1.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            store: store.clone(),
        }))
        .with_cert_resolver(store);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client of the workload `expected`: presents the store's certificate and
/// accepts only a server whose chain leads to the CA and whose SPIFFE id is
/// `expected`. `http2` picks the protocol by ALPN.
pub fn client_config(
    store: Arc<CertStore>,
    expected: SpiffeId,
    http2: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            store: store.clone(),
            expected,
            provider,
        }))
        .with_client_cert_resolver(store);
    cfg.alpn_protocols = if http2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}

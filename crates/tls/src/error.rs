//! The crate's one error type.

/// What went wrong with identities, certificates or TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A SPIFFE id, trust domain or name that breaks the rules.
    #[error("invalid identity: {0}")]
    Identity(String),
    /// A certificate, key or CSR that cannot be read or used.
    #[error("invalid certificate material: {0}")]
    Material(String),
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(#[from] rcgen::Error),
    /// rustls refused the settings or the material.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// Reading or writing the CA's or a source's files.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control plane did not issue a certificate.
    #[error("certificate request failed: {0}")]
    Request(String),
}

impl TlsError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<TlsError> for shoal_core::Error {
    fn from(e: TlsError) -> Self {
        let msg = e.to_string();
        match e {
            TlsError::Request(_) => shoal_core::Error::unavailable(msg),
            TlsError::Identity(_) | TlsError::Material(_) => shoal_core::Error::config(msg),
            _ => shoal_core::Error::internal(msg),
        }
    }
}

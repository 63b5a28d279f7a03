//! One process's certificate, key and trust roots, swapped in place on renewal.

use crate::{provider, spiffe, SpiffeId, TlsError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// The most PEM read for a certificate chain, a key or a CA bundle.
const MAX_PEM_BYTES: usize = 256 * 1024;

/// A certificate with its key and the roots that peers' certificates must chain
/// to: everything that changes together on renewal.
#[derive(Clone)]
pub struct Material {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    pub(crate) id: SpiffeId,
    pub(crate) not_after: SystemTime,
    pub(crate) loaded_at: SystemTime,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl Material {
    /// From PEM text: the certificate chain (leaf first), its private key (PKCS#8,
    /// SEC1 or PKCS#1) and the CA certificates to trust.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, TlsError> {
        for (what, pem) in [("certificate", cert_pem), ("key", key_pem), ("CA", ca_pem)] {
            if pem.len() > MAX_PEM_BYTES {
                return Err(TlsError::Material(format!(
                    "{what} PEM larger than {MAX_PEM_BYTES} bytes"
                )));
            }
        }
        let pem_err = |what: &str, e: rustls::pki_types::pem::Error| {
            TlsError::Material(format!("{what}: {e}"))
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("certificate", e))?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Material("no certificate in the PEM".into()));
        };
        let id = spiffe::spiffe_id_of(leaf)?;
        let not_after = spiffe::not_after_of(leaf)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem_err("key", e))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(ca.map_err(|e| pem_err("CA", e))?)?;
        }
        if roots.is_empty() {
            return Err(TlsError::Material("no CA certificate in the PEM".into()));
        }
        let provider = provider();
        let key = CertifiedKey::from_der(chain, key, &provider)?;
        let roots = Arc::new(roots);
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| TlsError::Material(format!("client verifier: {e}")))?;
        Ok(Self {
            key: Arc::new(key),
            roots,
            client_verifier,
            id,
            not_after,
            loaded_at: SystemTime::now(),
        })
    }

    /// The identity the certificate carries.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// End of the certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// The current [`Material`] of a process. rustls asks it for the certificate at
/// every handshake (server and client side), so a swap takes effect for the next
/// connection while established ones go on with the certificate they started with.
pub struct CertStore {
    current: RwLock<Material>,
    expected: SpiffeId,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("id", &self.expected.to_string())
            .finish()
    }
}

impl CertStore {
    /// A store for `material`; every later swap must carry the same identity.
    pub fn new(material: Material) -> Arc<Self> {
        Arc::new(Self {
            expected: material.id.clone(),
            current: RwLock::new(material),
        })
    }

    /// Put `material` in place; refused if it names another identity.
    pub fn swap(&self, material: Material) -> Result<(), TlsError> {
        if material.id != self.expected {
            return Err(TlsError::Identity(format!(
                "the new certificate is for {}, not {}",
                material.id, self.expected
            )));
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = material;
        Ok(())
    }

    /// The current material.
    pub fn current(&self) -> Material {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The identity this store presents.
    pub fn id(&self) -> &SpiffeId {
        &self.expected
    }

    pub(crate) fn key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .key
            .clone()
    }

    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .roots
            .clone()
    }

    pub(crate) fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .client_verifier
            .clone()
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl rustls::client::ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

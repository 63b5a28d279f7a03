//! The local certificate authority: one ECDSA P-256 key and a self-signed CA
//! certificate, created on first start in the control plane's data directory and
//! reused after restarts; it signs short-lived leaf certificates for CSRs.

use crate::{unix_ms, SpiffeId, TlsError};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The largest CSR accepted (a P-256 or RSA-4096 CSR is well under it).
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// How long the CA certificate is valid: it is not rotated (see docs/mtls.md).
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves start being valid this long before they were issued, so a peer whose
/// clock runs a little behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(60);
const KEY_FILE: &str = "ca.key.pem";
const CERT_FILE: &str = "ca.cert.pem";

/// `POST /v1/certificates`: sign a CSR for a service instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// The service (`gateway` asks for the gateway's identity).
    pub service: String,
    /// The instance asking (logged; not part of the identity).
    pub instance_id: String,
    /// A PKCS#10 CSR in PEM; only its public key is used (and its signature
    /// checked): the CA sets names, usages and validity itself.
    pub csr_pem: String,
    /// A shorter life than the CA's default, in milliseconds (at least 1000).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

/// The answer to a [`CertificateRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// The identity certified.
    pub spiffe_id: String,
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The CA chain (today the CA certificate alone), PEM.
    pub ca_pem: String,
    /// End of the leaf's validity, Unix milliseconds.
    pub not_after_ms: u64,
}

/// The certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    dir: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("dir", &self.dir).finish()
    }
}

impl Ca {
    /// Open the CA kept in `dir`, creating its key and certificate on first use.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, TlsError> {
        crate::validate_trust_domain(trust_domain)?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        if key_path.exists() && cert_path.exists() {
            let key_pem =
                std::fs::read_to_string(&key_path).map_err(|e| TlsError::io(&key_path, e))?;
            let cert_pem =
                std::fs::read_to_string(&cert_path).map_err(|e| TlsError::io(&cert_path, e))?;
            let key = KeyPair::from_pem(&key_pem)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
            return Ok(Self {
                issuer,
                cert_pem,
                dir: dir.to_path_buf(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| TlsError::io(dir, e))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("shoal CA {trust_domain}"));
        dn.push(DnType::OrganizationName, "shoal");
        params.distinguished_name = dn;
        // No intermediates: the CA signs leaves only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        // The key first, readable by the owner only; the certificate last, so a crash
        // between the two leaves no certificate without its key.
        write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
        write_file(&cert_path, cert_pem.as_bytes(), false)?;
        tracing::info!(dir = %dir.display(), "created the certificate authority");
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            dir: dir.to_path_buf(),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Sign the CSR in `csr_pem` as `id`, valid for `ttl`. Only the CSR's public key
    /// is taken (after its signature is checked: the requester holds the key).
    pub fn sign_csr(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<CertificateResponse, TlsError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(TlsError::Material(format!(
                "CSR larger than {MAX_CSR_BYTES} bytes"
            )));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TlsError::Material(format!("bad CSR: {e}")))?;
        self.sign(id, &csr.public_key, ttl)
    }

    /// Make a key and a certificate for `id` here (the control plane's own
    /// identity, tests): (key PEM, response).
    pub fn issue(
        &self,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<(String, CertificateResponse), TlsError> {
        let key = KeyPair::generate()?;
        let res = self.sign(id, &key, ttl)?;
        Ok((key.serialize_pem(), res))
    }

    fn sign(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<CertificateResponse, TlsError> {
        let uri = id.to_string();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.name());
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(uri.as_str().try_into().map_err(
                |e: rcgen::Error| TlsError::Identity(e.to_string()),
            )?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every workload is both a server and a client of others.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = now + ttl;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(CertificateResponse {
            spiffe_id: uri,
            cert_pem: cert.pem(),
            ca_pem: self.cert_pem.clone(),
            // Whole seconds: what the certificate itself says.
            not_after_ms: unix_ms(not_after) / 1000 * 1000,
        })
    }
}

/// A random positive 128-bit serial (RFC 5280: unique per CA, at most 20 octets).
fn random_serial() -> Result<SerialNumber, TlsError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TlsError::Material("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp).map_err(|e| TlsError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| TlsError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TlsError::io(path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-tls-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_ca_is_kept_and_signs_csrs_with_the_spiffe_id_only() {
        let d = dir("keep");
        let ca = Ca::load_or_create(&d, "shoal.local").unwrap();
        let again = Ca::load_or_create(&d, "shoal.local").unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem());

        // The CSR asks for a DNS name and CA rights: neither is granted.
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let id = SpiffeId::service("shoal.local", "orders").unwrap();
        let res = again
            .sign_csr(&id, &csr, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(res.spiffe_id, "spiffe://shoal.local/service/orders");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(res.cert_pem.as_bytes());
        use rustls::pki_types::pem::PemObject;
        let der = der.unwrap();
        assert_eq!(crate::spiffe_id_of(&der).unwrap(), id);
        use x509_parser::prelude::FromDer;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
        assert!(!parsed.is_ca());
        let sans = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 1);
        let left = res.not_after_ms as i64 - unix_ms(SystemTime::now()) as i64;
        assert!((3_500_000..=3_600_000).contains(&left), "{left}");

        assert!(ca
            .sign_csr(&id, "not a csr", Duration::from_secs(60))
            .is_err());
        let big = "x".repeat(MAX_CSR_BYTES + 1);
        assert!(ca.sign_csr(&id, &big, Duration::from_secs(60)).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}

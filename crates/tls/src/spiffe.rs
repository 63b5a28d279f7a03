//! SPIFFE-style identities: `spiffe://<trust domain>/service/<name>` for a service,
//! `spiffe://<trust domain>/gateway` and `spiffe://<trust domain>/control-plane` for
//! the platform's own processes.

use crate::TlsError;
use std::fmt;

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "shoal.local";
/// The longest SPIFFE id read (the SPIFFE spec's limit).
const MAX_ID_LEN: usize = 2048;
/// The longest trust domain (a DNS name).
const MAX_TRUST_DOMAIN_LEN: usize = 253;

/// What a SPIFFE id names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// A service, by its registry name.
    Service(String),
    /// The API gateway.
    Gateway,
    /// The control plane (health probes, the breaker overview).
    ControlPlane,
}

/// A verified or intended identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    workload: Workload,
}

/// Check a trust domain: 1 to 253 of `a-z`, `0-9`, `.`, `-`, `_` (the SPIFFE rule).
pub fn validate_trust_domain(td: &str) -> Result<(), TlsError> {
    let ok = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN_LEN
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(TlsError::Identity(format!(
            "trust domain {td:?} must be 1 to {MAX_TRUST_DOMAIN_LEN} of a-z, 0-9, '.', '-', '_'"
        )))
    }
}

impl SpiffeId {
    /// The identity of service `name` (a valid service name; `gateway` and
    /// `control-plane` name the platform's own identities instead, see
    /// [`SpiffeId::for_name`]).
    pub fn service(trust_domain: &str, name: &str) -> Result<Self, TlsError> {
        validate_trust_domain(trust_domain)?;
        shoal_core::names::validate_service_name(name).map_err(TlsError::Identity)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            workload: Workload::Service(name.to_string()),
        })
    }

    /// The identity of the name callers and policies use: `gateway` and
    /// `control-plane` are the platform's identities, any other name a service's.
    pub fn for_name(trust_domain: &str, name: &str) -> Result<Self, TlsError> {
        match name {
            "gateway" => Self::platform(trust_domain, Workload::Gateway),
            "control-plane" => Self::platform(trust_domain, Workload::ControlPlane),
            _ => Self::service(trust_domain, name),
        }
    }

    /// The gateway's identity.
    pub fn gateway(trust_domain: &str) -> Result<Self, TlsError> {
        Self::platform(trust_domain, Workload::Gateway)
    }

    /// The control plane's identity.
    pub fn control_plane(trust_domain: &str) -> Result<Self, TlsError> {
        Self::platform(trust_domain, Workload::ControlPlane)
    }

    fn platform(trust_domain: &str, workload: Workload) -> Result<Self, TlsError> {
        validate_trust_domain(trust_domain)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            workload,
        })
    }

    /// Read `spiffe://td/service/name`, `spiffe://td/gateway` or
    /// `spiffe://td/control-plane`; anything else is refused.
    pub fn parse(uri: &str) -> Result<Self, TlsError> {
        if uri.len() > MAX_ID_LEN {
            return Err(TlsError::Identity("SPIFFE id too long".into()));
        }
        let bad = || TlsError::Identity(format!("not a shoal SPIFFE id: {uri:?}"));
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        match path {
            "gateway" => Self::gateway(td),
            "control-plane" => Self::control_plane(td),
            _ => {
                let name = path.strip_prefix("service/").ok_or_else(bad)?;
                Self::service(td, name)
            }
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// What it names.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// The name an authorization policy knows it by: the service's name,
    /// `gateway` or `control-plane`.
    pub fn name(&self) -> &str {
        match &self.workload {
            Workload::Service(n) => n,
            Workload::Gateway => "gateway",
            Workload::ControlPlane => "control-plane",
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.workload {
            Workload::Service(n) => write!(f, "spiffe://{}/service/{n}", self.trust_domain),
            Workload::Gateway => write!(f, "spiffe://{}/gateway", self.trust_domain),
            Workload::ControlPlane => write!(f, "spiffe://{}/control-plane", self.trust_domain),
        }
    }
}

/// The SPIFFE id of a DER certificate: its one URI SAN (the SPIFFE X.509-SVID rule:
/// exactly one URI SAN, and it is the identity).
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, TlsError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|e| TlsError::Material(format!("cannot parse certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Material(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| TlsError::Identity("certificate has no subjectAltName".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => SpiffeId::parse(uri),
        _ => Err(TlsError::Identity(
            "certificate must carry exactly one URI SAN".into(),
        )),
    }
}

/// `not_after` of a DER certificate.
pub(crate) fn not_after_of(cert_der: &[u8]) -> Result<std::time::SystemTime, TlsError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|e| TlsError::Material(format!("cannot parse certificate: {e}")))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_refused() {
        for s in [
            "spiffe://shoal.local/service/orders",
            "spiffe://shoal.local/gateway",
            "spiffe://prod.example/control-plane",
        ] {
            assert_eq!(SpiffeId::parse(s).unwrap().to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://shoal.local/service/orders").unwrap();
        assert_eq!(id.name(), "orders");
        assert_eq!(id, SpiffeId::for_name("shoal.local", "orders").unwrap());
        assert_eq!(
            SpiffeId::for_name("shoal.local", "gateway")
                .unwrap()
                .workload(),
            &Workload::Gateway
        );
        for bad in [
            "http://shoal.local/service/orders",
            "spiffe://shoal.local/service/Orders",
            "spiffe://shoal.local/service/orders/x",
            "spiffe://Shoal/service/orders",
            "spiffe:///service/orders",
            "spiffe://shoal.local/other",
            "spiffe://shoal.local",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        assert!(SpiffeId::parse(&format!("spiffe://a/service/{}", "a".repeat(3000))).is_err());
    }
}

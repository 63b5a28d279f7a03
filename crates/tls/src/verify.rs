//! Certificate checks of both sides: the chain to the CA (webpki) and the peer's
//! SPIFFE id, against the store's current roots (so a new CA bundle read from files
//! applies to the next handshake).

use crate::{spiffe, CertStore, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError};
use std::sync::Arc;

fn other(e: crate::TlsError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The client's check of a server: chains to the CA and is the service meant.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub(crate) store: Arc<CertStore>,
    pub(crate) expected: SpiffeId,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // The address dialled says nothing: the identity is the SPIFFE id.
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.store.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = spiffe::spiffe_id_of(end_entity).map_err(other)?;
        if id != self.expected {
            tracing::warn!(expected = %self.expected, presented = %id, "server presented another identity");
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server's check of a client: a certificate is required, chains to the
/// current CA, and carries a SPIFFE id of this trust domain. Which caller may do
/// what is the authorization policy's business, not the handshake's.
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    pub(crate) store: Arc<CertStore>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional (RFC 8446 §4.2.4), and shoal clients have one
        // certificate only.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified =
            self.store
                .client_verifier()
                .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe::spiffe_id_of(end_entity).map_err(other)?;
        if id.trust_domain() != self.store.id().trust_domain() {
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.store
            .client_verifier()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.store
            .client_verifier()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.store.client_verifier().supported_verify_schemes()
    }
}

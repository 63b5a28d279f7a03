//! The certificate authority's HTTP face (`GET /v1/ca`, `POST /v1/certificates`)
//! and the control plane's own identity (`spiffe://<td>/control-plane`), which it
//! presents when it probes or asks mutual-mode instances.

use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use shoal_core::{ApiError, Error};
use shoal_tls::{Ca, CertStore, CertificateRequest, Material, SpiffeId};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The shortest leaf life a certificate request may ask for.
const MIN_REQUESTED_TTL_MS: u64 = 1_000;
/// The longest instance id accepted (the registry's own bound on ids).
const MAX_INSTANCE_ID_LEN: usize = 128;
/// The largest request body (a CSR of [`shoal_tls::MAX_CSR_BYTES`] and its fields).
const MAX_BODY_BYTES: usize = shoal_tls::MAX_CSR_BYTES + 4 * 1024;

/// The `[control_plane.ca]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    /// Run the CA (and present the control plane's identity to mutual-mode
    /// instances).
    pub enabled: bool,
    /// The SPIFFE trust domain of every identity it issues.
    pub trust_domain: String,
    /// Life of an issued leaf certificate; a request may ask for less, never more.
    pub leaf_ttl_ms: u64,
    /// Where the CA's key and certificate live; by default `<data_dir>/ca`.
    pub dir: Option<PathBuf>,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            trust_domain: shoal_tls::DEFAULT_TRUST_DOMAIN.into(),
            leaf_ttl_ms: 3_600_000,
            dir: None,
        }
    }
}

impl CaConfig {
    /// Reject settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), Error> {
        shoal_tls::validate_trust_domain(&self.trust_domain)
            .map_err(|e| Error::config(format!("ca.trust_domain: {e}")))?;
        if !(60_000..=7 * 24 * 3_600_000).contains(&self.leaf_ttl_ms) {
            return Err(Error::config(
                "ca.leaf_ttl_ms: must be between 60000 (a minute) and 604800000 (a week)",
            ));
        }
        Ok(())
    }
}

/// The running CA.
#[derive(Clone)]
pub(crate) struct Authority {
    ca: Arc<Ca>,
    cfg: CaConfig,
}

impl Authority {
    /// Open (or create) the CA in `dir`.
    pub(crate) fn open(cfg: &CaConfig, data_dir: &std::path::Path) -> Result<Self, Error> {
        cfg.validate()?;
        let dir = cfg.dir.clone().unwrap_or_else(|| data_dir.join("ca"));
        let ca = Ca::load_or_create(&dir, &cfg.trust_domain)
            .map_err(|e| Error::config(format!("ca.dir: {e}")))?;
        Ok(Self {
            ca: Arc::new(ca),
            cfg: cfg.clone(),
        })
    }

    /// A fresh key and certificate of the control plane's own identity.
    fn own_material(&self) -> Result<Material, Error> {
        let id = SpiffeId::control_plane(&self.cfg.trust_domain)?;
        let (key, res) = self
            .ca
            .issue(&id, Duration::from_millis(self.cfg.leaf_ttl_ms))?;
        Ok(Material::from_pem(&res.cert_pem, &key, &res.ca_pem)?)
    }

    /// The control plane's identity, renewed at two thirds of its life by a task
    /// that ends when `stop` turns true.
    pub(crate) fn own_identity(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(Arc<CertStore>, tokio::task::JoinHandle<()>), Error> {
        let store = CertStore::new(self.own_material()?);
        let me = self.clone();
        let renewing = store.clone();
        let task = tokio::spawn(async move {
            let every = Duration::from_millis(me.cfg.leaf_ttl_ms * 2 / 3);
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                match me.own_material().and_then(|m| Ok(renewing.swap(m)?)) {
                    Ok(()) => tracing::debug!("control plane certificate renewed"),
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the control plane's certificate failed")
                    }
                }
            }
        });
        Ok((store, task))
    }
}

/// `GET /v1/ca` and `POST /v1/certificates`.
pub(crate) fn router(authority: Authority) -> Router {
    Router::new()
        .route("/v1/ca", get(ca_cert))
        .route(
            "/v1/certificates",
            post(issue).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .with_state(authority)
}

async fn ca_cert(State(a): State<Authority>) -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/x-pem-file")],
        a.ca.cert_pem().to_string(),
    )
        .into_response()
}

async fn issue(State(a): State<Authority>, body: axum::body::Bytes) -> Response {
    let req: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::bad_request(format!("bad certificate request: {e}")).into_response()
        }
    };
    match a.sign(&req) {
        Ok(res) => {
            tracing::info!(
                service = %req.service,
                instance = %req.instance_id,
                spiffe_id = %res.spiffe_id,
                not_after_ms = res.not_after_ms,
                "certificate issued"
            );
            Json(res).into_response()
        }
        Err(e) => e.into_response(),
    }
}

impl Authority {
    fn sign(&self, req: &CertificateRequest) -> Result<shoal_tls::CertificateResponse, ApiError> {
        if req.service == "control-plane" {
            return Err(ApiError::new(
                http::StatusCode::FORBIDDEN,
                "forbidden",
                "the control plane's identity is not issued to others",
            ));
        }
        let id = SpiffeId::for_name(&self.cfg.trust_domain, &req.service)
            .map_err(|e| ApiError::bad_request(format!("service: {e}")))?;
        if req.instance_id.is_empty() || req.instance_id.len() > MAX_INSTANCE_ID_LEN {
            return Err(ApiError::bad_request(format!(
                "instance_id: must be 1 to {MAX_INSTANCE_ID_LEN} characters"
            )));
        }
        let ttl_ms = match req.ttl_ms {
            Some(t) if t < MIN_REQUESTED_TTL_MS => {
                return Err(ApiError::bad_request(format!(
                    "ttl_ms: must be at least {MIN_REQUESTED_TTL_MS}"
                )))
            }
            Some(t) => t.min(self.cfg.leaf_ttl_ms),
            None => self.cfg.leaf_ttl_ms,
        };
        self.ca
            .sign_csr(&id, &req.csr_pem, Duration::from_millis(ttl_ms))
            .map_err(|e| ApiError::bad_request(format!("csr_pem: {e}")))
    }
}

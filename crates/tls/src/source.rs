//! Where a process gets its certificate, and the task that keeps it fresh.

use crate::{CertStore, CertificateRequest, CertificateResponse, Material, SpiffeId, TlsError};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;

/// Longest a certificate request to the control plane may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read from the control plane.
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Shortest and longest wait between failed renewals.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where a process's certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// The control plane's CA: a key made here, a CSR sent to
    /// `POST <url>/v1/certificates`, renewed at two thirds of the certificate's life.
    ControlPlane {
        /// The control plane (`http://127.0.0.1:7070`).
        url: String,
        /// The workload's name: a service name, or `gateway`.
        name: String,
        /// This instance (logged by the CA).
        instance_id: String,
        /// A life shorter than the CA's default.
        ttl_ms: Option<u64>,
    },
    /// Files another tool writes and renews (cert-manager's `tls.crt`, `tls.key`,
    /// `ca.crt`), read again whenever one of them changes.
    Files {
        /// The certificate chain, leaf first, PEM.
        cert: PathBuf,
        /// Its private key, PEM.
        key: PathBuf,
        /// The CA certificates to trust, PEM.
        ca: PathBuf,
        /// How often the files are checked for a change.
        interval: Duration,
    },
}

/// A started source: the store in use, and the task renewing it (stopped when
/// this is dropped).
pub struct Renewal {
    store: Arc<CertStore>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewal")
            .field("store", &self.store)
            .finish()
    }
}

impl Renewal {
    /// The store the process's TLS configs read.
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Get the first certificate from `source` (it must carry `expected`), then keep
/// it renewed in the background.
pub async fn start(source: CertSource, expected: &SpiffeId) -> Result<Renewal, TlsError> {
    let first = load(&source).await?;
    if first.id() != expected {
        return Err(TlsError::Identity(format!(
            "the certificate is for {}, this process is {expected}",
            first.id()
        )));
    }
    tracing::info!(id = %expected, not_after_ms = crate::unix_ms(first.not_after()), "certificate loaded");
    let store = CertStore::new(first);
    let task = tokio::spawn(renew(source, store.clone()));
    Ok(Renewal { store, task })
}

async fn load(source: &CertSource) -> Result<Material, TlsError> {
    match source {
        CertSource::ControlPlane {
            url,
            name,
            instance_id,
            ttl_ms,
        } => request_certificate(url, name, instance_id, *ttl_ms).await,
        CertSource::Files { cert, key, ca, .. } => {
            let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| TlsError::io(p, e));
            Material::from_pem(&read(cert)?, &read(key)?, &read(ca)?)
        }
    }
}

async fn renew(source: CertSource, store: Arc<CertStore>) {
    match &source {
        CertSource::ControlPlane { .. } => loop {
            let m = store.current();
            let life = m
                .not_after
                .duration_since(m.loaded_at)
                .unwrap_or(Duration::ZERO);
            let due = m.loaded_at + life * 2 / 3;
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            loop {
                match load(&source).await.and_then(|new| {
                    let not_after = new.not_after();
                    store.swap(new).map(|()| not_after)
                }) {
                    Ok(not_after) => {
                        tracing::info!(id = %store.id(), not_after_ms = crate::unix_ms(not_after), "certificate renewed");
                        break;
                    }
                    Err(e) => {
                        // Keep trying while the old certificate still serves; a tenth
                        // of what is left of it, within bounds.
                        let left = m
                            .not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO);
                        tracing::warn!(id = %store.id(), error = %e, left_ms = left.as_millis() as u64, "certificate renewal failed");
                        tokio::time::sleep((left / 10).clamp(RETRY_MIN, RETRY_MAX)).await;
                    }
                }
            }
        },
        CertSource::Files {
            cert,
            key,
            ca,
            interval,
        } => {
            let stamp = || {
                [cert, key, ca].map(|p| {
                    std::fs::metadata(p)
                        .ok()
                        .map(|m| (m.modified().ok(), m.len()))
                })
            };
            let mut last = stamp();
            let mut tick = tokio::time::interval(*interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = stamp();
                if now == last {
                    continue;
                }
                // The writer may be between files: a pair that does not match (or a
                // half-written file) fails here and is read again next tick.
                match load(&source).await.and_then(|m| store.swap(m)) {
                    Ok(()) => {
                        tracing::info!(id = %store.id(), "certificate files reloaded");
                        last = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "certificate files not reloaded"),
                }
            }
        }
    }
}

/// Ask the control plane at `url` for a certificate for `name`: a fresh P-256 key
/// made here (it never leaves the process), a CSR signed with it.
pub async fn request_certificate(
    url: &str,
    name: &str,
    instance_id: &str,
    ttl_ms: Option<u64>,
) -> Result<Material, TlsError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let body = serde_json::to_vec(&CertificateRequest {
        service: name.to_string(),
        instance_id: instance_id.to_string(),
        csr_pem,
        ttl_ms,
    })
    .map_err(|e| TlsError::Request(e.to_string()))?;
    let uri = format!("{}/v1/certificates", url.trim_end_matches('/'));
    let req = http::Request::post(&uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| TlsError::Request(format!("{uri}: {e}")))?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let res = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let res = client
            .request(req)
            .await
            .map_err(|e| TlsError::Request(format!("{uri}: {e}")))?;
        let status = res.status();
        let body = Limited::new(res.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| TlsError::Request(format!("{uri}: {e}")))?
            .to_bytes();
        Ok::<_, TlsError>((status, body))
    })
    .await
    .map_err(|_| TlsError::Request(format!("{uri}: no answer in time")))??;
    let (status, body) = res;
    if !status.is_success() {
        return Err(TlsError::Request(format!(
            "{uri}: {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(512)])
        )));
    }
    let answer: CertificateResponse = serde_json::from_slice(&body)
        .map_err(|e| TlsError::Request(format!("{uri}: bad answer: {e}")))?;
    Material::from_pem(&answer.cert_pem, &key.serialize_pem(), &answer.ca_pem)
}

//! A client with a certificate of the control plane's CA, for tests and tools that
//! call service instances directly in a system on mutual TLS (the default under
//! `shoal up`, docs/mtls.md): such an instance refuses plain HTTP.

use super::Answer;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use shoal_tls::{ClientSettings, TlsClients};
use std::net::SocketAddr;
use std::time::Duration;

/// Longest one request may take, its body read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An identity of the test's (or operator's) own,
/// `spiffe://<trust domain>/service/<name>`, issued by a control plane's CA, and
/// the mTLS clients that present it. An instance without an `[authorization]`
/// policy serves any holder of a certificate of the CA; one with a policy only the
/// callers it lists, so a test identity is listed only where the test needs it.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct TlsClient {
    clients: TlsClients<Full<Bytes>>,
}

impl TlsClient {
    /// Ask the control plane at `control_plane` (`http://127.0.0.1:7070`) for a
    /// certificate of `name` (a service name: `operator`, `shop-test`). The
    /// certificate lives as long as the CA's default (1 h) and is not renewed.
    pub async fn issue(control_plane: &str, name: &str) -> Result<Self, String> {
        let material = shoal_tls::request_certificate(control_plane, name, "test", None)
            .await
            .map_err(|e| format!("certificate for {name} from {control_plane}: {e}"))?;
        Ok(Self {
            clients: TlsClients::new(
                shoal_tls::CertStore::new(material),
                ClientSettings {
                    pool_max_idle_per_host: 8,
                    ..ClientSettings::default()
                },
            ),
        })
    }

    /// The identity it presents.
    pub fn id(&self) -> String {
        self.clients.store().id().to_string()
    }

    /// Send one request to `addr`, an instance of `service` (which must prove to
    /// be `spiffe://<td>/service/<service>`), over mTLS; errors as text.
    pub async fn request(
        &self,
        service: &str,
        addr: SocketAddr,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Answer, String> {
        let client = self.clients.client(service).map_err(|e| e.to_string())?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body.into()))
            .map_err(|e| e.to_string())?;
        let call = async {
            let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
            let (parts, body) = res.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| "timed out".to_string())?
    }

    /// GET `path` from `addr`, an instance of `service`.
    pub async fn get(&self, service: &str, addr: SocketAddr, path: &str) -> Result<Answer, String> {
        self.request(service, addr, Method::GET, path, &[], Bytes::new())
            .await
    }
}

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use shoal_core::registry::{Catalog, Registered, Registration};
use shoal_core::resilience::{BreakerList, FaultList, FaultRule};
use shoal_core::{ApiError, Error, ErrorKind, Origin};
use std::time::Duration;

/// Largest registry answer read (a catalog of the registry's maximum size fits).
const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;
/// Longest `GET /v1/breakers` may take: the control plane asks every instance (each
/// bounded to 500 ms, 64 at a time), so a large system takes more than one call's time.
const BREAKERS_TIMEOUT: Duration = Duration::from_secs(30);

/// `value` made safe for a URL's path segment or query value (percent-encoded).
pub(crate) fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The registry's HTTP API, from the client side.
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .finish()
    }
}

impl RegistryClient {
    /// A client of the registry at `base` (for example `http://127.0.0.1:7070`).
    pub fn new(base: &str) -> Result<Self, Error> {
        let base = base.trim_end_matches('/').to_string();
        let uri: http::Uri = base
            .parse()
            .map_err(|e| Error::config(format!("registry url {base:?}")).with_source(e))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(Error::config(format!(
                "registry url {base:?}: must be http://host:port"
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            base,
            http,
            timeout: Duration::from_secs(5),
        })
    }

    /// The registry's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The timeout of one ordinary call (a long poll adds its wait).
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), Error> {
        let uri = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&uri);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::internal(format!("building request to {uri}")).with_source(e))?;
        let call = async {
            let res = self.http.request(req).await.map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    Origin::Upstream,
                    format!("registry at {} unreachable", self.base),
                )
                .with_source(e)
            })?;
            let status = res.status();
            let body = crate::body::read_limited(res.into_body(), MAX_ANSWER_BYTES, || {
                "reading registry answer".to_string()
            })
            .await?;
            Ok((status, body))
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                Origin::Upstream,
                format!("registry call {path} timed out"),
            )
        })?
    }

    pub(crate) fn decode<T: DeserializeOwned>(
        status: StatusCode,
        body: &[u8],
        what: &str,
    ) -> Result<T, Error> {
        if !status.is_success() {
            let kind = match status {
                StatusCode::NOT_FOUND => ErrorKind::NotFound,
                StatusCode::BAD_REQUEST => ErrorKind::InvalidInput,
                StatusCode::CONFLICT => ErrorKind::Conflict,
                s if s.is_server_error() => ErrorKind::Unavailable,
                _ => ErrorKind::Protocol,
            };
            let msg = ApiError::from_json(status, body)
                .map(|e| e.message)
                .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
            return Err(Error::new(
                kind,
                Origin::Upstream,
                format!("{what}: {} {msg}", status.as_u16()),
            ));
        }
        serde_json::from_slice(body).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                Origin::Upstream,
                format!("{what}: unexpected answer"),
            )
            .with_source(e)
        })
    }

    /// Register an instance.
    pub async fn register(&self, reg: &Registration) -> Result<Registered, Error> {
        let body = serde_json::to_vec(reg)
            .map_err(|e| Error::internal("encoding registration").with_source(e))?;
        let (status, bytes) = self
            .call(Method::POST, "/v1/instances", Some(body), self.timeout)
            .await?;
        Self::decode(status, &bytes, "register")
    }

    /// Renew a lease. `Ok(false)` when the registry does not know the instance (it
    /// expired, or the registry lost it): register again.
    pub async fn heartbeat(&self, id: &str) -> Result<bool, Error> {
        let (status, bytes) = self
            .call(
                Method::PUT,
                &format!("/v1/instances/{id}/heartbeat"),
                None,
                self.timeout,
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        Self::decode::<serde_json::Value>(status, &bytes, "heartbeat").map(|_| true)
    }

    /// Remove an instance; an unknown id is not an error (it is gone either way).
    pub async fn deregister(&self, id: &str) -> Result<(), Error> {
        let (status, bytes) = self
            .call(
                Method::DELETE,
                &format!("/v1/instances/{id}"),
                None,
                self.timeout,
            )
            .await?;
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Self::decode::<serde_json::Value>(status, &bytes, "deregister").map(|_| ())
    }

    /// The catalog now, or (with `after`) once its index differs from `after`,
    /// waiting at most `wait`.
    pub async fn catalog(&self, after: Option<u64>, wait: Duration) -> Result<Catalog, Error> {
        let path = match after {
            Some(i) => format!("/v1/services?index={i}&wait_ms={}", wait.as_millis()),
            None => "/v1/services".to_string(),
        };
        let timeout = self.timeout + wait;
        let (status, bytes) = self.call(Method::GET, &path, None, timeout).await?;
        Self::decode(status, &bytes, "catalog")
    }

    /// Add a fault rule (`POST /v1/faults`); answers the stored rule, with the `id`
    /// and `expires_at_ms` the control plane gave it.
    pub async fn add_fault(&self, rule: &FaultRule) -> Result<FaultRule, Error> {
        let body = serde_json::to_vec(rule)
            .map_err(|e| Error::internal("encoding fault rule").with_source(e))?;
        let (status, bytes) = self
            .call(Method::POST, "/v1/faults", Some(body), self.timeout)
            .await?;
        Self::decode(status, &bytes, "add fault")
    }

    /// The fault rules in force (of `service` only, when given), or (with `after`)
    /// once the table's index differs from `after`, waiting at most `wait`.
    pub async fn faults(
        &self,
        service: Option<&str>,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<FaultList, Error> {
        let mut query = Vec::new();
        if let Some(s) = service {
            query.push(format!("service={}", encode(s)));
        }
        if let Some(i) = after {
            query.push(format!("index={i}&wait_ms={}", wait.as_millis()));
        }
        let path = if query.is_empty() {
            "/v1/faults".to_string()
        } else {
            format!("/v1/faults?{}", query.join("&"))
        };
        let timeout = self.timeout
            + if after.is_some() {
                wait
            } else {
                Duration::ZERO
            };
        let (status, bytes) = self.call(Method::GET, &path, None, timeout).await?;
        Self::decode(status, &bytes, "faults")
    }

    /// Remove one fault rule. `Ok(false)` when the control plane holds no rule with
    /// that id (removed already, or expired).
    pub async fn remove_fault(&self, id: &str) -> Result<bool, Error> {
        let (status, bytes) = self
            .call(
                Method::DELETE,
                &format!("/v1/faults/{}", encode(id)),
                None,
                self.timeout,
            )
            .await?;
        match status {
            StatusCode::NO_CONTENT => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Self::decode::<serde_json::Value>(status, &bytes, "remove fault").map(|_| true),
        }
    }

    /// Remove every fault rule of `service`, or all of them; answers how many went.
    pub async fn clear_faults(&self, service: Option<&str>) -> Result<u64, Error> {
        #[derive(serde::Deserialize)]
        struct Removed {
            removed: u64,
        }
        let path = match service {
            Some(s) => format!("/v1/faults?service={}", encode(s)),
            None => "/v1/faults".to_string(),
        };
        let (status, bytes) = self.call(Method::DELETE, &path, None, self.timeout).await?;
        Self::decode::<Removed>(status, &bytes, "clear faults").map(|r| r.removed)
    }

    /// Where the control plane's embedded broker listens (`NotFound` when it runs
    /// none).
    pub async fn broker_addr(&self) -> Result<String, Error> {
        #[derive(serde::Deserialize)]
        struct Broker {
            addr: String,
        }
        let (status, bytes) = self
            .call(Method::GET, "/v1/broker", None, self.timeout)
            .await?;
        Self::decode::<Broker>(status, &bytes, "broker address").map(|b| b.addr)
    }

    /// Every instance's circuit breakers, gathered by the control plane; instances
    /// that did not answer are listed in `unreachable`.
    pub async fn breakers(&self) -> Result<BreakerList, Error> {
        let (status, bytes) = self
            .call(Method::GET, "/v1/breakers", None, BREAKERS_TIMEOUT)
            .await?;
        Self::decode(status, &bytes, "breakers")
    }
}

//! How coordinator and participants reach each other: two small traits, so tests and
//! other transports can stand in, and their HTTP/JSON implementations on hyper-util's
//! pooled client: plain HTTP, or mutual TLS as the service's own identity
//! (`HttpParticipantLink::mutual`, docs/mtls.md), checking that the peer proves to be
//! the service the endpoint belongs to.

use crate::wire::{Decision, DecisionAnswer, Outcome, PrepareAnswer, PrepareRequest, TxRef, Vote};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_core::{ApiError, Error, ErrorKind, Origin};
use shoal_tls::{CertStore, ClientSettings, TlsClients};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// What a link call returns: boxed, so the traits can be used as `dyn`.
pub type LinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// The coordinator's way to its participants. `endpoint` is what the transaction
/// names the participant by (for HTTP, the base URL of its routes).
///
/// The coordinator bounds every call with its own timeouts, so an implementation
/// need not, and treats any error as "no vote" (prepare) or "try again" (decision).
pub trait ParticipantLink: Send + Sync + 'static {
    /// Ask the participant to prepare.
    fn prepare<'a>(
        &'a self,
        endpoint: &'a str,
        request: &'a PrepareRequest,
    ) -> LinkFuture<'a, Vote>;

    /// Tell the participant the outcome; `Ok` means it acknowledged (applied it, or
    /// had already).
    fn deliver<'a>(
        &'a self,
        endpoint: &'a str,
        tx_id: &'a str,
        outcome: Outcome,
    ) -> LinkFuture<'a, ()>;
}

/// A participant's way to its coordinator, to ask what was decided.
pub trait CoordinatorLink: Send + Sync + 'static {
    /// Ask the coordinator at `endpoint` for the decision on `tx_id`.
    fn decision<'a>(&'a self, endpoint: &'a str, tx_id: &'a str) -> LinkFuture<'a, Decision>;
}

/// Largest answer body read from the other side; every protocol answer is tiny.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Connect timeout: peers are on the same network, a slow connect is a dead peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Whole-call timeout of the HTTP links, a backstop behind the callers' own.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Which service an endpoint belongs to: the identity its server must prove in
/// mutual TLS mode. `None` refuses the call (no identity, no TLS call).
pub type PeerOf = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The `{name}` of a participant endpoint `…/2pc/{name}`: the service a participant
/// belongs to when, as in the shop, participants are named after their services.
pub fn participant_name(endpoint: &str) -> Option<&str> {
    let (_, name) = endpoint.trim_end_matches('/').rsplit_once("/2pc/")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// How the links reach the other side.
#[derive(Clone)]
enum Transport {
    /// Plain HTTP: `http://` endpoints only. Boxed: the client is large, the
    /// enum is kept small.
    Plain(Box<Client<HttpConnector, Full<Bytes>>>),
    /// Mutual TLS as the store's identity, to the service `peer` names. An
    /// `http://` endpoint is called over TLS all the same: a caller in mutual mode
    /// always speaks TLS (docs/mtls.md), and endpoints recorded before the switch
    /// keep working.
    Mutual {
        clients: TlsClients<Full<Bytes>>,
        peer: PeerOf,
    },
}

/// A JSON-over-HTTP caller shared by both links.
#[derive(Clone)]
struct JsonClient {
    transport: Transport,
    timeout: Duration,
}

impl JsonClient {
    fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        Self {
            transport: Transport::Plain(Box::new(
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .pool_max_idle_per_host(8)
                    .build(connector),
            )),
            timeout,
        }
    }

    fn mutual(timeout: Duration, store: Arc<CertStore>, peer: PeerOf) -> Self {
        let settings = ClientSettings {
            connect_timeout: CONNECT_TIMEOUT,
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 8,
            http2: false,
        };
        Self {
            transport: Transport::Mutual {
                clients: TlsClients::new(store, settings),
                peer,
            },
            timeout,
        }
    }

    /// `POST {endpoint}/{suffix}` with `body` as JSON; the answer as `T`.
    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        endpoint: &str,
        suffix: &str,
        body: &B,
        what: &str,
    ) -> Result<T, Error> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::InvalidInput,
                Origin::Internal,
                format!("{what}: endpoint {endpoint:?} {why}"),
            )
        };
        let base = endpoint.trim_end_matches('/');
        let (url, tls) = match &self.transport {
            Transport::Plain(_) if base.starts_with("http://") => {
                (format!("{base}/{suffix}"), None)
            }
            Transport::Plain(_) => {
                return Err(bad(
                    "is not an http:// URL (an https:// peer needs a link in mutual TLS mode)"
                        .into(),
                ))
            }
            Transport::Mutual { clients, peer } => {
                let Some(rest) = base
                    .strip_prefix("https://")
                    .or_else(|| base.strip_prefix("http://"))
                else {
                    return Err(bad("is not an http:// or https:// URL".into()));
                };
                let Some(service) = peer(endpoint) else {
                    return Err(bad(
                        "belongs to no known service: no identity to expect".into()
                    ));
                };
                let client = clients
                    .client(&service)
                    .map_err(|e| bad(format!("no TLS identity for {service}: {e}")))?;
                (format!("https://{rest}/{suffix}"), Some(client))
            }
        };
        let url = url.as_str();
        let body = serde_json::to_vec(body)
            .map_err(|e| Error::internal(format!("{what}: encoding the request")).with_source(e))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| {
                Error::new(
                    ErrorKind::InvalidInput,
                    Origin::Internal,
                    format!("{what}: bad URL {url}"),
                )
                .with_source(e)
            })?;
        let call = async {
            let sent = match (&self.transport, tls) {
                (_, Some(tls)) => tls.request(req).await,
                (Transport::Plain(http), None) => http.request(req).await,
                (Transport::Mutual { .. }, None) => {
                    return Err(Error::internal(format!("{what}: no TLS client")))
                }
            };
            let res = sent.map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    Origin::Upstream,
                    format!("{what}: {url} unreachable"),
                )
                .with_source(e)
            })?;
            let status = res.status();
            let body = Limited::new(res.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Protocol,
                        Origin::Upstream,
                        format!("{what}: reading the answer of {url} (at most {MAX_ANSWER_BYTES} bytes)"),
                    )
                    .with_retryable(true)
                    .with_source(std::io::Error::other(e))
                })?
                .to_bytes();
            Ok::<_, Error>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    Origin::Upstream,
                    format!("{what}: {url} did not answer within {:?}", self.timeout),
                )
            })??;
        if !status.is_success() {
            let kind = match status {
                StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::InvalidInput,
                StatusCode::NOT_FOUND => ErrorKind::NotFound,
                StatusCode::CONFLICT => ErrorKind::Conflict,
                StatusCode::GATEWAY_TIMEOUT => ErrorKind::Timeout,
                s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    ErrorKind::Unavailable
                }
                _ => ErrorKind::Protocol,
            };
            let msg = ApiError::from_json(status, &body)
                .map(|e| e.message)
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(Error::new(
                kind,
                Origin::Upstream,
                format!("{what}: {url} answered {} {msg}", status.as_u16()),
            )
            .with_retryable(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS));
        }
        serde_json::from_slice(&body).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                Origin::Upstream,
                format!("{what}: {url} answered a body that is not the expected JSON"),
            )
            .with_source(e)
        })
    }
}

/// [`ParticipantLink`] over HTTP: `POST {endpoint}/prepare`, `/commit`, `/abort`, as
/// served by [`crate::participant_router`].
#[derive(Clone)]
pub struct HttpParticipantLink {
    client: JsonClient,
}

impl std::fmt::Debug for HttpParticipantLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpParticipantLink").finish()
    }
}

impl Default for HttpParticipantLink {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpParticipantLink {
    /// A link with a 1 s connect timeout and a 10 s backstop per call (the
    /// coordinator's own, shorter, timeouts apply first).
    pub fn new() -> Self {
        Self {
            client: JsonClient::new(DEFAULT_CALL_TIMEOUT),
        }
    }

    /// [`HttpParticipantLink::new`] over mutual TLS, presenting `store`'s
    /// certificate: every call is TLS (an `http://` endpoint too), and the server
    /// must prove to be the service `peer` names for the endpoint
    /// (`spiffe://<td>/service/<name>`), or the call fails like a refused
    /// connection. [`participant_name`] is the `peer` of participants named after
    /// their services.
    pub fn mutual(
        store: Arc<CertStore>,
        peer: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            client: JsonClient::mutual(DEFAULT_CALL_TIMEOUT, store, Arc::new(peer)),
        }
    }
}

impl ParticipantLink for HttpParticipantLink {
    fn prepare<'a>(
        &'a self,
        endpoint: &'a str,
        request: &'a PrepareRequest,
    ) -> LinkFuture<'a, Vote> {
        Box::pin(async move {
            let what = format!("prepare of transaction {}", request.tx_id);
            let a: PrepareAnswer = self
                .client
                .post(endpoint, "prepare", request, &what)
                .await?;
            Ok(a.vote)
        })
    }

    fn deliver<'a>(
        &'a self,
        endpoint: &'a str,
        tx_id: &'a str,
        outcome: Outcome,
    ) -> LinkFuture<'a, ()> {
        Box::pin(async move {
            let what = format!("{} of transaction {tx_id}", outcome.as_str());
            let body = TxRef {
                tx_id: tx_id.to_string(),
            };
            let _: serde_json::Value = self
                .client
                .post(endpoint, outcome.as_str(), &body, &what)
                .await?;
            Ok(())
        })
    }
}

/// [`CoordinatorLink`] over HTTP: `POST {endpoint}/decision`, as served by
/// [`crate::coordinator_router`].
#[derive(Clone)]
pub struct HttpCoordinatorLink {
    client: JsonClient,
}

impl std::fmt::Debug for HttpCoordinatorLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCoordinatorLink").finish()
    }
}

impl Default for HttpCoordinatorLink {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpCoordinatorLink {
    /// A link with a 1 s connect timeout and a 10 s backstop per call (the
    /// participant's own, shorter, timeout applies first).
    pub fn new() -> Self {
        Self {
            client: JsonClient::new(DEFAULT_CALL_TIMEOUT),
        }
    }

    /// [`HttpCoordinatorLink::new`] over mutual TLS, presenting `store`'s
    /// certificate: the coordinator at an endpoint must prove to be the service
    /// `peer` names for it.
    pub fn mutual(
        store: Arc<CertStore>,
        peer: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            client: JsonClient::mutual(DEFAULT_CALL_TIMEOUT, store, Arc::new(peer)),
        }
    }
}

impl CoordinatorLink for HttpCoordinatorLink {
    fn decision<'a>(&'a self, endpoint: &'a str, tx_id: &'a str) -> LinkFuture<'a, Decision> {
        Box::pin(async move {
            let what = format!("decision query for transaction {tx_id}");
            let body = TxRef {
                tx_id: tx_id.to_string(),
            };
            let a: DecisionAnswer = self.client.post(endpoint, "decision", &body, &what).await?;
            if a.tx_id != tx_id {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    Origin::Upstream,
                    format!("{what}: {endpoint} answered for transaction {}", a.tx_id),
                ));
            }
            Ok(a.decision)
        })
    }
}

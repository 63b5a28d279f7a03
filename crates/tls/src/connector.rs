//! hyper clients over mutual TLS.

use crate::{client_config, CertStore, SpiffeId, TlsError};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

/// The most target identities a [`TlsClients`] keeps a client (and its pool) for;
/// past it, the map starts over (a system has far fewer services).
const MAX_TARGETS: usize = 1024;
/// Longest a TLS handshake may take once the TCP connection stands.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A hyper connector that dials TCP, then does the TLS handshake as the store's
/// identity, accepting only the server `expected`. Its errors are connect errors
/// to hyper: a refused handshake never carried the request.
#[derive(Clone)]
pub struct TlsConnector {
    http: HttpConnector,
    tls: tokio_rustls::TlsConnector,
}

impl TlsConnector {
    /// A connector to instances of `expected`.
    pub fn new(
        store: Arc<CertStore>,
        expected: SpiffeId,
        http2: bool,
        connect_timeout: Duration,
    ) -> Result<Self, TlsError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // The URIs are https://; the TLS is ours.
        http.enforce_http(false);
        Ok(Self {
            http,
            tls: tokio_rustls::TlsConnector::from(client_config(store, expected, http2)?),
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TlsConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower::Service::<http::Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        let dial = tower::Service::<http::Uri>::call(&mut self.http, uri);
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = dial.await?.into_inner();
            let name = ServerName::try_from(host)?;
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connect(name, tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(TlsConn {
                io: TokioIo::new(stream),
                h2,
            })
        })
    }
}

/// A client TLS connection, as hyper reads and writes it.
pub struct TlsConn {
    io: TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    h2: bool,
}

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl Read for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// Pool and connection settings of [`TlsClients`].
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept per instance.
    pub pool_max_idle_per_host: usize,
    /// Speak HTTP/2 (negotiated by ALPN).
    pub http2: bool,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 64,
            http2: false,
        }
    }
}

/// hyper clients over mutual TLS, one per target identity: the identity a
/// connection must prove is fixed when it is made, so each target gets a
/// connector (and a connection pool) of its own. Cheap to clone.
pub struct TlsClients<B> {
    store: Arc<CertStore>,
    settings: ClientSettings,
    clients: Arc<Mutex<HashMap<String, Client<TlsConnector, B>>>>,
}

impl<B> Clone for TlsClients<B> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            settings: self.settings.clone(),
            clients: self.clients.clone(),
        }
    }
}

impl<B> std::fmt::Debug for TlsClients<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClients")
            .field("store", &self.store)
            .finish()
    }
}

impl<B> TlsClients<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Clients presenting `store`'s certificate.
    pub fn new(store: Arc<CertStore>, settings: ClientSettings) -> Self {
        Self {
            store,
            settings,
            clients: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The store whose certificate is presented.
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// The client for workload `name` (a service name, or `gateway` /
    /// `control-plane`) in this store's trust domain: its connections accept only
    /// that identity.
    pub fn client(&self, name: &str) -> Result<Client<TlsConnector, B>, TlsError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(name) {
            return Ok(c.clone());
        }
        let expected = SpiffeId::for_name(self.store.id().trust_domain(), name)?;
        let connector = TlsConnector::new(
            self.store.clone(),
            expected,
            self.settings.http2,
            self.settings.connect_timeout,
        )?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.settings.pool_idle_timeout)
            .pool_max_idle_per_host(self.settings.pool_max_idle_per_host)
            .http2_only(self.settings.http2)
            .build(connector);
        if clients.len() >= MAX_TARGETS {
            clients.clear();
        }
        clients.insert(name.to_string(), client.clone());
        Ok(client)
    }
}

//! The accept loop of a mutual-mode service: TLS only, a client certificate
//! required, the caller's verified identity passed to the handlers.

use crate::{spiffe, SpiffeId};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Longest a client may take over its TLS handshake: a connection that opens and
/// says nothing is closed rather than held.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The verified identity of the caller, a request extension on every request a
/// mutual-mode server serves (from the client certificate of its connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity(pub SpiffeId);

/// Serve `app` over TLS with `config` on `listener` until `shutdown` resolves,
/// then wait for open connections to finish their requests (the caller bounds
/// that wait). A connection whose handshake fails (plain text, no certificate, a
/// certificate of another CA or expired) is closed before any request is read.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let builder = Arc::new(Builder::new(TokioExecutor::new()));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            // The verifier accepted only certificates with a SPIFFE id; read it again
            // from the certificate itself rather than trusting any other state.
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| spiffe::spiffe_id_of(c).ok())
                .map(PeerIdentity);
            let Some(identity) = identity else {
                tracing::debug!(%peer, "no client identity after the handshake");
                return;
            };
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(identity.clone());
                app.clone().oneshot(req)
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // Waits for every connection, those still in their handshake too (each holds
    // a watcher); the caller bounds the wait.
    graceful.shutdown().await;
    Ok(())
}

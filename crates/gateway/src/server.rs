//! The gateway's own accept loop: HTTP/1.1 and HTTP/2 (by prior knowledge or
//! upgrade-free detection) on one port, with the limits an edge needs and axum's
//! `serve` does not expose: a deadline for a request's head (slow clients are cut
//! off), a bound on head size (431), a bound on connections, and a graceful drain.

use crate::config::ServerConfig;
use axum::extract::ConnectInfo;
use axum::response::IntoResponse;
use axum::Router;
use futures_util::future::Either;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use shoal_core::{ApiError, Error};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How long a shutdown waits for open requests before it closes what is left.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Several `Content-Length`s, or one with `Transfer-Encoding` (should hyper ever
/// pass both on): a request framed two ways is how requests are smuggled past a
/// proxy, so it is refused (RFC 9112 §6.3: it "ought to be handled as an error").
fn conflicting_framing(h: &http::HeaderMap) -> bool {
    let lengths = h.get_all(http::header::CONTENT_LENGTH).iter().count();
    lengths > 1 || (lengths == 1 && h.contains_key(http::header::TRANSFER_ENCODING))
}

fn framing_refused() -> axum::response::Response {
    let mut res = ApiError::bad_request(
        "the request has both Content-Length and Transfer-Encoding, or two Content-Lengths",
    )
    .into_response();
    // What follows on this connection cannot be trusted to start a request.
    res.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    res
}

/// Serve `app` on `listener` until `shutdown` resolves, then drain.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    cfg: &ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Hyper starts this timer whenever it waits for a request head, so it also
        // closes keep-alive connections idle for longer.
        .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms))
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.http2_max_streams)
        .max_header_list_size(cfg.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_millis(cfg.idle_timeout_ms)))
        .keep_alive_timeout(Duration::from_millis(cfg.header_read_timeout_ms));
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // A free slot first: past the limit, connections wait in the backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
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
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            if conflicting_framing(req.headers()) {
                return Either::Left(std::future::ready(Ok(framing_refused())));
            }
            // Hyper reads a request with both Content-Length and Transfer-Encoding
            // by the latter and drops the former, so the clash is invisible here.
            // RFC 9112 §6.1: the server MUST close the connection after answering
            // such a request; not knowing, close after every chunked HTTP/1.1
            // request, so bytes a front proxy may have framed otherwise are never
            // read as a request of their own.
            let chunked = req.version() == http::Version::HTTP_11
                && req.headers().contains_key(http::header::TRANSFER_ENCODING);
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            Either::Right(app.clone().oneshot(req).map(move |res| {
                res.map(|mut res| {
                    if chunked {
                        res.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    res
                })
            }))
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_LIMIT) => {
            tracing::warn!("shutdown: requests still open after the drain limit");
        }
    }
    Ok(())
}

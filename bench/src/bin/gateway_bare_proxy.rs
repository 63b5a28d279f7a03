//! The floor of `bench/gateway.sh` (`FLOOR=1`): the least a proxy on the gateway's
//! own stack can do. A hyper HTTP/1.1 server that sends every request to one fixed
//! upstream through the same pooled client the gateway's `Caller` uses
//! (hyper-util's legacy `Client`, keep-alive, 64 idle connections, `TCP_NODELAY`),
//! and streams the answer back: no routing, no discovery, no policies, no
//! telemetry. The distance between it and nginx is the stack's (tokio, hyper); the
//! distance between the gateway and it is the gateway's own work per request.
//!
//! Usage: `gateway-bare-proxy <listen> <upstream addr>`; the runtime is tokio's
//! multi-thread one as in `shoal`, so `TOKIO_WORKER_THREADS` sets its threads. It
//! prints `listening <addr>` once bound.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Hop-by-hop headers, dropped both ways as the gateway does.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: String,
}

type Answer = Response<http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>>;

async fn forward(proxy: Arc<Proxy>, req: Request<Incoming>) -> Result<Answer, hyper::Error> {
    let peer_host = req.headers().get(http::header::HOST).cloned();
    let (parts, body) = req.into_parts();
    // Bodies read whole, as the gateway reads them.
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match format!("http://{}{}", proxy.upstream, path).parse() {
        Ok(u) => u,
        Err(_) => return Ok(status(http::StatusCode::BAD_REQUEST)),
    };
    let mut out = Request::new(Full::new(body));
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    let headers = out.headers_mut();
    for (name, value) in &parts.headers {
        if name != http::header::HOST && !HOP_BY_HOP.contains(&name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(h) = peer_host {
        headers.insert("x-forwarded-host", h);
    }
    match proxy.client.request(out).await {
        Ok(res) => {
            let (mut parts, body) = res.into_parts();
            for h in HOP_BY_HOP {
                parts.headers.remove(*h);
            }
            Ok(Response::from_parts(parts, body.boxed_unsync()))
        }
        Err(_) => Ok(status(http::StatusCode::BAD_GATEWAY)),
    }
}

fn status(code: http::StatusCode) -> Answer {
    let mut res = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *res.status_mut() = code;
    res
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("gateway-bare-proxy: {what}: {e}");
    std::process::exit(1)
}

/// The `shoal` binary's allocator, so the floor is the same stack as the gateway.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: gateway-bare-proxy <listen> <upstream addr>");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().unwrap_or_else(|e| fail("listen", e));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail("runtime", e));
    let upstream = upstream.clone();
    rt.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        let proxy = Arc::new(Proxy { client, upstream });
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| fail("bind", e));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| fail("local address", e));
        println!("listening {addr}");
        let _ = std::io::stdout().flush();
        let serve = async {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("gateway-bare-proxy: accept: {e}");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| forward(proxy.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = shoal_core::shutdown::signal() => {}
        }
    });
}

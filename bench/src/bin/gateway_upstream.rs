//! The trivial upstream behind `bench/gateway.sh`: a bare hyper HTTP/1.1 server
//! (keep-alive) that answers `/hello` with a short fixed body, registered with the
//! shoal control plane so the gateway finds it by service name, while nginx is
//! pointed at its address directly. Both proxies then forward to the same process.
//!
//! Usage: `gateway-upstream <registry-url> [service] [listen]`: service `hello` and
//! `127.0.0.1:0` by default. It prints `listening <addr>` on stdout once it is
//! registered, and deregisters on SIGINT or SIGTERM.
//!
//! One thread (a current-thread runtime): the script pins it beside wrk, so what it
//! costs is the same for the gateway and for nginx.

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use shoal_core::registry::Registration;
use shoal_discovery::{Lease, RegistryClient};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;

/// The answer to `/hello`, any method: a request body (the FEATURES mode's POST) is
/// read and dropped.
const HELLO: &[u8] = b"hello, world\n";

/// Largest request body read; the benchmark's bodies are well below it.
const BODY_LIMIT_BYTES: usize = 64 * 1024;

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body): (StatusCode, &'static [u8]) = match req.uri().path() {
        "/hello" => {
            let (_, body) = req.into_parts();
            match http_body_util::Limited::new(body, BODY_LIMIT_BYTES)
                .collect()
                .await
            {
                Ok(_) => (StatusCode::OK, HELLO),
                Err(_) => (StatusCode::BAD_REQUEST, b"bad body\n"),
            }
        }
        // The registry's health probes.
        "/health/ready" | "/health/live" if req.method() == Method::GET => {
            (StatusCode::OK, b"{\"status\":\"ready\"}")
        }
        _ => (StatusCode::NOT_FOUND, b"not found\n"),
    };
    let mut res = Response::new(Full::new(Bytes::from_static(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    Ok(res)
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("gateway-upstream: {what}: {e}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(registry_url) = args.first() else {
        eprintln!("usage: gateway-upstream <registry-url> [service] [listen]");
        std::process::exit(2);
    };
    let service = args.get(1).cloned().unwrap_or_else(|| "hello".into());
    let listen: SocketAddr = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("127.0.0.1:0")
        .parse()
        .unwrap_or_else(|e| fail("listen address", e));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail("runtime", e));
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| fail("bind", e));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| fail("local address", e));
        let client = RegistryClient::new(registry_url).unwrap_or_else(|e| fail("registry", e));
        let lease = Lease::start(
            client,
            Registration {
                service: service.clone(),
                version: "1.0.0".into(),
                addr,
                id: Some(format!("{service}-bench")),
                pid: Some(std::process::id()),
                metadata: Default::default(),
                ttl_ms: None,
            },
        )
        .await
        .unwrap_or_else(|e| fail("registering", e));
        println!("listening {addr}");
        let _ = std::io::stdout().flush();

        let accept = async {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("gateway-upstream: accept: {e}");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service_fn(handle))
                        .await;
                });
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = shoal_core::shutdown::signal() => {}
        }
        if let Err(e) = lease.deregister().await {
            eprintln!("gateway-upstream: deregistering: {e}");
        }
    });
}

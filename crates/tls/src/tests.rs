//! Handshakes between real sockets: what is accepted and what is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::sync::Arc;
use std::time::Duration;

fn ca(tag: &str) -> Ca {
    let d = std::env::temp_dir().join(format!("shoal-tls-t-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    Ca::load_or_create(&d, "shoal.local").unwrap()
}

fn store(ca: &Ca, name: &str, ttl: Duration) -> Arc<CertStore> {
    let id = SpiffeId::for_name("shoal.local", name).unwrap();
    let (key, res) = ca.issue(&id, ttl).unwrap();
    CertStore::new(Material::from_pem(&res.cert_pem, &key, &res.ca_pem).unwrap())
}

/// A TLS server of `name` answering its caller's name.
async fn server(store: Arc<CertStore>) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/who",
        axum::routing::get(
            |axum::Extension(p): axum::Extension<PeerIdentity>| async move { p.0.to_string() },
        ),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, server_config(store).unwrap(), app, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

async fn call(
    clients: &TlsClients<Empty<Bytes>>,
    target: &str,
    addr: std::net::SocketAddr,
) -> Result<String, String> {
    let client = clients.client(target).unwrap();
    let uri: http::Uri = format!("https://{addr}/who").parse().unwrap();
    let res = client.get(uri).await.map_err(|e| format!("{e:?}"))?;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Ok(String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn mutual_tls_passes_the_caller_and_refuses_strangers() {
    let ca1 = ca("one");
    let orders = store(&ca1, "orders", Duration::from_secs(3600));
    let (addr, _stop) = server(orders.clone()).await;

    // The right CA and the right target: the server sees the caller's identity.
    let gateway = TlsClients::new(
        store(&ca1, "gateway", Duration::from_secs(3600)),
        ClientSettings::default(),
    );
    assert_eq!(
        call(&gateway, "orders", addr).await.unwrap(),
        "spiffe://shoal.local/gateway"
    );
    // The client expected another service: the server's identity is refused.
    assert!(call(&gateway, "payments", addr).await.is_err());

    // A client of another CA: refused by the server (and it refuses the server).
    let ca2 = ca("two");
    let stranger = TlsClients::new(
        store(&ca2, "gateway", Duration::from_secs(3600)),
        ClientSettings::default(),
    );
    assert!(call(&stranger, "orders", addr).await.is_err());

    // An expired client certificate (valid until now, then a second passes).
    let expired = TlsClients::new(
        store(&ca1, "billing", Duration::ZERO),
        ClientSettings::default(),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(call(&expired, "orders", addr).await.is_err());

    // A renewed certificate is presented from the next connection on.
    let renewed = {
        let id = SpiffeId::service("shoal.local", "orders").unwrap();
        let (key, res) = ca1.issue(&id, Duration::from_secs(7200)).unwrap();
        Material::from_pem(&res.cert_pem, &key, &res.ca_pem).unwrap()
    };
    let not_after = renewed.not_after();
    orders.swap(renewed).unwrap();
    assert_eq!(orders.current().not_after(), not_after);
    // A store refuses material of another identity.
    let other = {
        let id = SpiffeId::service("shoal.local", "billing").unwrap();
        let (key, res) = ca1.issue(&id, Duration::from_secs(60)).unwrap();
        Material::from_pem(&res.cert_pem, &key, &res.ca_pem).unwrap()
    };
    assert!(orders.swap(other).is_err());
    let fresh = TlsClients::new(
        store(&ca1, "gateway", Duration::from_secs(3600)),
        ClientSettings::default(),
    );
    assert_eq!(
        call(&fresh, "orders", addr).await.unwrap(),
        "spiffe://shoal.local/gateway"
    );
}

#[tokio::test]
async fn plain_text_and_certificate_less_clients_are_refused_at_the_handshake() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca1 = ca("plain");
    let (addr, _stop) = server(store(&ca1, "orders", Duration::from_secs(3600))).await;

    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /who HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1 200"),
        "{out:?}"
    );

    // TLS, but no client certificate to present.
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::verify::ServerVerifier {
            store: store(&ca1, "gateway", Duration::from_secs(60)),
            expected: SpiffeId::service("shoal.local", "orders").unwrap(),
            provider: provider(),
        }))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let refused = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        tls.write_all(b"GET /who HTTP/1.1\r\nhost: x\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    }
    .await;
    // TLS 1.3 finishes the client's side first; the server's alert comes on read.
    match refused {
        Err(_) => {}
        Ok(out) => assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out)),
    }
}

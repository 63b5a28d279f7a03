//! Service-to-service mutual TLS (docs/mtls.md): the control plane's CA, services
//! in mutual mode calling each other by name, what is refused at the handshake,
//! the authorization policy, rotation under load, and the gateway as a client.

use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use shoal::{Ctx, PeerIdentity, RunningService, Service};
use shoal_tests::{control_plane, eventually, gateway_with, temp_dir, Server};
use shoal_tls::{CertStore, ClientSettings, TlsClients};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Routes every test service has: who called, and a call on to another service.
fn routes() -> Router {
    Router::new()
        .route(
            "/api/who",
            get(|Extension(p): Extension<PeerIdentity>| async move { p.0.to_string() }),
        )
        .route(
            "/internal/who",
            get(|Extension(p): Extension<PeerIdentity>| async move { p.0.to_string() }),
        )
        .route(
            "/api/call/{service}",
            get(
                |ctx: Ctx, axum::extract::Path(service): axum::extract::Path<String>| async move {
                    match ctx.client(&service).get("/api/who").send().await {
                        Ok(r) => (r.status, r.text()),
                        Err(e) => (http::StatusCode::BAD_GATEWAY, e.to_string()),
                    }
                },
            ),
        )
}

/// Start service `name` against `cp` with `extra` TOML appended to a mutual-mode
/// config.
async fn service(cp: &Server, name: &str, extra: &str) -> Result<RunningService, shoal::Error> {
    let dir = temp_dir(&format!("mtls-{name}"));
    let file = dir.join("service.toml");
    let text = format!(
        "registry_url = \"{}\"\nttl_ms = 3000\nderegister_grace_ms = 50\n{extra}\n",
        cp.url()
    );
    std::fs::write(&file, text).unwrap();
    Service::new(name)
        .routes(routes())
        .config_file(&file)
        .env(Vec::<(String, String)>::new())
        .start()
        .await
}

const MUTUAL: &str = "[tls]\nmode = \"mutual\"\n";

/// Clients of the test itself, as `spiffe://shoal.local/service/<name>`, with a
/// certificate from `cp`'s CA; a new connection per request when `fresh`.
async fn client_as(
    cp: &Server,
    name: &str,
    ttl_ms: Option<u64>,
    fresh: bool,
) -> TlsClients<Full<Bytes>> {
    let m = shoal_tls::request_certificate(&cp.url(), name, "test", ttl_ms)
        .await
        .unwrap();
    let settings = ClientSettings {
        pool_max_idle_per_host: if fresh { 0 } else { 8 },
        ..ClientSettings::default()
    };
    TlsClients::new(CertStore::new(m), settings)
}

/// `GET path` of `addr` (an instance of `target`) over mTLS: (status, body).
async fn get_tls(
    clients: &TlsClients<Full<Bytes>>,
    target: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), String> {
    let client = clients.client(target).map_err(|e| e.to_string())?;
    let req = http::Request::get(format!("https://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// Whether the registry counts an instance of `service` healthy (its probes
/// passed, over mTLS for a mutual-mode instance).
async fn healthy(cp: &Server, service: &str) -> bool {
    let r = shoal_discovery::RegistryClient::new(&cp.url()).unwrap();
    eventually(Duration::from_secs(10), || async {
        r.catalog(None, Duration::ZERO)
            .await
            .map(|c| {
                c.services
                    .iter()
                    .any(|s| s.name == service && s.instances.iter().any(|i| i.healthy))
            })
            .unwrap_or(false)
    })
    .await
}

#[tokio::test]
async fn the_ca_is_kept_across_restarts_and_checks_what_it_signs() {
    let dir = temp_dir("mtls-ca");
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cp = shoal_tests::control_plane_at(addr, shoal_tests::fast_registry(), dir.clone()).await;
    let first = shoal::testing::get(cp.addr, "/v1/ca").await.unwrap();
    assert_eq!(first.status, 200);
    assert!(
        first.text().starts_with("-----BEGIN CERTIFICATE-----"),
        "{}",
        first.text()
    );

    let post = |body: serde_json::Value| {
        let addr = cp.addr;
        async move {
            shoal::testing::request(
                addr,
                http::Method::POST,
                "/v1/certificates",
                &[("content-type", "application/json")],
                serde_json::to_vec(&body).unwrap(),
            )
            .await
            .unwrap()
        }
    };
    let bad_name =
        post(serde_json::json!({"service": "Bad_Name", "instance_id": "x", "csr_pem": ""})).await;
    assert_eq!(bad_name.status, 400, "{}", bad_name.text());
    let not_csr =
        post(serde_json::json!({"service": "orders", "instance_id": "x", "csr_pem": "nope"})).await;
    assert_eq!(not_csr.status, 400, "{}", not_csr.text());
    let cp_id =
        post(serde_json::json!({"service": "control-plane", "instance_id": "x", "csr_pem": ""}))
            .await;
    assert_eq!(cp_id.status, 403, "{}", cp_id.text());
    let too_short = shoal_tls::request_certificate(&cp.url(), "orders", "x", Some(10)).await;
    assert!(too_short.is_err());
    // A request for more than the CA's life gets the CA's life (an hour).
    let m = shoal_tls::request_certificate(&cp.url(), "orders", "x", Some(86_400_000))
        .await
        .unwrap();
    assert_eq!(m.id().to_string(), "spiffe://shoal.local/service/orders");
    let left = m
        .not_after()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(3600), "{left:?}");

    cp.stop().await;
    let cp = shoal_tests::control_plane_at(addr, shoal_tests::fast_registry(), dir.clone()).await;
    let again = shoal::testing::get(cp.addr, "/v1/ca").await.unwrap();
    assert_eq!(again.text(), first.text(), "the CA survives a restart");
    cp.stop().await;
}

#[tokio::test]
async fn mutual_services_call_each_other_by_name_and_strangers_are_refused() {
    let cp = control_plane().await;
    let inventory = service(&cp, "inventory", MUTUAL).await.unwrap();
    let orders = service(&cp, "orders", MUTUAL).await.unwrap();
    // The registry's probes pass over mTLS, as the control plane.
    assert!(healthy(&cp, "inventory").await);
    assert!(healthy(&cp, "orders").await);

    // orders calls inventory by name: inventory sees orders' identity.
    let tester = client_as(&cp, "tester", None, false).await;
    let (status, body) = get_tls(&tester, "orders", orders.addr(), "/api/call/inventory")
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "spiffe://shoal.local/service/orders")
    );
    let (status, body) = get_tls(&tester, "inventory", inventory.addr(), "/api/call/orders")
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "spiffe://shoal.local/service/inventory")
    );

    // A client expecting another service refuses inventory's certificate.
    assert!(get_tls(&tester, "payments", inventory.addr(), "/api/who")
        .await
        .is_err());

    // Plain text: no answer at all.
    let plain = shoal::testing::get(inventory.addr(), "/api/who").await;
    assert!(plain.is_err(), "{plain:?}");

    // A certificate of another CA.
    let other_ca =
        shoal_tls::Ca::load_or_create(&temp_dir("mtls-other-ca"), "shoal.local").unwrap();
    let id = shoal_tls::SpiffeId::service("shoal.local", "orders").unwrap();
    let (key, res) = other_ca.issue(&id, Duration::from_secs(3600)).unwrap();
    let m = shoal_tls::Material::from_pem(&res.cert_pem, &key, &res.ca_pem).unwrap();
    let stranger = TlsClients::new(CertStore::new(m), ClientSettings::default());
    assert!(
        get_tls(&stranger, "inventory", inventory.addr(), "/api/who")
            .await
            .is_err()
    );

    // No certificate at all: TLS with the right CA, but nothing to present.
    let ca_pem = shoal::testing::get(cp.addr, "/v1/ca").await.unwrap().text();
    assert!(no_cert_refused(inventory.addr(), &ca_pem).await);

    // An expired certificate (the shortest life a request may ask for).
    let expired = client_as(&cp, "tester", Some(1_000), true).await;
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert!(get_tls(&expired, "inventory", inventory.addr(), "/api/who")
        .await
        .is_err());

    orders.shutdown().await.unwrap();
    inventory.shutdown().await.unwrap();
    cp.stop().await;
}

/// A TLS client that trusts the CA but presents no certificate gets no answer.
async fn no_cert_refused(addr: SocketAddr, ca_pem: &str) -> bool {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    // The server's certificate names no host; this client checks nothing of it.
    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = shoal_tls::provider();
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let answer = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        tls.write_all(b"GET /api/who HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    match tokio::time::timeout(Duration::from_secs(10), answer).await {
        Ok(Ok(out)) => out.is_empty(),
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

#[tokio::test]
async fn the_policy_lets_the_allowed_caller_through_and_counts_the_others() {
    let cp = control_plane().await;
    let policy = format!(
        "{MUTUAL}[authorization]\nallow = {{ orders = [\"/api/who\"], gateway = [\"*\"] }}\n"
    );
    let inventory = service(&cp, "inventory", &policy).await.unwrap();
    let orders = service(&cp, "orders", MUTUAL).await.unwrap();
    // Health stays reachable by the control plane's identity.
    assert!(healthy(&cp, "inventory").await);

    let tester = client_as(&cp, "tester", None, false).await;
    // orders is allowed /api/who.
    let (status, body) = get_tls(&tester, "orders", orders.addr(), "/api/call/inventory")
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "spiffe://shoal.local/service/orders")
    );
    // tester is not in the policy; orders is, but not for /internal/who.
    let (status, body) = get_tls(&tester, "inventory", inventory.addr(), "/api/who")
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "forbidden_caller");
    let as_orders = client_as(&cp, "orders", None, false).await;
    let (status, _) = get_tls(&as_orders, "inventory", inventory.addr(), "/internal/who")
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, _) = get_tls(&as_orders, "inventory", inventory.addr(), "/api/who")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let metrics = inventory.ctx().metrics().render();
    assert!(
        metrics.contains(r#"shoal_authz_denied_total{service="inventory",caller="spiffe://shoal.local/service/tester"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"shoal_authz_denied_total{service="inventory",caller="spiffe://shoal.local/service/orders"} 1"#),
        "{metrics}"
    );

    // A policy without mutual TLS cannot know the caller: refused at start.
    let err = service(
        &cp,
        "billing",
        "[authorization]\nallow = { orders = [\"*\"] }\n",
    )
    .await
    .err()
    .unwrap();
    assert!(err.to_string().starts_with("authorization:"), "{err}");

    orders.shutdown().await.unwrap();
    inventory.shutdown().await.unwrap();
    cp.stop().await;
}

#[tokio::test]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let cp = control_plane().await;
    // Three-second certificates, renewed at two seconds; every call a new
    // connection (so every call is a handshake with the certificates of the moment).
    let short = format!("{MUTUAL}cert_ttl_ms = 3000\n[client]\npool_max_idle_per_host = 0\n");
    let inventory = service(&cp, "inventory", &short).await.unwrap();
    let orders = service(&cp, "orders", &short).await.unwrap();
    assert!(healthy(&cp, "inventory").await);
    let tester = client_as(&cp, "tester", None, true).await;
    let addr = orders.addr();
    let load = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        let start = tokio::time::Instant::now();
        // Bounded: at most 5000 calls, and about ten seconds.
        for _ in 0..5_000 {
            if start.elapsed() > Duration::from_secs(10) {
                break;
            }
            match get_tls(&tester, "orders", addr, "/api/call/inventory").await {
                Ok((200, _)) => ok += 1,
                other => failed.push(format!("{other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, failed)
    });
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Ten seconds of three-second certificates: without renewals the calls after
    // the third second would all have failed.
    assert!(ok > 50, "{ok}");
    println!("rotation under load: {ok} calls, none failed");
    orders.shutdown().await.unwrap();
    inventory.shutdown().await.unwrap();
    cp.stop().await;
}

#[tokio::test]
async fn the_gateway_reaches_a_mutual_mode_service() {
    let cp = control_plane().await;
    let inventory = service(&cp, "inventory", MUTUAL).await.unwrap();
    assert!(healthy(&cp, "inventory").await);
    let tls = shoal_tls::TlsConfig {
        mode: shoal_tls::TlsMode::Mutual,
        ..Default::default()
    };
    let cfg = shoal_gateway::GatewayConfig {
        routes: vec![shoal_gateway::RouteConfig::to("/api", "inventory")],
        tls,
        ..Default::default()
    };
    let gw = gateway_with(&cp.url(), cfg).await;
    let ok = eventually(Duration::from_secs(10), || async {
        shoal::testing::get(gw.addr, "/api/who")
            .await
            .is_ok_and(|a| a.status == 200 && a.text() == "spiffe://shoal.local/gateway")
    })
    .await;
    assert!(ok, "{:?}", shoal::testing::get(gw.addr, "/api/who").await);
    gw.stop().await;
    inventory.shutdown().await.unwrap();
    cp.stop().await;
}

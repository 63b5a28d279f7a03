//! The gateway through real HTTP on 127.0.0.1: routing, tokens, limits, schema,
//! CORS, caching, composition, weights, reloads, the admin API, and the attacks an
//! edge must turn away (forged tokens, smuggling, traversal, slow clients).

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use shoal::testing::{request, Answer};
use shoal::{RunningService, Service};
use shoal_auth::{KeyRing, SigningKey, TokenClaims};
use shoal_gateway::{GatewayConfig, RouteConfig};
use shoal_tests::{answers_ok, control_plane, eventually, gateway_with, temp_dir, Server};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISS: &str = "shoal-identity";
const AUD: &str = "shoal";

/// An upstream that answers every path with what it received, and counts calls.
fn echo(hits: Arc<AtomicUsize>) -> Router {
    Router::new()
        .fallback(
            |State(hits): State<Arc<AtomicUsize>>,
             method: Method,
             version: http::Version,
             uri: http::Uri,
             headers: HeaderMap,
             body: Bytes| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let mut res = axum::Json(serde_json::json!({
                    "method": method.as_str(),
                    "path": uri.path(),
                    "query": uri.query(),
                    "subject": h("x-shoal-subject"),
                    "scopes": h("x-shoal-scopes"),
                    "xff": h("x-forwarded-for"),
                    "real_ip": h("x-real-ip"),
                    "host": h("host"),
                    "body_len": body.len(),
                    "version": format!("{version:?}"),
                }))
                .into_response();
                if uri.path().ends_with("/private") {
                    res.headers_mut()
                        .insert("cache-control", http::HeaderValue::from_static("no-store"));
                }
                res
            },
        )
        .with_state(hits)
}

async fn start(name: &str, version: &str, registry: &str, routes: Router) -> RunningService {
    Service::new(name)
        .version(version)
        .routes(routes)
        .env([
            ("SHOAL_REGISTRY_URL", registry),
            ("SHOAL_DEREGISTER_GRACE_MS", "50"),
            ("SHOAL_TTL_MS", "3000"),
        ])
        .start()
        .await
        .expect("service starts")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Keys, their JWKS in a file, and the gateway's `[auth]` pointing at it.
struct Keys {
    ring: KeyRing,
    jwks: std::path::PathBuf,
}

impl Keys {
    fn new() -> Self {
        let ring = KeyRing::new(SigningKey::generate_es256("k1").unwrap());
        let jwks = temp_dir("jwks").join("jwks.json");
        let k = Self { ring, jwks };
        k.publish();
        k
    }

    fn publish(&self) {
        std::fs::write(&self.jwks, self.ring.jwks().to_string()).unwrap();
    }

    fn token(&self, sub: &str, scope: &str) -> String {
        self.ring
            .sign(&TokenClaims {
                sub: sub.into(),
                scope: scope.into(),
                iss: ISS.into(),
                aud: AUD.into(),
                iat: now(),
                exp: now() + 600,
            })
            .unwrap()
    }

    fn auth(&self) -> shoal_gateway::AuthConfig {
        toml::from_str(&format!(
            "issuer = \"{ISS}\"\naudience = \"{AUD}\"\njwks_file = \"{}\"\n",
            self.jwks.display()
        ))
        .unwrap()
    }
}

fn routes(text: &str) -> Vec<RouteConfig> {
    shoal_gateway::RoutesFile::parse(text, "test")
        .unwrap()
        .routes
}

struct Rig {
    _cp: Server,
    _echo: RunningService,
    gw: Server,
    hits: Arc<AtomicUsize>,
}

/// A control plane, the echo service `echo` and a gateway with `routes`.
async fn rig(table: &str, tune: impl FnOnce(&mut GatewayConfig)) -> Rig {
    let cp = control_plane().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let echo_svc = start("echo", "1.0.0", &cp.url(), echo(hits.clone())).await;
    let mut cfg = GatewayConfig {
        routes: routes(table),
        ..Default::default()
    };
    tune(&mut cfg);
    let gw = gateway_with(&cp.url(), cfg).await;
    assert!(answers_ok(gw.addr, "/health/ready", Duration::from_secs(10)).await);
    Rig {
        _cp: cp,
        _echo: echo_svc,
        gw,
        hits,
    }
}

async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    request(addr, method, path, headers, Bytes::from(body.to_string()))
        .await
        .expect("an answer")
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(addr, Method::GET, path, headers, "").await
}

fn code(a: &Answer) -> String {
    a.json()["error"]["code"].as_str().unwrap_or("").to_string()
}

/// Bytes written as they are on one connection; everything read until the server
/// closes or `limit` passes.
async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn routes_match_by_method_host_and_path_and_rewrite() {
    let r = rig(
        r#"
        [[routes]]
        prefix = "/api/echo"
        service = "echo"
        [[routes]]
        name = "stripped"
        prefix = "/api/strip"
        service = "echo"
        strip_prefix = true
        [[routes]]
        name = "item"
        path = "/api/items/{id}"
        methods = ["GET"]
        service = "echo"
        rewrite = "/v1/items/{id}/view"
        [[routes]]
        name = "hosted"
        prefix = "/api/echo"
        host = "shop.example"
        service = "echo"
        rewrite = "/hosted"
        "#,
        |_| {},
    )
    .await;
    let a = get(r.gw.addr, "/api/echo/x?y=1", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["path"], "/api/echo/x");
    assert_eq!(a.json()["query"], "y=1");
    assert_eq!(
        get(r.gw.addr, "/api/strip/a/b", &[]).await.json()["path"],
        "/a/b"
    );
    assert_eq!(
        get(r.gw.addr, "/api/items/i-7", &[]).await.json()["path"],
        "/v1/items/i-7/view"
    );
    let no = send(r.gw.addr, Method::DELETE, "/api/items/i-7", &[], "").await;
    assert_eq!(no.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(no.headers["allow"], "GET");
    let hosted = get(r.gw.addr, "/api/echo/x", &[("host", "Shop.Example:8080")]).await;
    assert_eq!(hosted.json()["path"], "/hosted/x");
    // The Host header picks among routes, never an upstream: an address in it goes
    // nowhere but the table's own services.
    let ssrf = get(r.gw.addr, "/api/echo/x", &[("host", "169.254.169.254")]).await;
    assert_eq!(ssrf.json()["path"], "/api/echo/x");
    assert_eq!(
        get(r.gw.addr, "/nowhere", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    // Encoded unreserved characters are the same path; the upstream gets one spelling.
    assert_eq!(
        get(r.gw.addr, "/api/%65cho/%7Ex", &[]).await.json()["path"],
        "/api/echo/~x"
    );
}

#[tokio::test]
async fn the_api_description_is_served_and_checked_at_start() {
    let dir = temp_dir("openapi");
    let doc = dir.join("openapi.json");
    std::fs::write(
        &doc,
        r#"{"openapi":"3.1.0","info":{"title":"shop","version":"1"},"paths":{}}"#,
    )
    .unwrap();
    let r = rig("", |c| c.openapi_file = Some(doc.clone())).await;
    let a = get(r.gw.addr, "/openapi.json", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["openapi"], "3.1.0");
    std::fs::write(&doc, r#"{"swagger":"2.0"}"#).unwrap();
    let cfg = GatewayConfig {
        openapi_file: Some(doc),
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("gateway.openapi_file") && e.contains("OpenAPI 3"),
        "{e}"
    );
}

#[tokio::test]
async fn traversal_encoded_separators_and_smuggling_are_refused() {
    let r = rig(
        "[[routes]]\nprefix = \"/api\"\nservice = \"echo\"\n",
        |_| {},
    )
    .await;
    let before = r.hits.load(Ordering::SeqCst);
    for path in [
        "/api/../admin/routes",
        "/api/%2e%2e/admin/routes",
        "/api/%2E%2E/admin/routes",
        "/api/.%2e/admin/routes",
        "/api/x%2fy",
        "/api/x%5cy",
        "/api//x",
        "/api/x\\y",
        "/api/%00",
    ] {
        let res = raw(
            r.gw.addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 400"), "{path}: {res}");
    }
    // Operators' paths spelled another way are not routes.
    let res = raw(
        r.gw.addr,
        b"GET /%61dmin/routes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 404"), "{res}");
    // Content-Length and Transfer-Encoding together: read by Transfer-Encoding
    // (Content-Length dropped), answered once, and the connection closed, so the
    // bytes after the chunked body are never read as a request of their own.
    let res = raw(
        r.gw.addr,
        b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(res.matches("HTTP/1.1 ").count(), 1, "{res}");
    assert!(res.contains("connection: close"), "{res}");
    assert!(!res.contains("smuggled"), "{res}");
    assert!(
        res.contains("\"body_len\":0"),
        "the upstream got the chunked body: {res}"
    );
    let smuggled_hits = r.hits.load(Ordering::SeqCst);
    assert_eq!(
        smuggled_hits,
        before + 1,
        "one request reached the upstream"
    );
    // Two different Content-Lengths.
    let res = raw(
        r.gw.addr,
        b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        Duration::from_secs(5),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert_eq!(
        r.hits.load(Ordering::SeqCst),
        before + 1,
        "nothing more reached the upstream"
    );
}

#[tokio::test]
async fn oversized_heads_and_bodies_and_slow_clients_are_cut_off() {
    let r = rig(
        r#"
        [[routes]]
        prefix = "/api"
        service = "echo"
        [[routes]]
        name = "small"
        prefix = "/small"
        service = "echo"
        body_limit_bytes = 10
        "#,
        |c| {
            c.server.header_read_timeout_ms = 300;
        },
    )
    .await;
    let big = "a".repeat(40 * 1024);
    let res = raw(
        r.gw.addr,
        format!("GET /api/x HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        res.starts_with("HTTP/1.1 431"),
        "{}",
        &res[..res.len().min(200)]
    );
    let a = send(
        r.gw.addr,
        Method::POST,
        "/small/x",
        &[],
        "more than ten bytes",
    )
    .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code(&a), "payload_too_large");
    // A client that never finishes its head is disconnected (well before 10 s;
    // the limit is 300 ms).
    let mut s = tokio::net::TcpStream::connect(r.gw.addr).await.unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the slow client was not cut off");
    // An idle keep-alive connection is closed too.
    let mut s = tokio::net::TcpStream::connect(r.gw.addr).await.unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the idle connection was not closed");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
}

const ORDER_SCHEMA: &str = r#"
        [routes.schema]
        type = "object"
        required = ["items", "card_number"]
        additionalProperties = false
        [routes.schema.properties.card_number]
        type = "string"
        pattern = "^[0-9]{16}$"
        [routes.schema.properties.items]
        type = "array"
        minItems = 1
        maxItems = 50
        [routes.schema.properties.items.items]
        type = "object"
        required = ["product_id", "quantity"]
        [routes.schema.properties.items.items.properties.product_id]
        type = "string"
        [routes.schema.properties.items.items.properties.quantity]
        type = "integer"
        minimum = 1
        maximum = 100
"#;

#[tokio::test]
async fn bodies_are_checked_against_the_route_schema() {
    let r = rig(
        &format!("[[routes]]\nname = \"orders\"\npath = \"/api/orders\"\nservice = \"echo\"\n{ORDER_SCHEMA}"),
        |_| {},
    )
    .await;
    let json = [("content-type", "application/json")];
    let post = |body: &'static str| send(r.gw.addr, Method::POST, "/api/orders", &json, body);
    let ok =
        post(r#"{"items":[{"product_id":"p-1","quantity":2}],"card_number":"4111111111111111"}"#)
            .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let bad =
        post(r#"{"items":[{"product_id":"p-1","quantity":0}],"card_number":"4111111111111111"}"#)
            .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(code(&bad), "validation_failed");
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/items/0/quantity"),
        "{}",
        bad.text()
    );
    let missing = post(r#"{"items":[{"product_id":"p-1","quantity":1}]}"#).await;
    assert_eq!(code(&missing), "validation_failed");
    assert!(missing.text().contains("card_number"), "{}", missing.text());
    let malformed = post(r#"{"items":["#).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(code(&malformed), "malformed_json");
    let text = send(
        r.gw.addr,
        Method::POST,
        "/api/orders",
        &[("content-type", "text/plain")],
        "{}",
    )
    .await;
    assert_eq!(text.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn tokens_are_checked_and_the_identity_reaches_the_service() {
    let keys = Keys::new();
    let auth = keys.auth();
    let r = rig(
        r#"
        [[routes]]
        prefix = "/api/me"
        service = "echo"
        auth = "required"
        [[routes]]
        prefix = "/api/orders"
        service = "echo"
        scopes = ["orders"]
        [[routes]]
        prefix = "/api/public"
        service = "echo"
        auth = "optional"
        "#,
        |c| c.auth = Some(auth),
    )
    .await;
    let bearer = |t: &str| format!("Bearer {t}");
    let good = keys.token("alice", "orders");
    let a = get(
        r.gw.addr,
        "/api/me",
        &[
            ("authorization", &bearer(&good)),
            ("x-shoal-subject", "admin"),
        ],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // The client's own identity header is replaced by the verified one.
    assert_eq!(a.json()["subject"], "alice");
    assert_eq!(a.json()["scopes"], "orders");
    let none = get(r.gw.addr, "/api/me", &[]).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(none.headers.contains_key("www-authenticate"));
    // A spoofed identity header without a token does not pass.
    let spoof = get(r.gw.addr, "/api/public", &[("x-shoal-subject", "admin")]).await;
    assert_eq!(spoof.json()["subject"], serde_json::Value::Null);
    assert_eq!(
        get(
            r.gw.addr,
            "/api/public",
            &[("authorization", "Bearer nonsense")]
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    let no_scope = keys.token("alice", "profile");
    let f = get(
        r.gw.addr,
        "/api/orders",
        &[("authorization", &bearer(&no_scope))],
    )
    .await;
    assert_eq!(f.status, StatusCode::FORBIDDEN);
    assert_eq!(code(&f), "insufficient_scope");

    // Forged tokens, each refused with 401.
    let parts: Vec<&str> = good.split('.').collect();
    let payload = parts[1];
    let b64 = |s: &str| b64url(s.as_bytes());
    let mut forged = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE"] {
        forged.push((
            format!("alg {alg}"),
            format!(
                "{}.{payload}.",
                b64(&format!(r#"{{"alg":"{alg}","kid":"k1","typ":"JWT"}}"#))
            ),
        ));
    }
    // HS256 "signed" with the public key's JWK text as the secret.
    let hs_header = b64(r#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#);
    let secret = keys.ring.jwks()["keys"][0].to_string();
    let mac = hmac_sha256(
        secret.as_bytes(),
        format!("{hs_header}.{payload}").as_bytes(),
    );
    forged.push((
        "HS256 with the public key".into(),
        format!("{hs_header}.{payload}.{}", b64url(&mac)),
    ));
    // ES256 with r = s = 0.
    forged.push((
        "r=s=0".into(),
        format!("{}.{payload}.{}", parts[0], b64url(&[0u8; 64])),
    ));
    // Claims changed after signing.
    let tampered = b64(&format!(
        r#"{{"sub":"admin","scope":"orders admin","iss":"{ISS}","aud":"{AUD}","iat":{},"exp":{}}}"#,
        now(),
        now() + 600
    ));
    forged.push((
        "tampered".into(),
        format!("{}.{tampered}.{}", parts[0], parts[2]),
    ));
    // A key the attacker controls, offered through jku and an embedded jwk.
    let attacker = KeyRing::new(SigningKey::generate_es256("k1").unwrap());
    let theirs = attacker
        .sign(&TokenClaims {
            sub: "admin".into(),
            scope: "orders".into(),
            iss: ISS.into(),
            aud: AUD.into(),
            iat: now(),
            exp: now() + 600,
        })
        .unwrap();
    let t: Vec<&str> = theirs.split('.').collect();
    let jku_header = b64(&format!(
        r#"{{"alg":"ES256","kid":"k1","jku":"http://127.0.0.1:1/jwks.json","jwk":{}}}"#,
        attacker.jwks()["keys"][0]
    ));
    forged.push((
        "attacker key via jku/jwk".into(),
        format!("{jku_header}.{}.{}", t[1], t[2]),
    ));
    forged.push(("attacker key".into(), theirs.clone()));
    let other = |iss: &str, aud: &str, exp: u64, kid_ring: &KeyRing| {
        kid_ring
            .sign(&TokenClaims {
                sub: "alice".into(),
                scope: "orders".into(),
                iss: iss.into(),
                aud: aud.into(),
                iat: now() - 7200,
                exp,
            })
            .unwrap()
    };
    forged.push((
        "wrong iss".into(),
        other("elsewhere", AUD, now() + 600, &keys.ring),
    ));
    forged.push((
        "wrong aud".into(),
        other(ISS, "another-api", now() + 600, &keys.ring),
    ));
    forged.push(("expired".into(), other(ISS, AUD, now() - 3600, &keys.ring)));
    let unknown = KeyRing::new(SigningKey::generate_es256("k-unknown").unwrap());
    forged.push(("unknown kid".into(), other(ISS, AUD, now() + 600, &unknown)));
    for (what, token) in forged {
        let a = get(
            r.gw.addr,
            "/api/orders",
            &[("authorization", &bearer(&token))],
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what}: {}", a.text());
    }
}

#[tokio::test]
async fn clients_over_their_rate_get_429_with_retry_after() {
    let r = rig(
        r#"
        [[routes]]
        prefix = "/api"
        service = "echo"
        rate_limit = { per_second = 1, burst = 3 }
        "#,
        |_| {},
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get(r.gw.addr, "/api/x", &[]).await);
    }
    let ok = statuses
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    // The burst of 3, and perhaps one more refilled while the test ran.
    assert!((3..=4).contains(&ok), "{ok}");
    let limited = statuses.last().unwrap();
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(code(limited), "rate_limited");
    let after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after >= 1);
}

#[tokio::test]
async fn address_rules_and_trusted_proxies() {
    let r = rig(
        r#"
        [[routes]]
        prefix = "/api/open"
        service = "echo"
        [[routes]]
        prefix = "/api/closed"
        service = "echo"
        ip = { deny = ["127.0.0.0/8"] }
        [[routes]]
        prefix = "/api/office"
        service = "echo"
        ip = { allow = ["10.1.0.0/16"] }
        "#,
        |c| c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()],
    )
    .await;
    assert_eq!(
        get(r.gw.addr, "/api/closed", &[]).await.status,
        StatusCode::FORBIDDEN
    );
    // From a trusted proxy (this test, on 127.0.0.1) the forwarded client counts.
    let office = get(r.gw.addr, "/api/office", &[("x-forwarded-for", "10.1.2.3")]).await;
    assert_eq!(office.status, StatusCode::OK);
    assert_eq!(office.json()["real_ip"], "10.1.2.3");
    assert_eq!(office.json()["xff"], "10.1.2.3, 127.0.0.1");
    assert_eq!(
        get(r.gw.addr, "/api/office", &[("x-forwarded-for", "10.9.9.9")])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // A chain ending in an untrusted hop: that hop is the client.
    let chain = get(
        r.gw.addr,
        "/api/office",
        &[("x-forwarded-for", "10.1.2.3, 192.0.2.1")],
    )
    .await;
    assert_eq!(chain.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_untrusted_peer_cannot_claim_another_address() {
    let r = rig(
        "[[routes]]\nprefix = \"/api/office\"\nservice = \"echo\"\nip = { allow = [\"10.1.0.0/16\"] }\n",
        |_| {},
    )
    .await;
    let a = get(r.gw.addr, "/api/office", &[("x-forwarded-for", "10.1.2.3")]).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn cors_preflight_and_answers() {
    let r = rig(
        r#"
        [[routes]]
        prefix = "/api"
        service = "echo"
        cors = { allow_origins = ["https://shop.example"], allow_methods = ["GET", "POST"], allow_headers = ["content-type", "authorization"] }
        "#,
        |_| {},
    )
    .await;
    let pre = send(
        r.gw.addr,
        Method::OPTIONS,
        "/api/x",
        &[
            ("origin", "https://shop.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ],
        "",
    )
    .await;
    assert!(pre.status.is_success(), "{}", pre.status);
    assert_eq!(
        pre.headers["access-control-allow-origin"],
        "https://shop.example"
    );
    let refused = send(
        r.gw.addr,
        Method::OPTIONS,
        "/api/x",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let a = get(r.gw.addr, "/api/x", &[("origin", "https://shop.example")]).await;
    assert_eq!(
        a.headers["access-control-allow-origin"],
        "https://shop.example"
    );
    let b = get(r.gw.addr, "/api/x", &[("origin", "https://evil.example")]).await;
    assert!(!b.headers.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn get_answers_are_cached_within_their_ttl() {
    let r = rig(
        r#"
        [[routes]]
        prefix = "/api"
        service = "echo"
        cache = { ttl_ms = 60000 }
        "#,
        |_| {},
    )
    .await;
    let first = get(r.gw.addr, "/api/products?page=1", &[]).await;
    assert_eq!(first.headers["x-shoal-cache"], "miss");
    let hits = r.hits.load(Ordering::SeqCst);
    let second = get(r.gw.addr, "/api/products?page=1", &[]).await;
    assert_eq!(second.headers["x-shoal-cache"], "hit");
    assert_eq!(second.body, first.body);
    assert_eq!(r.hits.load(Ordering::SeqCst), hits, "served from the cache");
    // Another query is another entry; no-store answers and signed-in requests bypass.
    get(r.gw.addr, "/api/products?page=2", &[]).await;
    assert_eq!(r.hits.load(Ordering::SeqCst), hits + 1);
    get(r.gw.addr, "/api/private", &[]).await;
    get(r.gw.addr, "/api/private", &[]).await;
    get(
        r.gw.addr,
        "/api/products?page=1",
        &[("authorization", "Bearer x")],
    )
    .await;
    assert_eq!(r.hits.load(Ordering::SeqCst), hits + 4);
}

#[tokio::test]
async fn an_aggregate_answers_with_what_came_back_and_names_what_did_not() {
    let cp = control_plane().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let _orders = start("orders", "1.0.0", &cp.url(), echo(hits.clone())).await;
    let customers = start("customers", "1.0.0", &cp.url(), echo(hits.clone())).await;
    let table = r#"
        [[routes]]
        name = "details"
        path = "/api/orders/{id}/details"
        [routes.aggregate]
        parts = [
            { name = "order", service = "orders", path = "/orders/{id}", timeout_ms = 2000, required = true },
            { name = "customer", service = "customers", path = "/customers/me", timeout_ms = 2000 },
            { name = "shipment", service = "shipping", path = "/shipments/by-order/{id}", timeout_ms = 300 },
        ]
    "#;
    let gw = gateway_with(
        &cp.url(),
        GatewayConfig {
            routes: routes(table),
            ..Default::default()
        },
    )
    .await;
    // Ready needs the required part's service only.
    assert!(answers_ok(gw.addr, "/health/ready", Duration::from_secs(10)).await);
    let a = get(gw.addr, "/api/orders/o%3F1/details", &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let j = a.json();
    assert_eq!(
        j["order"]["path"], "/orders/o%3F1",
        "a parameter stays one segment"
    );
    assert_eq!(j["customer"]["path"], "/customers/me");
    assert_eq!(j["shipment"], serde_json::Value::Null);
    assert_eq!(j["degraded"], serde_json::json!(["shipment"]));
    customers.shutdown().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(gw.addr, "/api/orders/o-1/details", &[]).await.json()["degraded"]
                == serde_json::json!(["customer", "shipment"])
        })
        .await
    );
}

#[tokio::test]
async fn weights_split_traffic_and_a_switch_drains_without_failures() {
    let cp = control_plane().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let _v1 = start("catalog", "1.0.0", &cp.url(), echo(hits.clone())).await;
    let _v2 = start("catalog", "2.0.0", &cp.url(), echo(hits.clone())).await;
    let table = r#"
        [[routes]]
        name = "catalog"
        prefix = "/api/products"
        service = "catalog"
        weights = { "1.0.0" = 100, "2.0.0" = 0 }
    "#;
    let gw = gateway_with(
        &cp.url(),
        GatewayConfig {
            routes: routes(table),
            ..Default::default()
        },
    )
    .await;
    assert!(answers_ok(gw.addr, "/health/ready", Duration::from_secs(10)).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let r = get(cp.addr, "/v1/services/catalog", &[]).await;
            r.status == StatusCode::OK && r.text().matches("\"healthy\":true").count() == 2
        })
        .await
    );
    let served_by = |a: &Answer| a.headers["x-shoal-served-by"].to_str().unwrap().to_string();
    for _ in 0..20 {
        assert_eq!(
            served_by(&get(gw.addr, "/api/products", &[]).await),
            "catalog@1.0.0"
        );
    }
    // Load runs while the weights move to 2.0.0: not one request fails.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let addr = gw.addr;
        tokio::spawn(async move {
            let (mut ok, mut failed, mut v2) = (0, 0, 0);
            while !stop.load(Ordering::SeqCst) && ok + failed < 5000 {
                let a = get(addr, "/api/products", &[]).await;
                if a.status == StatusCode::OK {
                    ok += 1;
                    if a.headers["x-shoal-served-by"] == "catalog@2.0.0" {
                        v2 += 1;
                    }
                } else {
                    failed += 1;
                }
            }
            (ok, failed, v2)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let put = send(
        gw.addr,
        Method::PUT,
        "/admin/routes/catalog/weights",
        &[],
        r#"{"1.0.0":0,"2.0.0":100}"#,
    )
    .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let (ok, failed, v2) = load.await.unwrap();
    assert_eq!(failed, 0);
    assert!(ok > 0 && v2 > 0, "ok={ok} v2={v2}");
    for _ in 0..20 {
        assert_eq!(
            served_by(&get(gw.addr, "/api/products", &[]).await),
            "catalog@2.0.0"
        );
    }
    let table = get(gw.addr, "/admin/routes", &[]).await.json();
    assert_eq!(
        table["routes"][0]["weights"],
        serde_json::json!({"1.0.0": 0, "2.0.0": 100})
    );
    for bad in [r#"{"1.0.0":0}"#, r#"{"1.0.0":-1}"#, r#"[1]"#, "{"] {
        let a = send(
            gw.addr,
            Method::PUT,
            "/admin/routes/catalog/weights",
            &[],
            bad,
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(
        send(
            gw.addr,
            Method::PUT,
            "/admin/routes/nope/weights",
            &[],
            r#"{"a":1}"#
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn the_routes_file_reloads_and_a_bad_one_keeps_the_old_table() {
    let dir = temp_dir("routes");
    let file = dir.join("routes.toml");
    std::fs::write(
        &file,
        "[[routes]]\nprefix = \"/api/a\"\nservice = \"echo\"\nlegacy = true\n",
    )
    .unwrap();
    let r = rig("", |c| {
        c.routes_file = Some(file.clone());
        c.reload_interval_ms = 50;
    })
    .await;
    assert_eq!(get(r.gw.addr, "/api/a", &[]).await.status, StatusCode::OK);
    assert_eq!(
        get(r.gw.addr, "/admin/routes", &[]).await.json()["routes"][0]["upstream"],
        "legacy"
    );
    std::fs::write(
        &file,
        "[[routes]]\nprefix = \"/api/b\"\nservice = \"echo\"\n",
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(r.gw.addr, "/api/b", &[]).await.status == StatusCode::OK
        })
        .await
    );
    assert_eq!(
        get(r.gw.addr, "/api/a", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    // A table that does not check: refused with the reason; the old one serves on.
    std::fs::write(
        &file,
        "[[routes]]\nprefix = \"/api/c\"\nservice = \"echo\"\ncolour = \"red\"\n",
    )
    .unwrap();
    let a = send(r.gw.addr, Method::POST, "/admin/routes/reload", &[], "").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.text().contains("colour"), "{}", a.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(r.gw.addr, "/api/b", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_admin_api_needs_an_allowed_address_and_the_admin_scope() {
    let keys = Keys::new();
    let auth = keys.auth();
    let r = rig("[[routes]]\nprefix = \"/api\"\nservice = \"echo\"\n", |c| {
        c.auth = Some(auth)
    })
    .await;
    assert_eq!(
        get(r.gw.addr, "/admin/routes", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let user = format!("Bearer {}", keys.token("alice", "orders"));
    assert_eq!(
        get(r.gw.addr, "/admin/routes", &[("authorization", &user)])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let admin = format!("Bearer {}", keys.token("admin", "admin"));
    assert_eq!(
        get(r.gw.addr, "/admin/routes", &[("authorization", &admin)])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(r.gw.addr, "/admin/breakers", &[("authorization", &admin)])
            .await
            .status,
        StatusCode::OK
    );

    let keys2 = Keys::new();
    let auth2 = keys2.auth();
    let far = rig("[[routes]]\nprefix = \"/api\"\nservice = \"echo\"\n", |c| {
        c.auth = Some(auth2);
        c.admin.allow = vec!["10.0.0.0/8".parse().unwrap()];
    })
    .await;
    let admin2 = format!("Bearer {}", keys2.token("admin", "admin"));
    assert_eq!(
        get(far.gw.addr, "/admin/routes", &[("authorization", &admin2)])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn http2_clients_are_served() {
    let r = rig(
        "[[routes]]\nprefix = \"/api\"\nservice = \"echo\"\n",
        |_| {},
    )
    .await;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let res = client
        .request(
            http::Request::get(format!("http://{}/api/h2", r.gw.addr))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), http::Version::HTTP_2);
    // Towards services: HTTP/1.1 by default, HTTP/2 by config.
    assert_eq!(
        get(r.gw.addr, "/api/v", &[]).await.json()["version"],
        "HTTP/1.1"
    );
    let h2 = rig("[[routes]]\nprefix = \"/api\"\nservice = \"echo\"\n", |c| {
        c.upstream.http2 = true
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            get(h2.gw.addr, "/api/v", &[]).await.json()["version"],
            "HTTP/2.0"
        );
    }
}

// --- small encoders for hand-made tokens -----------------------------------------

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&k, msg).as_ref().to_vec()
}

#[tokio::test]
async fn keys_come_from_the_identity_service_and_follow_its_rotation() {
    let cp = control_plane().await;
    let ring = Arc::new(std::sync::Mutex::new(KeyRing::new(
        SigningKey::generate_es256("k1").unwrap(),
    )));
    let fetches = Arc::new(AtomicUsize::new(0));
    let identity = Router::new()
        .route(
            "/.well-known/jwks.json",
            axum::routing::get(
                |State((ring, fetches)): State<(
                    Arc<std::sync::Mutex<KeyRing>>,
                    Arc<AtomicUsize>,
                )>| async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(ring.lock().unwrap().jwks())
                },
            ),
        )
        .with_state((ring.clone(), fetches.clone()));
    let _identity = start("identity", "1.0.0", &cp.url(), identity).await;
    let _echo = start("echo", "1.0.0", &cp.url(), echo(Arc::default())).await;
    let auth: shoal_gateway::AuthConfig = toml::from_str(&format!(
        "issuer = \"{ISS}\"\naudience = \"{AUD}\"\njwks_refresh_min_interval_ms = 1\njwks_max_age_ms = 200\n"
    ))
    .unwrap();
    let cfg = GatewayConfig {
        routes: routes("[[routes]]\nprefix = \"/api\"\nservice = \"echo\"\nauth = \"required\"\n"),
        auth: Some(auth),
        ..Default::default()
    };
    let gw = gateway_with(&cp.url(), cfg).await;
    assert!(answers_ok(gw.addr, "/health/ready", Duration::from_secs(10)).await);
    let sign = |kid_ring: &KeyRing, sub: &str| {
        kid_ring
            .sign(&TokenClaims {
                sub: sub.into(),
                scope: "s".into(),
                iss: ISS.into(),
                aud: AUD.into(),
                iat: now(),
                exp: now() + 600,
            })
            .unwrap()
    };
    let old = sign(&ring.lock().unwrap(), "alice");
    let a = get(
        gw.addr,
        "/api/x",
        &[("authorization", &format!("Bearer {old}"))],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    // Rotation: the new key signs; a token with its kid makes the gateway fetch the
    // keys again; the old key keeps verifying its tokens.
    ring.lock()
        .unwrap()
        .rotate(
            SigningKey::generate_es256("k2").unwrap(),
            SystemTime::now() + Duration::from_secs(600),
        )
        .unwrap();
    let new = sign(&ring.lock().unwrap(), "bob");
    assert!(new
        .split('.')
        .next()
        .is_some_and(|h| h != old.split('.').next().unwrap()));
    let b = get(
        gw.addr,
        "/api/x",
        &[("authorization", &format!("Bearer {new}"))],
    )
    .await;
    assert_eq!(b.status, StatusCode::OK, "{}", b.text());
    assert_eq!(b.json()["subject"], "bob");
    assert_eq!(
        get(
            gw.addr,
            "/api/x",
            &[("authorization", &format!("Bearer {old}"))]
        )
        .await
        .status,
        StatusCode::OK
    );
    // A revoked key stops verifying once the gateway's copy of the keys is renewed.
    ring.lock().unwrap().revoke("k1");
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(
                gw.addr,
                "/api/x",
                &[("authorization", &format!("Bearer {old}"))],
            )
            .await
            .status
                == StatusCode::UNAUTHORIZED
        })
        .await
    );
    assert_eq!(
        get(
            gw.addr,
            "/api/x",
            &[("authorization", &format!("Bearer {new}"))]
        )
        .await
        .status,
        StatusCode::OK
    );
    assert!(fetches.load(Ordering::SeqCst) >= 2);

    // No identity service and no keys yet: tokens cannot be checked, 503, not 401.
    let lost: shoal_gateway::AuthConfig = toml::from_str(&format!(
        "issuer = \"{ISS}\"\naudience = \"{AUD}\"\njwks_service = \"nobody\"\n"
    ))
    .unwrap();
    let gw2 = gateway_with(
        &cp.url(),
        GatewayConfig {
            routes: routes(
                "[[routes]]\nprefix = \"/api\"\nservice = \"echo\"\nauth = \"required\"\n",
            ),
            auth: Some(lost),
            ..Default::default()
        },
    )
    .await;
    assert!(answers_ok(gw2.addr, "/health/ready", Duration::from_secs(10)).await);
    let c = get(
        gw2.addr,
        "/api/x",
        &[("authorization", &format!("Bearer {new}"))],
    )
    .await;
    assert_eq!(c.status, StatusCode::SERVICE_UNAVAILABLE, "{}", c.text());
    assert_eq!(code(&c), "keys_unavailable");
}

//! The service over real HTTP, started alone (`shoal::testing`), each test on a
//! database of its own.

use super::*;
use axum::http::Method;
use base64::Engine as _;
use shoal::testing::contract::Contract;
use shoal::testing::{self, Answer, DataDir};
use shoal::RunningService;
use shoal_auth::{Claims, KeyRing, SigningKey, StaticJwks, TokenClaims, Verifier, VerifierConfig};

/// Cheap argon2 parameters: unoptimised test builds would take a second or more per
/// hash at the defaults. What is tested (argon2id, salts, checks) does not change.
const FAST_HASH: [(&str, &str); 2] = [
    ("SHOAL_SETTINGS__PASSWORD_HASH__MEMORY_KIB", "64"),
    ("SHOAL_SETTINGS__PASSWORD_HASH__ITERATIONS", "1"),
];

fn data_dir(test: &str) -> DataDir {
    DataDir::new(&format!("shop-identity-{test}"))
}

async fn start(dir: &std::path::Path, settings: &[(&str, &str)]) -> RunningService {
    let service = service().env(FAST_HASH).env(settings.iter().copied());
    testing::start_alone(service, dir).await.unwrap()
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    testing::request(addr, Method::POST, path, &all, body.to_string())
        .await
        .unwrap()
}

async fn login(addr: SocketAddr, user: &str, password: &str) -> Answer {
    login_from(addr, user, password, &[]).await
}

async fn login_from(
    addr: SocketAddr,
    user: &str,
    password: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let body = json!({"grant_type": "password", "username": user, "password": password});
    post(addr, "/auth/token", headers, &body.to_string()).await
}

/// The access token of a successful login.
async fn token_of(addr: SocketAddr, user: &str, password: &str) -> String {
    let a = login(addr, user, password).await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()["access_token"].as_str().unwrap().to_string()
}

async fn served_jwks(addr: SocketAddr) -> Value {
    let a = testing::get(addr, "/.well-known/jwks.json").await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()
}

/// Verify `token` the way the gateway does, against the JWKS `addr` serves now.
async fn verify_with(addr: SocketAddr, token: &str) -> Result<Claims, TokenError> {
    let doc = serde_json::to_vec(&served_jwks(addr).await).unwrap();
    let verifier = Verifier::new(
        VerifierConfig::new("shoal-shop", "shoal-shop"),
        Arc::new(StaticJwks(Bytes::from(doc))),
    );
    verifier.verify(token).await
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

/// The claims of a token, read without checking (to see every claim, `jti` too).
fn payload_of(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn jwks_kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status, status, "{}", a.text());
    assert!(
        a.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        a.headers
    );
    let v = a.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
}

#[tokio::test]
async fn password_grant_for_each_seed_user_verifies_against_the_jwks() {
    let dir = data_dir("password");
    let running = start(&dir, &[]).await;
    let addr = running.addr();

    let a = testing::get(addr, "/.well-known/jwks.json").await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["cache-control"], "public, max-age=60");
    let jwks = a.json();
    let key = &jwks["keys"][0];
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1, "{jwks}");
    assert_eq!(
        (&key["kty"], &key["crv"], &key["alg"]),
        (&json!("EC"), &json!("P-256"), &json!("ES256"))
    );
    assert!(key.get("d").is_none(), "a private part in the JWKS: {key}");

    let mut jtis = Vec::new();
    for (user, password, scope) in [
        ("alice", "alice-pass", "customer"),
        ("bob", "bob-pass", "customer"),
        ("admin", "admin-pass", "admin"),
    ] {
        let a = login(addr, user, password).await;
        assert_eq!(a.status, 200, "{user}: {}", a.text());
        assert_eq!(a.headers["cache-control"], "no-store");
        let v = a.json();
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 900);
        let token = v["access_token"].as_str().unwrap();
        assert_eq!(kid_of(token), key["kid"].as_str().unwrap());
        assert_eq!(
            jsonwebtoken::decode_header(token).unwrap().alg,
            jsonwebtoken::Algorithm::ES256
        );

        let claims = verify_with(addr, token).await.unwrap();
        assert_eq!(claims.sub, user);
        assert_eq!(claims.scopes, vec![scope.to_string()]);
        assert_eq!(claims.iss, "shoal-shop");
        assert_eq!(claims.aud, vec!["shoal-shop".to_string()]);
        assert_eq!(claims.exp - claims.iat, 900);
        assert_eq!(claims.has_scope("admin"), scope == "admin");

        let raw = payload_of(token);
        let jti = raw["jti"].as_str().unwrap().to_string();
        assert!(!jti.is_empty());
        jtis.push(jti);
    }
    jtis.sort();
    jtis.dedup();
    assert_eq!(jtis.len(), 3, "every token has its own jti");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_credentials_grant() {
    let dir = data_dir("client");
    let running = start(&dir, &[]).await;
    let addr = running.addr();
    let body = json!({"grant_type": "client_credentials", "client_id": "shop-operator", "client_secret": "operator-secret"});
    let a = post(addr, "/auth/token", &[], &body.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!(v["token_type"], "Bearer");
    let claims = verify_with(addr, v["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(claims.sub, "shop-operator");
    assert_eq!(claims.scopes, vec!["admin".to_string()]);

    // A wrong secret, and a user's password used as a client's: the same 401.
    for (id, secret) in [("shop-operator", "nope"), ("alice", "alice-pass")] {
        let body =
            json!({"grant_type": "client_credentials", "client_id": id, "client_secret": secret});
        let a = post(addr, "/auth/token", &[], &body.to_string()).await;
        assert_error(&a, 401, "invalid_grant");
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_401() {
    let dir = data_dir("same-401");
    let running = start(&dir, &[]).await;
    let addr = running.addr();
    let wrong = login(addr, "alice", "bob-pass").await;
    let unknown = login(addr, "mallory", "alice-pass").await;
    assert_error(&wrong, 401, "invalid_grant");
    assert_error(&unknown, 401, "invalid_grant");
    assert_eq!(wrong.body, unknown.body);
    assert_eq!(
        wrong.headers.get("content-type"),
        unknown.headers.get("content-type")
    );
    assert!(wrong.json()["access_token"].is_null());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_are_400_json_errors() {
    let dir = data_dir("malformed");
    let running = start(&dir, &[]).await;
    let addr = running.addr();
    let long_name = "a".repeat(129);
    let long_password = "p".repeat(1025);
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "validation_failed"),
        ("".into(), "validation_failed"),
        ("[]".into(), "validation_failed"),
        ("{}".into(), "validation_failed"),
        (r#"{"grant_type": 5}"#.into(), "validation_failed"),
        (
            r#"{"grant_type": "password", "username": 1, "password": "x"}"#.into(),
            "validation_failed",
        ),
        (
            r#"{"grant_type": "password", "username": "alice"}"#.into(),
            "validation_failed",
        ),
        (
            r#"{"grant_type": "password", "username": "", "password": "x"}"#.into(),
            "validation_failed",
        ),
        (
            r#"{"grant_type": "password", "username": "alice", "password": null}"#.into(),
            "validation_failed",
        ),
        (
            json!({"grant_type": "password", "username": long_name, "password": "x"}).to_string(),
            "validation_failed",
        ),
        (
            json!({"grant_type": "password", "username": "alice", "password": long_password})
                .to_string(),
            "validation_failed",
        ),
        (
            r#"{"grant_type": "client_credentials", "client_id": "shop-operator"}"#.into(),
            "validation_failed",
        ),
        (
            r#"{"grant_type": "authorization_code", "code": "x"}"#.into(),
            "unsupported_grant_type",
        ),
        (
            r#"{"grant_type": "PASSWORD", "username": "alice", "password": "alice-pass"}"#.into(),
            "unsupported_grant_type",
        ),
    ];
    for (body, code) in &cases {
        let a = post(addr, "/auth/token", &[], body).await;
        assert_error(&a, 400, code);
        assert!(!a.text().contains("alice-pass"));
    }
    // Not declared as JSON: refused before it is read.
    let a = testing::request(
        addr,
        Method::POST,
        "/auth/token",
        &[("content-type", "text/plain")],
        r#"{"grant_type":"password","username":"alice","password":"alice-pass"}"#,
    )
    .await
    .unwrap();
    assert_error(&a, 415, "unsupported_media_type");
    // A wrong method is a JSON error too.
    let a = testing::get(addr, "/auth/token").await.unwrap();
    assert_eq!(a.status, 405);
    assert!(a.json()["error"]["code"].is_string());
    // None of it counted as a failed login: alice is not locked.
    assert_eq!(login(addr, "alice", "alice-pass").await.status, 200);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn lockout_per_user_with_retry_after_and_the_right_password_refused() {
    let dir = data_dir("lock-user");
    let running = start(
        &dir,
        &[
            ("SHOAL_SETTINGS__LOGIN__MAX_FAILURES_PER_USER", "3"),
            ("SHOAL_SETTINGS__LOGIN__WINDOW_S", "60"),
        ],
    )
    .await;
    let addr = running.addr();
    for _ in 0..3 {
        assert_error(&login(addr, "alice", "guess").await, 401, "invalid_grant");
    }
    let a = login(addr, "alice", "alice-pass").await;
    assert_error(&a, 429, "too_many_attempts");
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    // Still locked, whatever is sent.
    assert_error(
        &login(addr, "alice", "guess").await,
        429,
        "too_many_attempts",
    );
    // Other users are not affected.
    assert_eq!(login(addr, "bob", "bob-pass").await.status, 200);
    // Unknown names are limited the same way: the limit does not tell who exists.
    for _ in 0..3 {
        assert_error(&login(addr, "mallory", "guess").await, 401, "invalid_grant");
    }
    assert_error(
        &login(addr, "mallory", "guess").await,
        429,
        "too_many_attempts",
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn lockout_per_source_address() {
    let dir = data_dir("lock-source");
    let running = start(
        &dir,
        &[
            ("SHOAL_SETTINGS__LOGIN__MAX_FAILURES_PER_USER", "100"),
            ("SHOAL_SETTINGS__LOGIN__MAX_FAILURES_PER_SOURCE", "3"),
        ],
    )
    .await;
    let addr = running.addr();
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    for user in ["alice", "bob", "nobody"] {
        let a = login_from(addr, user, "guess", &from("198.51.100.7")).await;
        assert_error(&a, 401, "invalid_grant");
    }
    // That source is locked, even for the right password of another account.
    let a = login_from(addr, "admin", "admin-pass", &from("198.51.100.7")).await;
    assert_error(&a, 429, "too_many_attempts");
    assert!(a.headers.contains_key("retry-after"));
    // The gateway appends the real address last; what a client put before it is not
    // trusted, so it cannot claim to be someone else...
    let a = login_from(
        addr,
        "admin",
        "admin-pass",
        &from("198.51.100.9, 198.51.100.7"),
    )
    .await;
    assert_error(&a, 429, "too_many_attempts");
    // ...nor escape by naming the locked address first.
    let a = login_from(
        addr,
        "admin",
        "admin-pass",
        &from("198.51.100.7, 198.51.100.8"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_successful_login_resets_the_users_counter() {
    let dir = data_dir("reset");
    let running = start(
        &dir,
        &[("SHOAL_SETTINGS__LOGIN__MAX_FAILURES_PER_USER", "3")],
    )
    .await;
    let addr = running.addr();
    for _ in 0..3 {
        for _ in 0..2 {
            assert_error(&login(addr, "bob", "guess").await, 401, "invalid_grant");
        }
        assert_eq!(login(addr, "bob", "bob-pass").await.status, 200);
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restart_keeps_the_signing_key() {
    let dir = data_dir("restart");
    let running = start(&dir, &[]).await;
    let token = token_of(running.addr(), "alice", "alice-pass").await;
    let kid = kid_of(&token);
    running.shutdown().await.unwrap();

    let running = start(&dir, &[]).await;
    let addr = running.addr();
    assert_eq!(jwks_kids(&served_jwks(addr).await), vec![kid.clone()]);
    let claims = verify_with(addr, &token).await.unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(kid_of(&token_of(addr, "bob", "bob-pass").await), kid);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn rotation_needs_an_admin_token_checked_by_the_service() {
    let dir = data_dir("rotate-auth");
    let running = start(&dir, &[]).await;
    let addr = running.addr();
    let rotate = |headers: Vec<(&'static str, String)>| async move {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        testing::request(
            addr,
            Method::POST,
            "/internal/keys/rotate",
            &headers,
            Vec::new(),
        )
        .await
        .unwrap()
    };
    let a = rotate(vec![]).await;
    assert_error(&a, 401, "missing");
    assert_eq!(a.headers["www-authenticate"], "Bearer");
    assert_error(
        &rotate(vec![("authorization", "Bearer nonsense".into())]).await,
        401,
        "malformed",
    );
    // Headers the gateway would set prove nothing here.
    let a = rotate(vec![
        ("x-shoal-subject", "admin".into()),
        ("x-shoal-scopes", "admin".into()),
    ])
    .await;
    assert_eq!(a.status, 401);

    // A well-formed admin token signed by a key that is not ours.
    let forged = KeyRing::new(
        SigningKey::generate_es256(kid_of(&token_of(addr, "bob", "bob-pass").await)).unwrap(),
    );
    let now = u64::try_from(now_ms() / 1000).unwrap();
    let forged = forged
        .sign(&TokenClaims {
            sub: "admin".into(),
            scope: "admin".into(),
            iss: "shoal-shop".into(),
            aud: "shoal-shop".into(),
            iat: now,
            exp: now + 60,
        })
        .unwrap();
    let a = rotate(vec![("authorization", format!("Bearer {forged}"))]).await;
    assert_error(&a, 401, "bad_signature");

    let customer = token_of(addr, "alice", "alice-pass").await;
    let a = rotate(vec![("authorization", format!("Bearer {customer}"))]).await;
    assert_error(&a, 403, "forbidden");
    assert_eq!(
        jwks_kids(&served_jwks(addr).await).len(),
        1,
        "nothing rotated"
    );

    let admin = token_of(addr, "admin", "admin-pass").await;
    let a = rotate(vec![("authorization", format!("Bearer {admin}"))]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    running.shutdown().await.unwrap();
}

async fn rotate_with(addr: SocketAddr, admin_token: &str) -> String {
    let auth = format!("Bearer {admin_token}");
    let a = testing::request(
        addr,
        Method::POST,
        "/internal/keys/rotate",
        &[("authorization", auth.as_str())],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()["kid"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn rotation_switches_the_signing_key_and_keeps_the_old_one_published() {
    let dir = data_dir("rotate");
    let running = start(&dir, &[]).await;
    let addr = running.addr();
    let old_token = token_of(addr, "alice", "alice-pass").await;
    let old_kid = kid_of(&old_token);
    let admin = token_of(addr, "admin", "admin-pass").await;

    let before = now_ms();
    let new_kid = rotate_with(addr, &admin).await;
    assert_ne!(new_kid, old_kid);
    let new_token = token_of(addr, "alice", "alice-pass").await;
    assert_eq!(kid_of(&new_token), new_kid);
    // The signing key first, then the old one, whose tokens are still valid.
    assert_eq!(
        jwks_kids(&served_jwks(addr).await),
        vec![new_kid.clone(), old_kid.clone()]
    );
    assert_eq!(verify_with(addr, &old_token).await.unwrap().sub, "alice");
    assert_eq!(verify_with(addr, &new_token).await.unwrap().sub, "alice");

    // The old key retires once its last token (900 s) and the margin (60 s) are over.
    let (retire,) = sqlx::query_as::<_, (Option<i64>,)>(
        "SELECT retire_after_ms FROM signing_keys WHERE kid = $1",
    )
    .bind(&old_kid)
    .fetch_one(running.ctx().db().pool())
    .await
    .unwrap();
    let retire = retire.unwrap();
    assert!(
        retire >= before + 960_000 && retire <= now_ms() + 960_000,
        "{retire}"
    );
    running.shutdown().await.unwrap();

    // Persisted: after a restart the new key signs and both are published.
    let running = start(&dir, &[]).await;
    let addr = running.addr();
    assert_eq!(kid_of(&token_of(addr, "bob", "bob-pass").await), new_kid);
    assert_eq!(jwks_kids(&served_jwks(addr).await), vec![new_kid, old_kid]);
    assert!(verify_with(addr, &old_token).await.is_ok());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn replicas_sharing_the_database_pick_up_each_others_rotations() {
    let dir = data_dir("replicas");
    // `a` rereads the keys on every request; `b` keeps the default 5 s.
    let a = start(&dir, &[("SHOAL_SETTINGS__KEY_RELOAD_MS", "0")]).await;
    let b = start(&dir, &[]).await;
    let first = kid_of(&token_of(b.addr(), "bob", "bob-pass").await);
    assert_eq!(kid_of(&token_of(a.addr(), "bob", "bob-pass").await), first);

    // Rotated on `a`: a token from `a` names a kid `b` has not loaded yet; `b` rereads
    // on the miss and accepts it.
    let admin_a = token_of(a.addr(), "admin", "admin-pass").await;
    let second = rotate_with(a.addr(), &admin_a).await;
    let admin_a = token_of(a.addr(), "admin", "admin-pass").await;
    assert_eq!(kid_of(&admin_a), second);
    let third = rotate_with(b.addr(), &admin_a).await;
    assert_eq!(kid_of(&token_of(b.addr(), "bob", "bob-pass").await), third);
    let published = jwks_kids(&served_jwks(b.addr()).await);
    assert_eq!(published[0], third, "the signing key first");
    assert_eq!(
        sorted(published),
        sorted(vec![first.clone(), second.clone(), third.clone()])
    );

    // `a` sees `b`'s rotation on its next reread.
    assert_eq!(kid_of(&token_of(a.addr(), "bob", "bob-pass").await), third);
    let published = jwks_kids(&served_jwks(a.addr()).await);
    assert_eq!(published[0], third);
    assert_eq!(sorted(published), sorted(vec![first, second, third]));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_database_holds_argon2id_hashes_not_passwords() {
    let dir = data_dir("hashes");
    let running = start(&dir, &[]).await;
    // The seeds are made at start, once.
    assert_eq!(
        login(running.addr(), "alice", "alice-pass").await.status,
        200
    );
    let pool = running.ctx().db().pool().clone();
    let mut rows =
        sqlx::query_as::<_, (String, String)>("SELECT username, password_hash FROM users")
            .fetch_all(&pool)
            .await
            .unwrap();
    rows.extend(
        sqlx::query_as::<_, (String, String)>("SELECT client_id, secret_hash FROM clients")
            .fetch_all(&pool)
            .await
            .unwrap(),
    );
    assert_eq!(rows.len(), 4);
    let mut hashes = Vec::new();
    for (name, hash) in &rows {
        assert!(hash.starts_with("$argon2id$v=19$"), "{name}: {hash}");
        for (_, secret, _) in SEED_USERS.iter().chain(SEED_CLIENTS) {
            assert!(!hash.contains(secret), "{name}");
        }
        hashes.push(hash.clone());
    }
    // Salted: no two hashes alike.
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), 4);
    running.shutdown().await.unwrap();

    // Seeds are made once: a restart does not hash them again.
    let running = start(&dir, &[]).await;
    assert_eq!(
        login(running.addr(), "alice", "alice-pass").await.status,
        200
    );
    let again: Vec<(String,)> = sqlx::query_as("SELECT password_hash FROM users")
        .fetch_all(running.ctx().db().pool())
        .await
        .unwrap();
    assert!(again.iter().all(|(h,)| rows.iter().any(|(_, r)| r == h)));
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn default_cost_hashes_verify() {
    let s = Settings::default();
    let p = Passwords::new(s.password_hash.params().unwrap(), 2)
        .await
        .unwrap();
    let hash = p.hash("alice-pass".into()).await.unwrap();
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    assert!(p
        .verify("alice-pass".into(), Some(hash.clone()))
        .await
        .unwrap());
    assert!(!p.verify("alice-pas".into(), Some(hash)).await.unwrap());
    assert!(!p.verify("alice-pass".into(), None).await.unwrap());
}

#[tokio::test]
async fn settings_are_read_and_checked_at_start() {
    let dir = data_dir("settings");
    let running = start(
        &dir,
        &[
            ("SHOAL_SETTINGS__TOKEN_TTL_S", "300"),
            ("SHOAL_SETTINGS__ISSUER", "https://id.example"),
        ],
    )
    .await;
    let a = login(running.addr(), "bob", "bob-pass").await;
    assert_eq!(a.json()["expires_in"], 300);
    let claims = payload_of(a.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["iss"], "https://id.example");
    assert_eq!(claims["aud"], "shoal-shop");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300
    );
    running.shutdown().await.unwrap();

    for bad in [
        ("SHOAL_SETTINGS__TOKEN_TTL_S", "0"),
        ("SHOAL_SETTINGS__LOGIN__WINDOW_S", "0"),
        ("SHOAL_SETTINGS__PASSWORD_HASH__MEMORY_KIB", "1"),
        ("SHOAL_SETTINGS__NO_SUCH_KEY", "1"),
        ("SHOAL_SETTINGS__LOGIN__MAX_FAILURES", "1"),
    ] {
        let dir = data_dir("settings-bad");
        // Alone: a FAST_HASH value of the same key would hide the bad one.
        let started = testing::start_alone(service().env([bad]), &dir).await;
        let err = started
            .err()
            .unwrap_or_else(|| panic!("{bad:?} was accepted"));
        assert!(err.to_string().contains("settings"), "{bad:?}: {err}");
    }
}

#[tokio::test]
async fn keeps_its_contract_with_the_gateway() {
    let dir = data_dir("contract");
    let running = start(&dir, &[]).await;
    Contract::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contracts/gateway--identity.json"
    ))
    .verify(running.addr(), |_state| async {})
    .await
    .unwrap();
    running.shutdown().await.unwrap();
}

/// The same service on its own PostgreSQL database: the SQL is portable.
#[tokio::test]
async fn runs_unchanged_on_postgres() {
    let dir = data_dir("postgres");
    let url = shoal_testkit::postgres::fresh_database().await;
    let db = [("SHOAL_DATABASE__URL", url.as_str())];
    let running = start(&dir, &db).await;
    assert_eq!(running.ctx().db().backend(), shoal::Backend::Postgres);
    let addr = running.addr();
    let token = token_of(addr, "alice", "alice-pass").await;
    assert_error(&login(addr, "alice", "nope").await, 401, "invalid_grant");
    let body = json!({"grant_type": "client_credentials", "client_id": "shop-operator", "client_secret": "operator-secret"});
    let operator = post(addr, "/auth/token", &[], &body.to_string()).await;
    assert_eq!(operator.status, 200, "{}", operator.text());
    let operator = operator.json()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let new_kid = rotate_with(addr, &operator).await;
    running.shutdown().await.unwrap();

    let running = start(&dir, &db).await;
    let addr = running.addr();
    assert_eq!(kid_of(&token_of(addr, "bob", "bob-pass").await), new_kid);
    assert_eq!(verify_with(addr, &token).await.unwrap().sub, "alice");
    assert_eq!(jwks_kids(&served_jwks(addr).await).len(), 2);
    running.shutdown().await.unwrap();
}

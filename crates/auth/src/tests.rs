//! Tests of the verifier and the key ring, one or more per rule in docs/tokens.md.
//! Tokens an honest issuer would never make are written out by hand here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use jsonwebtoken::EncodingKey;
use serde_json::{json, Value};

use crate::jwks::parse_jwks;
use crate::{b64url_decode, b64url_encode, unix_now_s};
use crate::{
    Algorithm, FetchFuture, FileJwks, JwksSource, KeyRing, SigningKey, StaticJwks, TokenClaims,
    TokenError, Verifier, VerifierConfig,
};

const ISS: &str = "https://id.test";
const AUD: &str = "shop";

fn es(kid: &str) -> SigningKey {
    SigningKey::generate_es256(kid).unwrap()
}

fn ed(kid: &str) -> SigningKey {
    SigningKey::generate_ed25519(kid).unwrap()
}

fn token_claims() -> TokenClaims {
    let now = unix_now_s();
    TokenClaims {
        sub: "user-1".into(),
        scope: "orders:read orders:write".into(),
        iss: ISS.into(),
        aud: AUD.into(),
        iat: now,
        exp: now + 300,
    }
}

fn payload() -> Value {
    serde_json::to_value(token_claims()).unwrap()
}

/// `payload()` with some claims replaced (`null` removes one).
fn payload_with(changes: Value) -> Value {
    let mut p = payload();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            p.as_object_mut().unwrap().remove(k);
        } else {
            p[k] = v.clone();
        }
    }
    p
}

fn header(key: &SigningKey) -> Value {
    json!({"alg": key.algorithm().as_str(), "kid": key.kid(), "typ": "JWT"})
}

fn b64(text: &str) -> String {
    b64url_encode(text.as_bytes())
}

/// A token over exactly these header and payload texts, signed by `key`.
fn sign_text(key: &SigningKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header), b64(payload));
    let encoding = match key.algorithm() {
        Algorithm::Es256 => EncodingKey::from_ec_der(key.to_pkcs8_der()),
        Algorithm::EdDsa => EncodingKey::from_ed_der(key.to_pkcs8_der()),
    };
    let sig =
        jsonwebtoken::crypto::sign(input.as_bytes(), &encoding, key.algorithm().jwt()).unwrap();
    format!("{input}.{sig}")
}

fn sign(key: &SigningKey, header: &Value, payload: &Value) -> String {
    sign_text(key, &header.to_string(), &payload.to_string())
}

fn good_token(key: &SigningKey) -> String {
    sign(key, &header(key), &payload())
}

fn jwks_of(keys: &[&SigningKey]) -> Bytes {
    let keys: Vec<Value> = keys.iter().map(|k| k.public_jwk()).collect();
    Bytes::from(json!({ "keys": keys }).to_string())
}

fn cfg() -> VerifierConfig {
    VerifierConfig::new(ISS, AUD)
}

fn verifier_for(keys: &[&SigningKey]) -> Verifier {
    Verifier::new(cfg(), Arc::new(StaticJwks(jwks_of(keys))))
}

/// A JWKS source whose document can be changed, that counts its fetches and can be
/// slow or failing.
struct CountingSource {
    doc: Mutex<Result<Bytes, String>>,
    fetches: AtomicUsize,
    delay: Duration,
}

impl CountingSource {
    fn new(doc: Bytes) -> Arc<Self> {
        Self::slow(doc, Duration::ZERO)
    }

    fn slow(doc: Bytes, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            doc: Mutex::new(Ok(doc)),
            fetches: AtomicUsize::new(0),
            delay,
        })
    }

    fn failing() -> Arc<Self> {
        let s = Self::new(Bytes::new());
        s.fail();
        s
    }

    fn set(&self, doc: Bytes) {
        *self.doc.lock().unwrap() = Ok(doc);
    }

    fn fail(&self) {
        *self.doc.lock().unwrap() = Err("identity service down".into());
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl JwksSource for CountingSource {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let doc = self.doc.lock().unwrap().clone();
            doc.map_err(shoal_core::Error::unavailable)
        })
    }
}

/// A JWKS source that serves a key ring's current JWKS, as an identity service would.
struct RingSource(Arc<Mutex<KeyRing>>);

impl JwksSource for RingSource {
    fn fetch(&self) -> FetchFuture<'_> {
        let doc = self.0.lock().unwrap().jwks().to_string();
        Box::pin(async move { Ok(Bytes::from(doc)) })
    }
}

/// Let spawned tasks (a background refresh) run to completion under paused time.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

// --- the happy paths -------------------------------------------------------------

#[tokio::test]
async fn es256_token_from_key_ring_verifies() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let ring = KeyRing::new(key);
    let claims = v
        .verify(&ring.sign(&token_claims()).unwrap())
        .await
        .unwrap();
    assert_eq!(claims.sub, "user-1");
    assert_eq!(claims.iss, ISS);
    assert_eq!(claims.aud, vec![AUD.to_string()]);
    assert_eq!(claims.scopes, vec!["orders:read", "orders:write"]);
    assert!(claims.has_scope("orders:write"));
    assert!(!claims.has_scope("orders"));
}

#[tokio::test]
async fn eddsa_token_verifies() {
    let key = ed("e1");
    let v = verifier_for(&[&key]);
    let token = KeyRing::new(key).sign(&token_claims()).unwrap();
    assert_eq!(v.verify(&token).await.unwrap().sub, "user-1");
}

#[tokio::test]
async fn verify_bearer_reads_the_authorization_header() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let token = good_token(&key);
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let h = HeaderValue::from_str(&format!("{scheme} {token}")).unwrap();
        assert!(v.verify_bearer(Some(&h)).await.is_ok(), "{scheme}");
    }
    assert_eq!(
        v.verify_bearer(None).await.unwrap_err(),
        TokenError::Missing
    );
    for bad in [
        format!("Basic {token}"),
        "Bearer".to_string(),
        "Bearer   ".to_string(),
        format!("Bearer {token} extra"),
        format!("Bearer{token}"),
    ] {
        let h = HeaderValue::from_str(&bad).unwrap();
        assert_eq!(
            v.verify_bearer(Some(&h)).await.unwrap_err(),
            TokenError::Malformed,
            "{bad}"
        );
    }
}

// --- algorithm pinning -----------------------------------------------------------

#[tokio::test]
async fn alg_none_is_refused_in_every_spelling() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let p = b64(&payload().to_string());
    for alg in ["none", "None", "NONE", "nOnE"] {
        for h in [
            json!({"alg": alg, "kid": "k1", "typ": "JWT"}),
            json!({"alg": alg}),
        ] {
            let h = b64(&h.to_string());
            for sig in ["", "AAAA"] {
                let token = format!("{h}.{p}.{sig}");
                assert_eq!(
                    v.verify(&token).await.unwrap_err(),
                    TokenError::UnsupportedAlgorithm,
                    "{token}"
                );
            }
        }
    }
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let jwk = key.public_jwk();
    let x = b64url_decode(jwk["x"].as_str().unwrap()).unwrap();
    let y = b64url_decode(jwk["y"].as_str().unwrap()).unwrap();
    let point = [&[4u8][..], &x, &y].concat();
    let jwk_text = jwk.to_string();
    // Every form in which a verifier might hold the public key, used as HMAC secret.
    for secret in [
        &point[..],
        &x[..],
        jwk_text.as_bytes(),
        &jwks_of(&[&key])[..],
    ] {
        for alg in ["HS256", "HS384", "HS512"] {
            let input = format!(
                "{}.{}",
                b64(&json!({"alg": alg, "kid": "k1", "typ": "JWT"}).to_string()),
                b64(&payload().to_string())
            );
            let hmac_alg = match alg {
                "HS256" => ring::hmac::HMAC_SHA256,
                "HS384" => ring::hmac::HMAC_SHA384,
                _ => ring::hmac::HMAC_SHA512,
            };
            let tag = ring::hmac::sign(&ring::hmac::Key::new(hmac_alg, secret), input.as_bytes());
            let token = format!("{input}.{}", b64url_encode(tag.as_ref()));
            assert_eq!(
                v.verify(&token).await.unwrap_err(),
                TokenError::UnsupportedAlgorithm
            );
        }
    }
}

#[tokio::test]
async fn rs256_header_on_an_ec_key_is_refused() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let good = good_token(&key);
    let sig = good.rsplit('.').next().unwrap();
    let token = format!(
        "{}.{}.{sig}",
        b64(&json!({"alg": "RS256", "kid": "k1"}).to_string()),
        b64(&payload().to_string())
    );
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        TokenError::UnsupportedAlgorithm
    );
    for alg in ["ES384", "PS256", "es256", "ES256 ", "eddsa"] {
        let token = format!(
            "{}.{}.{sig}",
            b64(&json!({"alg": alg, "kid": "k1"}).to_string()),
            b64(&payload().to_string())
        );
        assert_eq!(
            v.verify(&token).await.unwrap_err(),
            TokenError::UnsupportedAlgorithm,
            "{alg}"
        );
    }
}

#[tokio::test]
async fn header_alg_must_be_the_algorithm_of_the_named_key() {
    let ec = es("ec");
    let edk = ed("ed");
    let v = verifier_for(&[&ec, &edk]);
    // Signed by the Ed25519 key with a header naming the EC key.
    let token = sign(&edk, &json!({"alg": "EdDSA", "kid": "ec"}), &payload());
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        TokenError::UnsupportedAlgorithm
    );
    let token = sign(&ec, &json!({"alg": "ES256", "kid": "ed"}), &payload());
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        TokenError::UnsupportedAlgorithm
    );
}

#[tokio::test]
async fn jku_jwk_x5u_x5c_are_ignored() {
    let key = es("k1");
    let evil = es("evil");
    let source = CountingSource::new(jwks_of(&[&key]));
    let v = Verifier::new(cfg(), source.clone());
    v.verify(&good_token(&key)).await.unwrap();
    let extras = json!({
        "jku": "http://127.0.0.1:9/jwks.json",
        "x5u": "http://127.0.0.1:9/cert.pem",
        "jwk": evil.public_jwk(),
        "x5c": ["MIIBszCCAVmgAwIBAgIUZ"],
    });
    for kid in ["evil", "k1"] {
        let mut h = json!({"alg": "ES256", "kid": kid});
        for (k, val) in extras.as_object().unwrap() {
            h[k] = val.clone();
        }
        let token = sign(&evil, &h, &payload());
        let expected = if kid == "evil" {
            TokenError::UnknownKey
        } else {
            TokenError::BadSignature
        };
        assert_eq!(v.verify(&token).await.unwrap_err(), expected, "kid {kid}");
    }
    // The only fetches are ours: the first load and one for the unknown kid.
    assert_eq!(source.fetches(), 2);
}

// --- signatures ------------------------------------------------------------------

#[tokio::test]
async fn es256_signature_of_zeros_is_refused() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let token = format!(
        "{}.{}.{}",
        b64(&header(&key).to_string()),
        b64(&payload().to_string()),
        b64url_encode(&[0u8; 64])
    );
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        TokenError::BadSignature
    );
}

#[tokio::test]
async fn tampered_tokens_are_refused() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let token = good_token(&key);
    let parts: Vec<&str> = token.split('.').collect();
    let flip = |s: &str, at: usize| {
        let mut b = s.as_bytes().to_vec();
        b[at] = if b[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).unwrap()
    };
    let payload = flip(parts[1], parts[1].len() / 2);
    let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert_eq!(
        v.verify(&tampered).await.unwrap_err(),
        TokenError::BadSignature
    );
    let sig = flip(parts[2], 3);
    let tampered = format!("{}.{}.{sig}", parts[0], parts[1]);
    assert_eq!(
        v.verify(&tampered).await.unwrap_err(),
        TokenError::BadSignature
    );
    // Claims re-signed by someone else under our kid.
    let other = es("k1");
    assert_eq!(
        v.verify(&good_token(&other)).await.unwrap_err(),
        TokenError::BadSignature
    );
    // The untouched token still verifies: the failures above are the tampering.
    assert!(v.verify(&token).await.is_ok());
}

// --- claims ----------------------------------------------------------------------

async fn check(changes: Value) -> Result<crate::Claims, TokenError> {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    v.verify(&sign(&key, &header(&key), &payload_with(changes)))
        .await
}

#[tokio::test]
async fn wrong_issuer_is_refused() {
    let e = check(json!({"iss": "https://id.evil"})).await.unwrap_err();
    assert_eq!(e, TokenError::WrongIssuer);
    let e = check(json!({"iss": "https://id.test/"})).await.unwrap_err();
    assert_eq!(e, TokenError::WrongIssuer);
}

#[tokio::test]
async fn wrong_audience_is_refused() {
    assert_eq!(
        check(json!({"aud": "billing"})).await.unwrap_err(),
        TokenError::WrongAudience
    );
    assert_eq!(
        check(json!({"aud": ["billing", "crm"]})).await.unwrap_err(),
        TokenError::WrongAudience
    );
    assert_eq!(
        check(json!({"aud": []})).await.unwrap_err(),
        TokenError::WrongAudience
    );
    let ok = check(json!({"aud": ["billing", AUD]})).await.unwrap();
    assert_eq!(ok.aud, vec!["billing".to_string(), AUD.to_string()]);
}

#[tokio::test]
async fn expiry_is_enforced_with_leeway() {
    let now = unix_now_s();
    assert_eq!(
        check(json!({"exp": now - 31})).await.unwrap_err(),
        TokenError::Expired
    );
    assert_eq!(
        check(json!({"exp": now - 3600})).await.unwrap_err(),
        TokenError::Expired
    );
    // Within the 30 s leeway.
    assert!(check(json!({"exp": now - 10})).await.is_ok());
    // A fractional NumericDate.
    assert!(check(json!({"exp": now as f64 + 60.5})).await.is_ok());
}

#[tokio::test]
async fn not_before_is_enforced_with_leeway() {
    let now = unix_now_s();
    assert_eq!(
        check(json!({"nbf": now + 120})).await.unwrap_err(),
        TokenError::NotYetValid
    );
    assert!(check(json!({"nbf": now + 10})).await.is_ok());
    assert!(check(json!({"nbf": now - 10})).await.is_ok());
}

#[tokio::test]
async fn required_claims_must_be_present() {
    for claim in ["exp", "iat", "iss", "aud", "sub"] {
        assert_eq!(
            check(json!({ claim: null })).await.unwrap_err(),
            TokenError::MissingClaim(claim)
        );
    }
    assert_eq!(
        check(json!({"sub": ""})).await.unwrap_err(),
        TokenError::MissingClaim("sub")
    );
    // No scope is no scopes, not an error.
    let c = check(json!({"scope": null})).await.unwrap();
    assert!(c.scopes.is_empty());
}

#[tokio::test]
async fn claims_of_the_wrong_type_are_malformed() {
    for changes in [
        json!({"exp": "tomorrow"}),
        json!({"exp": -5}),
        json!({"sub": 42}),
        json!({"aud": [1, 2]}),
        json!({"scope": ["a", "b"]}),
    ] {
        assert_eq!(
            check(changes.clone()).await.unwrap_err(),
            TokenError::Malformed,
            "{changes}"
        );
    }
}

#[tokio::test]
async fn duplicated_header_fields_and_claims_are_malformed() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let p = payload().to_string();
    let h = r#"{"alg":"ES256","kid":"k1","alg":"ES256"}"#;
    assert_eq!(
        v.verify(&sign_text(&key, h, &p)).await.unwrap_err(),
        TokenError::Malformed
    );
    let dup_sub = p.replacen('{', r#"{"sub":"admin","#, 1);
    assert_eq!(
        v.verify(&sign_text(&key, &header(&key).to_string(), &dup_sub))
            .await
            .unwrap_err(),
        TokenError::Malformed
    );
}

#[tokio::test]
async fn claims_as_a_json_array_are_malformed() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let now = unix_now_s();
    // Field by field in RawClaims order: sub, scope, exp, nbf, iat, iss, aud.
    let p = format!(
        r#"["user-1","admin",{},null,{now},"{ISS}","{AUD}"]"#,
        now + 300
    );
    let token = sign_text(&key, &header(&key).to_string(), &p);
    assert_eq!(v.verify(&token).await.unwrap_err(), TokenError::Malformed);
}

// --- shape and size --------------------------------------------------------------

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let good = good_token(&key);
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        String::new(),
        "abc".to_string(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.x.y"),
        format!("{good}."),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        format!("{}.{}.{}!", parts[0], parts[1], parts[2]),
        // An array that serde alone would read as the header struct, field by field.
        format!(
            "{}.{}.{}",
            b64(r#"["ES256","k1",null]"#),
            parts[1],
            parts[2]
        ),
        format!("{}.{}.{}", b64("not json"), parts[1], parts[2]),
        format!("{}.{}.{}", b64(r#"{"kid":"k1"}"#), parts[1], parts[2]),
    ];
    for token in cases {
        assert_eq!(
            v.verify(&token).await.unwrap_err(),
            TokenError::Malformed,
            "{token}"
        );
    }
    // `crit` asks for extensions we do not implement.
    let token = sign(
        &key,
        &json!({"alg": "ES256", "kid": "k1", "crit": ["b64"], "b64": false}),
        &payload(),
    );
    assert_eq!(v.verify(&token).await.unwrap_err(), TokenError::Malformed);
}

#[tokio::test]
async fn token_without_kid_is_an_unknown_key() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let token = sign(&key, &json!({"alg": "ES256", "typ": "JWT"}), &payload());
    assert_eq!(v.verify(&token).await.unwrap_err(), TokenError::UnknownKey);
}

#[tokio::test]
async fn tokens_over_8_kib_are_refused() {
    let key = es("k1");
    let v = verifier_for(&[&key]);
    let big = sign(
        &key,
        &header(&key),
        &payload_with(json!({"pad": "x".repeat(6200)})),
    );
    assert!(big.len() > 8 * 1024);
    assert_eq!(v.verify(&big).await.unwrap_err(), TokenError::Malformed);
    let h = HeaderValue::from_str(&format!("Bearer {big}")).unwrap();
    assert_eq!(
        v.verify_bearer(Some(&h)).await.unwrap_err(),
        TokenError::Malformed
    );
    // Just under the limit is fine: the limit is the size, not the content.
    let fits = sign(
        &key,
        &header(&key),
        &payload_with(json!({"pad": "x".repeat(5600)})),
    );
    assert!(fits.len() <= 8 * 1024, "{}", fits.len());
    assert!(v.verify(&fits).await.is_ok());
}

// --- the JWKS document -----------------------------------------------------------

#[test]
fn jwks_limits_are_enforced() {
    let keys: Vec<SigningKey> = (0..65).map(|i| es(&format!("k{i}"))).collect();
    let refs: Vec<&SigningKey> = keys.iter().collect();
    assert!(parse_jwks(&jwks_of(&refs[..64])).is_ok());
    assert!(parse_jwks(&jwks_of(&refs)).is_err());

    let mut doc = json!({"keys": [keys[0].public_jwk()]});
    doc["padding"] = json!("x".repeat(256 * 1024));
    assert!(parse_jwks(doc.to_string().as_bytes()).is_err());

    assert!(parse_jwks(b"[]").is_err());
    assert!(parse_jwks(b"{}").is_err());
    assert!(parse_jwks(br#"{"keys":[]}"#).is_ok());
}

#[test]
fn jwks_skips_keys_not_for_us_and_refuses_duplicate_kids() {
    let ec = es("ec");
    let mut wrong_alg = ed("ed").public_jwk();
    wrong_alg["alg"] = json!("ES256");
    let mut enc = es("enc").public_jwk();
    enc["use"] = json!("enc");
    let mut short = es("short").public_jwk();
    short["x"] = json!("AAAA");
    let doc = json!({"keys": [
        ec.public_jwk(),
        {"kty": "RSA", "kid": "rsa", "n": "sXch", "e": "AQAB", "alg": "RS256"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        wrong_alg,
        enc,
        short,
        {"kty": "EC", "crv": "P-256", "x": 5},
        "not even an object",
    ]});
    let set = parse_jwks(doc.to_string().as_bytes()).unwrap();
    assert_eq!(set.len(), 1);
    assert!(set.get("ec").is_some());

    let dup = json!({"keys": [ec.public_jwk(), es("ec").public_jwk()]});
    assert!(parse_jwks(dup.to_string().as_bytes()).is_err());
}

#[tokio::test]
async fn oversized_jwks_means_keys_unavailable() {
    let keys: Vec<SigningKey> = (0..65).map(|i| es(&format!("k{i}"))).collect();
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let v = verifier_for(&refs);
    assert_eq!(
        v.verify(&good_token(&keys[0])).await.unwrap_err(),
        TokenError::KeysUnavailable
    );
}

// --- fetching and caching keys ---------------------------------------------------

#[tokio::test(start_paused = true)]
async fn unknown_kid_refetches_at_most_once_per_interval() {
    let k1 = es("k1");
    let k2 = es("k2");
    let source = CountingSource::new(jwks_of(&[&k1]));
    let v = Verifier::new(cfg(), source.clone());
    let t1 = good_token(&k1);
    let t2 = good_token(&k2);

    v.verify(&t1).await.unwrap();
    assert_eq!(source.fetches(), 1);
    // Unknown kid: one refetch, then still unknown.
    assert_eq!(v.verify(&t2).await.unwrap_err(), TokenError::UnknownKey);
    assert_eq!(source.fetches(), 2);
    // Within the interval: no fetch, however many tokens ask.
    for _ in 0..50 {
        assert_eq!(v.verify(&t2).await.unwrap_err(), TokenError::UnknownKey);
    }
    tokio::time::advance(Duration::from_millis(9_990)).await;
    assert_eq!(v.verify(&t2).await.unwrap_err(), TokenError::UnknownKey);
    assert_eq!(source.fetches(), 2);
    // The issuer publishes k2; once the interval has passed the refetch finds it.
    source.set(jwks_of(&[&k1, &k2]));
    tokio::time::advance(Duration::from_millis(10)).await;
    assert_eq!(v.verify(&t2).await.unwrap().sub, "user-1");
    assert_eq!(source.fetches(), 3);
    // Known kids never cause a fetch.
    v.verify(&t1).await.unwrap();
    v.verify(&t2).await.unwrap();
    assert_eq!(source.fetches(), 3);
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_share_one_fetch() {
    let k1 = es("k1");
    let k2 = es("k2");
    let source = CountingSource::slow(jwks_of(&[&k1]), Duration::from_millis(200));
    let v = Verifier::new(cfg(), source.clone());

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (v, t) = (v.clone(), good_token(&k1));
        tasks.spawn(async move { v.verify(&t).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap().is_ok());
    }
    assert_eq!(source.fetches(), 1, "first load");

    let t2 = good_token(&k2);
    for _ in 0..32 {
        let (v, t) = (v.clone(), t2.clone());
        tasks.spawn(async move { v.verify(&t).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap_err(), TokenError::UnknownKey);
    }
    assert_eq!(source.fetches(), 2, "one fetch for 32 unknown-kid requests");
}

#[tokio::test(start_paused = true)]
async fn waiters_do_not_fetch_again_even_without_a_rate_limit() {
    let k1 = es("k1");
    let k2 = es("k2");
    let source = CountingSource::slow(jwks_of(&[&k1]), Duration::from_millis(200));
    let mut cfg = cfg();
    cfg.jwks_refresh_min_interval_ms = 0;
    let v = Verifier::new(cfg, source.clone());
    v.verify(&good_token(&k1)).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (v, t) = (v.clone(), good_token(&k2));
        tasks.spawn(async move { v.verify(&t).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap().unwrap_err(), TokenError::UnknownKey);
    }
    // One fetch for the 16 that were waiting together (the tasks start at once).
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_request_does_not_cancel_the_fetch() {
    let k1 = es("k1");
    let source = CountingSource::slow(jwks_of(&[&k1]), Duration::from_millis(200));
    let v = Verifier::new(cfg(), source.clone());
    let t1 = good_token(&k1);
    // The client goes away while the keys are being fetched.
    let dropped = tokio::time::timeout(Duration::from_millis(50), v.verify(&t1)).await;
    assert!(dropped.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The fetch finished anyway and its keys serve the next request.
    v.verify(&t1).await.unwrap();
    assert_eq!(source.fetches(), 1);
}

#[tokio::test(start_paused = true)]
async fn keys_are_refetched_after_max_age() {
    let k1 = es("k1");
    let source = CountingSource::new(jwks_of(&[&k1]));
    let v = Verifier::new(cfg(), source.clone());
    let t1 = good_token(&k1);
    v.verify(&t1).await.unwrap();
    tokio::time::advance(Duration::from_millis(299_000)).await;
    v.verify(&t1).await.unwrap();
    settle().await;
    assert_eq!(source.fetches(), 1);
    tokio::time::advance(Duration::from_millis(1_000)).await;
    // Stale keys serve this request while the refetch runs.
    v.verify(&t1).await.unwrap();
    settle().await;
    assert_eq!(source.fetches(), 2);
    v.verify(&t1).await.unwrap();
    settle().await;
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn no_keys_at_all_is_keys_unavailable_and_retries_are_spaced() {
    let k1 = es("k1");
    let source = CountingSource::failing();
    let v = Verifier::new(cfg(), source.clone());
    let t1 = good_token(&k1);
    assert_eq!(
        v.verify(&t1).await.unwrap_err(),
        TokenError::KeysUnavailable
    );
    assert_eq!(
        v.verify(&t1).await.unwrap_err(),
        TokenError::KeysUnavailable
    );
    assert_eq!(source.fetches(), 1, "no retry before the interval");
    assert_eq!(
        TokenError::KeysUnavailable.status(),
        http::StatusCode::SERVICE_UNAVAILABLE
    );

    source.set(jwks_of(&[&k1]));
    tokio::time::advance(Duration::from_millis(10_000)).await;
    v.verify(&t1).await.unwrap();
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn cached_keys_survive_a_failing_source() {
    let k1 = es("k1");
    let source = CountingSource::new(jwks_of(&[&k1]));
    let v = Verifier::new(cfg(), source.clone());
    let t1 = good_token(&k1);
    v.verify(&t1).await.unwrap();

    source.fail();
    tokio::time::advance(Duration::from_millis(300_000)).await;
    v.verify(&t1).await.unwrap();
    settle().await;
    assert_eq!(source.fetches(), 2, "stale refetch tried and failed");
    v.verify(&t1).await.unwrap();
    // Right after a failure even an unknown kid does not fetch.
    assert_eq!(
        v.verify(&good_token(&es("k2"))).await.unwrap_err(),
        TokenError::UnknownKey
    );
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn file_jwks_is_reread_on_each_fetch() {
    let k1 = es("k1");
    let k2 = es("k2");
    let path = std::env::temp_dir().join(format!(
        "shoal-auth-jwks-{}-{}.json",
        std::process::id(),
        unix_now_s()
    ));
    std::fs::write(&path, jwks_of(&[&k1])).unwrap();
    let source = FileJwks(path.clone());
    let set = parse_jwks(&source.fetch().await.unwrap()).unwrap();
    assert!(set.get("k1").is_some() && set.get("k2").is_none());

    std::fs::write(&path, jwks_of(&[&k2])).unwrap();
    let set = parse_jwks(&source.fetch().await.unwrap()).unwrap();
    assert!(set.get("k1").is_none() && set.get("k2").is_some());

    std::fs::write(&path, vec![b' '; 256 * 1024 + 1]).unwrap();
    assert!(source.fetch().await.is_err());
    std::fs::remove_file(&path).unwrap();
    assert!(source.fetch().await.is_err());
}

// --- signing side: rotation and revocation ---------------------------------------

#[tokio::test(start_paused = true)]
async fn rotation_keeps_old_tokens_valid_until_revoked() {
    let ring = Arc::new(Mutex::new(KeyRing::new(es("k1"))));
    let v = Verifier::new(cfg(), Arc::new(RingSource(ring.clone())));
    let old = ring.lock().unwrap().sign(&token_claims()).unwrap();
    v.verify(&old).await.unwrap();

    let retire_after = SystemTime::now() + Duration::from_secs(3600);
    ring.lock().unwrap().rotate(es("k2"), retire_after).unwrap();
    let new = ring.lock().unwrap().sign(&token_claims()).unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&new).unwrap().kid.as_deref(),
        Some("k2")
    );
    assert_eq!(ring.lock().unwrap().current_kid(), Some("k2"));
    // The new kid is fetched on sight; the old key is still listed.
    v.verify(&new).await.unwrap();
    v.verify(&old).await.unwrap();
    let listed: Vec<String> = ring.lock().unwrap().jwks()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ["k2", "k1"]);

    ring.lock().unwrap().revoke("k1");
    // A verifier that fetches now refuses the old key's tokens at once...
    let fresh = Verifier::new(cfg(), Arc::new(RingSource(ring.clone())));
    assert_eq!(
        fresh.verify(&old).await.unwrap_err(),
        TokenError::UnknownKey
    );
    fresh.verify(&new).await.unwrap();
    // ...and one with the old JWKS cached does once its cache is older than max age.
    tokio::time::advance(Duration::from_millis(300_000)).await;
    let _ = v.verify(&old).await;
    settle().await;
    assert_eq!(v.verify(&old).await.unwrap_err(), TokenError::UnknownKey);
    v.verify(&new).await.unwrap();
}

#[test]
fn retired_keys_leave_the_jwks() {
    let mut ring = KeyRing::new(es("k1"));
    ring.rotate(es("k2"), SystemTime::now() - Duration::from_secs(1))
        .unwrap();
    let keys = ring.jwks()["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], "k2");
    // Public parts only.
    assert!(keys[0].get("d").is_none());
    assert_eq!(keys[0]["use"], "sig");
    assert_eq!(keys[0]["alg"], "ES256");
}

#[test]
fn rotate_refuses_a_kid_already_in_the_ring() {
    let mut ring = KeyRing::new(es("k1"));
    let later = SystemTime::now() + Duration::from_secs(3600);
    ring.rotate(es("k2"), later).unwrap();
    assert!(ring.rotate(es("k1"), later).is_err());
    assert!(ring.rotate(es("k2"), later).is_err());
    assert_eq!(ring.current_kid(), Some("k2"));
}

#[test]
fn revoking_the_current_key_stops_signing() {
    let mut ring = KeyRing::new(es("k1"));
    ring.revoke("k1");
    assert!(ring.sign(&token_claims()).is_err());
    assert_eq!(ring.jwks()["keys"].as_array().unwrap().len(), 0);
    ring.rotate(es("k2"), SystemTime::now()).unwrap();
    assert!(ring.sign(&token_claims()).is_ok());
}

#[tokio::test]
async fn signing_keys_round_trip_through_pem_and_der() {
    for key in [es("k1"), ed("k1")] {
        let pem = key.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let from_pem = SigningKey::from_pkcs8_pem("k1", &pem).unwrap();
        let from_der = SigningKey::from_pkcs8_der("k1", key.to_pkcs8_der()).unwrap();
        assert_eq!(from_pem.algorithm(), key.algorithm());
        assert_eq!(from_pem.public_jwk(), key.public_jwk());
        assert_eq!(from_der.public_jwk(), key.public_jwk());
        // A token from the reloaded key verifies against the original's JWK.
        let v = verifier_for(&[&key]);
        let token = KeyRing::new(from_pem).sign(&token_claims()).unwrap();
        assert!(v.verify(&token).await.is_ok());
        assert!(!format!("{key:?}").contains(&pem[28..60]));
    }
    assert!(SigningKey::from_pkcs8_der("k", b"not a key").is_err());
    assert!(SigningKey::from_pkcs8_pem("k", "-----BEGIN EC PRIVATE KEY-----").is_err());
    assert!(SigningKey::generate_es256("").is_err());
}

// --- errors and config -----------------------------------------------------------

#[test]
fn error_codes_are_stable_distinct_snake_case() {
    let all = [
        TokenError::Missing,
        TokenError::Malformed,
        TokenError::UnsupportedAlgorithm,
        TokenError::UnknownKey,
        TokenError::BadSignature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::WrongIssuer,
        TokenError::WrongAudience,
        TokenError::MissingClaim("exp"),
        TokenError::KeysUnavailable,
    ];
    let codes: std::collections::HashSet<&str> = all.iter().map(TokenError::code).collect();
    assert_eq!(codes.len(), all.len());
    for e in &all {
        assert!(e.code().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        assert!(!e.message().is_empty());
        let api: shoal_core::ApiError = e.clone().into();
        assert_eq!(api.code, e.code());
        let expected = if *e == TokenError::KeysUnavailable {
            503
        } else {
            401
        };
        assert_eq!(api.status.as_u16(), expected);
    }
    assert_eq!(TokenError::UnknownKey.code(), "unknown_key");
}

#[test]
fn config_has_defaults_and_refuses_unknown_keys() {
    let c: VerifierConfig =
        serde_json::from_value(json!({"issuer": ISS, "audience": AUD})).unwrap();
    assert_eq!(c.leeway_s, 30);
    assert_eq!(c.jwks_refresh_min_interval_ms, 10_000);
    assert_eq!(c.jwks_max_age_ms, 300_000);
    assert!(c.validate().is_ok());
    let typo = serde_json::from_value::<VerifierConfig>(
        json!({"issuer": ISS, "audience": AUD, "leeway": 5}),
    );
    assert!(typo.is_err());
    assert!(VerifierConfig::new("", AUD).validate().is_err());
    let mut c = cfg();
    c.leeway_s = 3600;
    assert!(c.validate().is_err());
}

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;
use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use shoal_core::{Error, ErrorKind, Origin};

use crate::{b64url_decode, Algorithm, MAX_JWKS_BYTES, MAX_JWKS_KEYS};

/// The future a [`JwksSource`] returns: the JWKS document's bytes.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, Error>> + Send + 'a>>;

/// Where the JWKS comes from. The gateway implements it over HTTP through service
/// discovery; [`StaticJwks`] and [`FileJwks`] serve tests and fixed deployments.
///
/// A fetch should bound its own time; the verifier also gives up after 10 s.
pub trait JwksSource: Send + Sync + 'static {
    /// The current JWKS document (`{"keys":[...]}`), as JSON bytes.
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Bytes, Error>> + Send + '_>>;
}

/// A JWKS fixed at construction.
pub struct StaticJwks(pub Bytes);

impl JwksSource for StaticJwks {
    fn fetch(&self) -> FetchFuture<'_> {
        let doc = self.0.clone();
        Box::pin(async move { Ok(doc) })
    }
}

/// A JWKS read from a file on every fetch, so replacing the file rotates keys.
pub struct FileJwks(pub PathBuf);

impl JwksSource for FileJwks {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            use tokio::io::AsyncReadExt as _;
            let file = tokio::fs::File::open(&self.0).await.map_err(|e| {
                Error::from(e).with_message_prefix(&format!("opening JWKS {}", self.0.display()))
            })?;
            // Read one byte past the limit to tell "at the limit" from "over it" without
            // trusting the file's reported length.
            let mut doc = Vec::new();
            file.take(MAX_JWKS_BYTES as u64 + 1)
                .read_to_end(&mut doc)
                .await
                .map_err(|e| {
                    Error::from(e)
                        .with_message_prefix(&format!("reading JWKS {}", self.0.display()))
                })?;
            if doc.len() > MAX_JWKS_BYTES {
                return Err(too_large());
            }
            Ok(Bytes::from(doc))
        })
    }
}

trait WithPrefix {
    fn with_message_prefix(self, prefix: &str) -> Self;
}

impl WithPrefix for Error {
    fn with_message_prefix(self, prefix: &str) -> Self {
        let retryable = self.is_retryable();
        Error::new(self.kind(), self.origin(), prefix)
            .with_retryable(retryable)
            .with_source(self)
    }
}

fn too_large() -> Error {
    Error::new(
        ErrorKind::Protocol,
        Origin::Upstream,
        format!("JWKS document is over {MAX_JWKS_BYTES} bytes"),
    )
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Protocol, Origin::Upstream, message)
}

/// A public key a token can be checked with, and the one algorithm it checks.
pub(crate) struct VerifyKey {
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

/// The usable keys of one JWKS document, by `kid`.
#[derive(Default)]
pub(crate) struct KeySet {
    keys: HashMap<String, VerifyKey>,
}

impl KeySet {
    pub(crate) fn get(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.get(kid)
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

/// The fields of a JWK that matter here. Everything else (`n`, `e`, `x5c`, `d`...) is
/// ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
}

/// Parse a JWKS document.
///
/// The document as a whole must be bounded (256 KiB, 64 keys) and must not list a
/// `kid` twice (which key would check a token would be a guess). Single keys that are
/// not for us (RSA, encryption keys, no `kid`, an `alg` that contradicts the curve)
/// are skipped, so an issuer can publish keys for other consumers beside ours.
pub(crate) fn parse_jwks(doc: &[u8]) -> Result<KeySet, Error> {
    if doc.len() > MAX_JWKS_BYTES {
        return Err(too_large());
    }
    let raw: RawJwks = serde_json::from_slice(doc)
        .map_err(|e| invalid("JWKS document is not {\"keys\":[...]}").with_source(e))?;
    if raw.keys.len() > MAX_JWKS_KEYS {
        return Err(invalid(format!(
            "JWKS document has {} keys, at most {MAX_JWKS_KEYS} are accepted",
            raw.keys.len()
        )));
    }
    let mut set = KeySet::default();
    for value in raw.keys {
        let jwk = match RawJwk::deserialize(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                tracing::debug!(error = %e, "JWK skipped: unreadable");
                continue;
            }
        };
        match verify_key(jwk) {
            Ok((kid, key)) => {
                if set.keys.insert(kid.clone(), key).is_some() {
                    return Err(invalid(format!("JWKS document lists kid {kid:?} twice")));
                }
            }
            Err(why) => tracing::debug!(why, "JWK skipped"),
        }
    }
    Ok(set)
}

fn verify_key(jwk: RawJwk) -> Result<(String, VerifyKey), &'static str> {
    let kid = jwk.kid.filter(|k| !k.is_empty()).ok_or("no kid")?;
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err("not a signature key");
    }
    if let Some(ops) = &jwk.key_ops {
        if !ops.iter().any(|op| op == "verify") {
            return Err("key_ops does not allow verify");
        }
    }
    // The key type decides the algorithm; a JWK's `alg` may only confirm it.
    let alg = match (jwk.kty.as_deref(), jwk.crv.as_deref()) {
        (Some("EC"), Some("P-256")) => Algorithm::Es256,
        (Some("OKP"), Some("Ed25519")) => Algorithm::EdDsa,
        _ => return Err("unsupported key type or curve"),
    };
    if let Some(named) = &jwk.alg {
        if Algorithm::from_name(named) != Some(alg) {
            return Err("alg does not match the key type");
        }
    }
    let x = jwk.x.ok_or("no x")?;
    if b64url_decode(&x).map(|b| b.len()) != Some(32) {
        return Err("x is not 32 bytes of base64url");
    }
    let key = match alg {
        Algorithm::Es256 => {
            let y = jwk.y.ok_or("no y")?;
            if b64url_decode(&y).map(|b| b.len()) != Some(32) {
                return Err("y is not 32 bytes of base64url");
            }
            // Whether (x, y) lies on the curve is checked by ring on every verify.
            DecodingKey::from_ec_components(&x, &y).map_err(|_| "bad EC components")?
        }
        Algorithm::EdDsa => DecodingKey::from_ed_components(&x).map_err(|_| "bad Ed25519 x")?,
    };
    Ok((kid, VerifyKey { alg, key }))
}

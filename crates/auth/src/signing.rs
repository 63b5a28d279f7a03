use std::time::SystemTime;

use base64::Engine as _;
use jsonwebtoken::EncodingKey;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use shoal_core::{Error, ErrorKind, Origin};

use crate::{b64url_encode, Algorithm, TokenClaims, MAX_JWKS_KEYS};

/// Longest `kid` accepted: it is copied into every token header.
const MAX_KID_BYTES: usize = 128;

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// A private key that signs tokens: its `kid`, its algorithm and its PKCS#8 document.
///
/// Store it with [`to_pkcs8_pem`](Self::to_pkcs8_pem) (or DER) and load it back with
/// [`from_pkcs8_pem`](Self::from_pkcs8_pem); the `kid` is kept beside it by the caller
/// (a file name, a config key), since PKCS#8 has no place for it.
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    pkcs8: Vec<u8>,
    /// ES256: the uncompressed point `04 || x || y`; EdDSA: the 32-byte key.
    public: Vec<u8>,
}

impl SigningKey {
    /// A new random P-256 key for ES256.
    pub fn generate_es256(kid: impl Into<String>) -> Result<Self, Error> {
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng())
            .map_err(|_| Error::internal("generating a P-256 key failed"))?;
        Self::from_pkcs8_der(kid, doc.as_ref())
    }

    /// A new random Ed25519 key for EdDSA.
    pub fn generate_ed25519(kid: impl Into<String>) -> Result<Self, Error> {
        let doc = Ed25519KeyPair::generate_pkcs8(&rng())
            .map_err(|_| Error::internal("generating an Ed25519 key failed"))?;
        Self::from_pkcs8_der(kid, doc.as_ref())
    }

    /// A key from a PKCS#8 DER document: P-256 (ES256) or Ed25519 (EdDSA, PKCS#8 v1 or
    /// v2), told apart by the document itself.
    pub fn from_pkcs8_der(kid: impl Into<String>, der: &[u8]) -> Result<Self, Error> {
        let kid = kid.into();
        if kid.is_empty() || kid.len() > MAX_KID_BYTES {
            return Err(Error::config(format!(
                "a signing key's kid must be 1 to {MAX_KID_BYTES} bytes"
            )));
        }
        if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng()) {
            return Ok(Self {
                kid,
                alg: Algorithm::Es256,
                pkcs8: der.to_vec(),
                public: pair.public_key().as_ref().to_vec(),
            });
        }
        if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Ok(Self {
                kid,
                alg: Algorithm::EdDsa,
                pkcs8: der.to_vec(),
                public: pair.public_key().as_ref().to_vec(),
            });
        }
        Err(Error::config(format!(
            "signing key {kid:?} is not a PKCS#8 P-256 or Ed25519 private key"
        )))
    }

    /// A key from a PEM `PRIVATE KEY` block (PKCS#8, as `openssl genpkey` writes).
    pub fn from_pkcs8_pem(kid: impl Into<String>, pem: &str) -> Result<Self, Error> {
        let not_pem = || {
            Error::config(
                "expected a PEM `PRIVATE KEY` (PKCS#8) block; convert an `EC PRIVATE KEY` \
                 with `openssl pkcs8 -topk8 -nocrypt`",
            )
        };
        let start = pem.find(PEM_BEGIN).ok_or_else(not_pem)? + PEM_BEGIN.len();
        let len = pem[start..].find(PEM_END).ok_or_else(not_pem)?;
        let body: String = pem[start..start + len]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| not_pem().with_source(e))?;
        Self::from_pkcs8_der(kid, &der)
    }

    /// The PKCS#8 DER document. Secret: store it like a password.
    pub fn to_pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The PKCS#8 document as a PEM `PRIVATE KEY` block. Secret: store it like a password.
    pub fn to_pkcs8_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.pkcs8);
        let mut pem = String::with_capacity(b64.len() + 80);
        pem.push_str(PEM_BEGIN);
        pem.push('\n');
        // RFC 7468: 64 characters a line. Base64 is ASCII, so byte chunks are chars.
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str(PEM_END);
        pem.push('\n');
        pem
    }

    /// The key's id, sent as `kid` in every token it signs.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm the key signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The public half as a JWK, with `kid`, `alg` and `use: "sig"`.
    pub fn public_jwk(&self) -> Value {
        match self.alg {
            Algorithm::Es256 => json!({
                "kty": "EC",
                "crv": "P-256",
                "x": b64url_encode(self.public.get(1..33).unwrap_or_default()),
                "y": b64url_encode(self.public.get(33..65).unwrap_or_default()),
                "kid": self.kid,
                "alg": self.alg.as_str(),
                "use": "sig",
            }),
            Algorithm::EdDsa => json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": b64url_encode(&self.public),
                "kid": self.kid,
                "alg": self.alg.as_str(),
                "use": "sig",
            }),
        }
    }

    fn sign(&self, claims: &TokenClaims) -> Result<String, Error> {
        let mut header = jsonwebtoken::Header::new(self.alg.jwt());
        header.kid = Some(self.kid.clone());
        let key = match self.alg {
            Algorithm::Es256 => EncodingKey::from_ec_der(&self.pkcs8),
            Algorithm::EdDsa => EncodingKey::from_ed_der(&self.pkcs8),
        };
        jsonwebtoken::encode(&header, claims, &key)
            .map_err(|e| Error::internal("signing a token failed").with_source(e))
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key: Debug output ends up in logs.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

fn rng() -> SystemRandom {
    SystemRandom::new()
}

/// The keys of an issuer: the current one signs, retired ones stay published until the
/// last token they signed has expired.
///
/// The key ring lives in memory; the identity service stores each key (PEM) and its
/// retirement time, and builds the ring again at start.
#[derive(Debug)]
pub struct KeyRing {
    /// `None` once the current key was revoked: nothing signs until the next rotation.
    current: Option<SigningKey>,
    retiring: Vec<Retiring>,
}

#[derive(Debug)]
struct Retiring {
    key: SigningKey,
    retire_after: SystemTime,
}

impl KeyRing {
    /// A ring whose only key is `current`.
    pub fn new(current: SigningKey) -> Self {
        Self {
            current: Some(current),
            retiring: Vec::new(),
        }
    }

    /// Make `next` the signing key from now on. The key it replaces stays in
    /// [`jwks`](Self::jwks) until `retire_after`: set that to the last expiry it may
    /// have signed (now plus the longest token lifetime, plus the verifiers' leeway).
    ///
    /// Fails, changing nothing, when `next`'s kid is already in the ring (a verifier
    /// could not tell the two apart), or when the ring would publish more than the 64
    /// keys a verifier accepts. Keys already past retirement are dropped first.
    pub fn rotate(&mut self, next: SigningKey, retire_after: SystemTime) -> Result<(), Error> {
        let now = SystemTime::now();
        self.retiring.retain(|r| r.retire_after > now);
        if self.kids().any(|kid| kid == next.kid) {
            return Err(Error::new(
                ErrorKind::Conflict,
                Origin::Internal,
                format!("kid {:?} is already in the key ring", next.kid),
            ));
        }
        if self.retiring.len() + usize::from(self.current.is_some()) + 1 > MAX_JWKS_KEYS {
            return Err(Error::new(
                ErrorKind::Overloaded,
                Origin::Internal,
                format!("the key ring would publish over {MAX_JWKS_KEYS} keys"),
            ));
        }
        if let Some(key) = self.current.replace(next) {
            self.retiring.push(Retiring { key, retire_after });
        }
        Ok(())
    }

    /// Drop the key `kid` from [`jwks`](Self::jwks) at once (it leaked, say). Verifiers
    /// stop accepting its tokens when they next fetch the JWKS, within their
    /// `jwks_max_age_ms`. Revoking the current key leaves the ring unable to sign until
    /// [`rotate`](Self::rotate) brings in a new one.
    pub fn revoke(&mut self, kid: &str) {
        self.retiring.retain(|r| r.key.kid != kid);
        if self.current.as_ref().is_some_and(|k| k.kid == kid) {
            self.current = None;
        }
    }

    /// Sign `claims` with the current key; the header carries its `kid` and `alg`.
    pub fn sign(&self, claims: &TokenClaims) -> Result<String, Error> {
        self.current
            .as_ref()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unavailable,
                    Origin::Internal,
                    "the current signing key was revoked; rotate in a new one",
                )
                .with_retryable(false)
            })?
            .sign(claims)
    }

    /// The kid that signs now, if any.
    pub fn current_kid(&self) -> Option<&str> {
        self.current.as_ref().map(SigningKey::kid)
    }

    /// The JWKS to publish: `{"keys":[...]}` with the current key first, then the keys
    /// not yet past retirement. Public halves only.
    pub fn jwks(&self) -> Value {
        let now = SystemTime::now();
        let keys: Vec<Value> = self
            .current
            .iter()
            .chain(
                self.retiring
                    .iter()
                    .filter(|r| r.retire_after > now)
                    .map(|r| &r.key),
            )
            .map(SigningKey::public_jwk)
            .collect();
        json!({ "keys": keys })
    }

    fn kids(&self) -> impl Iterator<Item = &str> {
        self.current
            .iter()
            .chain(self.retiring.iter().map(|r| &r.key))
            .map(SigningKey::kid)
    }
}

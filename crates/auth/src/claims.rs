use serde::{Deserialize, Serialize};

use crate::{TokenError, VerifierConfig};

/// What a verified token says about its caller.
#[derive(Clone, Debug, Serialize)]
pub struct Claims {
    /// Who the token is for (`sub`).
    pub sub: String,
    /// The permissions granted: the space-separated `scope` claim, split (RFC 8693).
    /// Empty when the token has no `scope`.
    pub scopes: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issue time, Unix seconds.
    pub iat: u64,
    /// Issuer (equal to the configured one).
    pub iss: String,
    /// Audiences (one of them is the configured one).
    pub aud: Vec<String>,
}

impl Claims {
    /// Whether the token grants this scope (exact match).
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// The claims an issuer signs with [`KeyRing::sign`](crate::KeyRing::sign).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenClaims {
    /// Who the token is for.
    pub sub: String,
    /// Space-separated scopes.
    pub scope: String,
    /// Issuer.
    pub iss: String,
    /// The one audience the token is for.
    pub aud: String,
    /// Issue time, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// The claims as found in a token, before any check. Deserialised straight from the
/// bytes (not through `serde_json::Value`), so a duplicated claim is an error instead
/// of "the last one wins", which another parser might read the other way.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    scope: Option<String>,
    exp: Option<NumericDate>,
    nbf: Option<NumericDate>,
    iat: Option<NumericDate>,
    iss: Option<String>,
    aud: Option<Audience>,
}

/// RFC 7519 NumericDate: seconds, possibly with a fraction (dropped).
struct NumericDate(u64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        if let Some(v) = n.as_u64() {
            return Ok(Self(v));
        }
        match n.as_f64() {
            Some(v) if v.is_finite() && v >= 0.0 && v < u64::MAX as f64 => Ok(Self(v as u64)),
            _ => Err(serde::de::Error::custom("not a NumericDate")),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Check the claims of a token whose signature has already been verified.
///
/// Required: `exp`, `iat`, `iss`, `aud`, `sub`; `nbf` is checked when present.
pub(crate) fn validate(
    payload: &[u8],
    cfg: &VerifierConfig,
    now: u64,
) -> Result<Claims, TokenError> {
    if !is_json_object(payload) {
        return Err(TokenError::Malformed);
    }
    let raw: RawClaims = serde_json::from_slice(payload).map_err(|_| TokenError::Malformed)?;

    let exp = raw.exp.ok_or(TokenError::MissingClaim("exp"))?.0;
    let iat = raw.iat.ok_or(TokenError::MissingClaim("iat"))?.0;
    let iss = non_empty(raw.iss).ok_or(TokenError::MissingClaim("iss"))?;
    let aud = match raw.aud.ok_or(TokenError::MissingClaim("aud"))? {
        Audience::One(a) => vec![a],
        Audience::Many(a) => a,
    };
    let sub = non_empty(raw.sub).ok_or(TokenError::MissingClaim("sub"))?;

    // RFC 7519: the token must not be accepted "on or after" exp.
    if now >= exp.saturating_add(cfg.leeway_s) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = raw.nbf {
        if now.saturating_add(cfg.leeway_s) < nbf.0 {
            return Err(TokenError::NotYetValid);
        }
    }
    if iss != cfg.issuer {
        return Err(TokenError::WrongIssuer);
    }
    if !aud.contains(&cfg.audience) {
        return Err(TokenError::WrongAudience);
    }

    let scopes = raw
        .scope
        .as_deref()
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Claims {
        sub,
        scopes,
        exp,
        iat,
        iss,
        aud,
    })
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// JOSE headers and claim sets are JSON objects. serde would also read a struct from a
/// JSON array, which no other JWT library accepts; refusing it keeps parsers agreeing.
pub(crate) fn is_json_object(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{')
}

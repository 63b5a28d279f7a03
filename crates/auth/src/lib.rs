//! Access tokens for shoal: who is calling, and what they may do.
//!
//! Two sides of one contract, a signed JWT (JWS compact form) and the JWKS that
//! publishes the keys it can be checked with:
//! - verifying ([`Verifier`]): the gateway checks `Authorization: Bearer <token>`
//!   against a JWKS it fetches through a [`JwksSource`], caches, and refetches when it
//!   grows old or when a token names a key it has not seen;
//! - signing ([`KeyRing`]): an identity service signs [`TokenClaims`] with its current
//!   [`SigningKey`] and publishes [`KeyRing::jwks`]; rotation keeps the old key listed
//!   until the last token it signed has expired.
//!
//! Only asymmetric algorithms exist here ([`Algorithm`]: ES256 and EdDSA), and the
//! algorithm of a token is pinned by the key that checks it, never chosen by the token.
//! docs/tokens.md says what is checked and why.
//!
//! Verification needs a Tokio runtime: a JWKS fetch runs as its own task, so a caller
//! that goes away (a client that disconnects) cannot cancel a fetch others wait for.

mod algorithm;
mod claims;
mod config;
mod error;
mod jwks;
mod signing;
mod token;
mod verifier;

#[cfg(test)]
mod tests;

pub use algorithm::Algorithm;
pub use claims::{Claims, TokenClaims};
pub use config::VerifierConfig;
pub use error::TokenError;
pub use jwks::{FetchFuture, FileJwks, JwksSource, StaticJwks};
pub use signing::{KeyRing, SigningKey};
pub use verifier::Verifier;

/// Longest token accepted, in bytes. Tokens are sent on every request; a larger one is
/// not ours, and refusing it before any decoding bounds the work an attacker can cause.
pub(crate) const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest JWKS document accepted, in bytes.
pub(crate) const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Most keys accepted in one JWKS document (a rotating issuer lists two or three).
pub(crate) const MAX_JWKS_KEYS: usize = 64;

/// Base64url without padding, the only encoding JWS compact form and JWKs use.
/// Strict: padding and non-canonical trailing bits are refused, so one token has one
/// spelling.
pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

pub(crate) fn b64url_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch by the wall clock: token times (`exp`, `nbf`, `iat`)
/// are wall-clock times set by another machine.
pub(crate) fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

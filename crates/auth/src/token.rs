use serde::Deserialize;

use crate::claims::is_json_object;
use crate::{b64url_decode, Algorithm, TokenError, MAX_TOKEN_BYTES};

/// A JWS compact token split into its parts, header read, nothing verified.
pub(crate) struct Parts<'a> {
    /// `header.payload`, the bytes the signature covers.
    pub(crate) signing_input: &'a str,
    pub(crate) payload: &'a str,
    pub(crate) signature: &'a str,
    pub(crate) alg: Algorithm,
    pub(crate) kid: Option<String>,
}

/// The header fields we act on. Unknown fields are ignored, and that is where `jku`,
/// `x5u`, `jwk` and `x5c` go: a key or a key URL chosen by the token's sender proves
/// nothing, so they are neither parsed nor fetched.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    /// Present means "reject me unless you understand these extensions"; we understand
    /// none (RFC 7515 §4.1.11).
    crit: Option<serde::de::IgnoredAny>,
}

pub(crate) fn split(token: &str) -> Result<Parts<'_>, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed);
    }
    let mut it = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        // Two parts is nothing; five is JWE, which we do not accept.
        return Err(TokenError::Malformed);
    };
    let header_json = b64url_decode(header).ok_or(TokenError::Malformed)?;
    if !is_json_object(&header_json) {
        return Err(TokenError::Malformed);
    }
    let raw: RawHeader = serde_json::from_slice(&header_json).map_err(|_| TokenError::Malformed)?;
    if raw.crit.is_some() {
        return Err(TokenError::Malformed);
    }
    // Only names we could ever accept get past here; whether it is the algorithm of the
    // key named by `kid` is checked once the key is found.
    let alg = Algorithm::from_name(&raw.alg).ok_or(TokenError::UnsupportedAlgorithm)?;
    Ok(Parts {
        signing_input: &token[..header.len() + 1 + payload.len()],
        payload,
        signature,
        alg,
        kid: raw.kid,
    })
}

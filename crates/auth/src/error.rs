use http::StatusCode;

/// Why a token was refused.
///
/// Each variant has a stable snake_case [`code`](Self::code) (the variant's name) and a
/// [`message`](Self::message) that is safe to show a client: neither says which key
/// exists or what the expected issuer or audience is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization` header.
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    /// Not a JWS compact token we can read: not `Bearer`, not three base64url parts,
    /// not JSON objects, a `crit` header, or over 8 KiB.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// The header's `alg` is not the algorithm of the key it names (`none` and every
    /// HS* and RS* among others).
    #[error("the token's signature algorithm is not accepted")]
    UnsupportedAlgorithm,
    /// The header has no `kid`, or names a key not in the JWKS even after a refetch.
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    /// The signature does not match the header and claims.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("the token has expired")]
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("the token was issued by an untrusted issuer")]
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    #[error("the token is not meant for this service")]
    WrongAudience,
    /// A required claim is absent (or empty, for strings).
    #[error("the token lacks the required `{0}` claim")]
    MissingClaim(&'static str),
    /// No keys to check the token with: the JWKS could not be fetched and none is cached.
    /// Not the client's fault, so it maps to 503, not 401.
    #[error("token signing keys are unavailable; try again later")]
    KeysUnavailable,
}

impl TokenError {
    /// A stable snake_case code for logs, metrics and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnsupportedAlgorithm => "unsupported_algorithm",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::KeysUnavailable => "keys_unavailable",
        }
    }

    /// A message for the client (the same text as `Display`).
    pub fn message(&self) -> String {
        self.to_string()
    }

    /// The HTTP status to answer with: 401 for every token fault, 503 when the keys
    /// are unavailable (the request may succeed later, unchanged).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::KeysUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

impl From<TokenError> for shoal_core::ApiError {
    fn from(e: TokenError) -> Self {
        Self::new(e.status(), e.code(), e.message())
    }
}

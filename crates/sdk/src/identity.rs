//! Who is calling: the caller the gateway verified, passed on as headers.

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use http::request::Parts;
use http::StatusCode;
use shoal_core::headers::{X_SHOAL_SCOPES, X_SHOAL_SUBJECT};
use shoal_core::ApiError;

/// The verified caller of a request: the token's subject and scopes, as the
/// gateway passes them on (`x-shoal-subject`, `x-shoal-scopes`) after checking the
/// token, having removed any copy the client sent. Extract it in a handler that
/// serves a caller's own data; without it the request is refused 401
/// `unauthenticated`. `Option<Identity>` serves routes open to anonymous callers.
///
/// The headers are trusted because only the gateway reaches the service (and,
/// with service-to-service mTLS, only callers the policy allows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`: a user name or a client id.
    pub subject: String,
    /// The token's scopes.
    pub scopes: Vec<String>,
}

impl Identity {
    /// Whether the caller holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// Read the caller from request headers; `None` without a subject.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let subject = headers.get(X_SHOAL_SUBJECT)?.to_str().ok()?.trim();
        if subject.is_empty() {
            return None;
        }
        let scopes = headers
            .get(X_SHOAL_SCOPES)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split_ascii_whitespace()
            .map(str::to_string)
            .collect();
        Some(Self {
            subject: subject.to_string(),
            scopes,
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Self::from_headers(&parts.headers).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "this route needs a signed-in caller",
            )
        })
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Identity {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> Result<Option<Self>, std::convert::Infallible> {
        Ok(Self::from_headers(&parts.headers))
    }
}

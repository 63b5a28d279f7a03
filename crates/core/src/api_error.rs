use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

/// The one error body of every shoal HTTP answer:
/// `{"error":{"code":"snake_case","message":"…"}}` with a matching status.
///
/// Handlers return it (it implements [`IntoResponse`]); the SDK and the gateway also
/// rewrite any non-JSON error answer (an unknown path, a rejected extractor) into this
/// shape, so a client never sees an HTML page or a bare string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// A stable, machine-readable code in snake_case.
    pub code: String,
    /// A message for people; never a stack trace or an internal address.
    pub message: String,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    error: Body,
}

#[derive(Serialize, Deserialize)]
struct Body {
    code: String,
    message: String,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// 400 with code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 with code `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500 with code `internal`. The message must not leak internals.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// 503 with code `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The default code for a status, used when an error answer is normalised.
    pub fn code_for(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 => "bad_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            405 => "method_not_allowed",
            408 => "request_timeout",
            409 => "conflict",
            413 => "payload_too_large",
            415 => "unsupported_media_type",
            422 => "unprocessable_entity",
            429 => "too_many_requests",
            431 => "headers_too_large",
            502 => "bad_gateway",
            503 => "unavailable",
            504 => "gateway_timeout",
            s if s >= 500 => "internal",
            _ => "error",
        }
    }

    /// The JSON body of this error.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Envelope {
            error: Body {
                code: self.code.clone(),
                message: self.message.clone(),
            },
        })
        .unwrap_or_else(|_| String::from(r#"{"error":{"code":"internal","message":""}}"#))
    }

    /// Parse an error body written by [`ApiError::to_json`], if it is one.
    pub fn from_json(status: StatusCode, body: &[u8]) -> Option<Self> {
        let env: Envelope = serde_json::from_slice(body).ok()?;
        Some(Self::new(status, env.error.code, env.error.message))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, self.to_json()).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::ErrorKind as K;
        let (status, code) = match e.kind() {
            K::InvalidInput => (StatusCode::BAD_REQUEST, None),
            K::NotFound => (StatusCode::NOT_FOUND, None),
            K::Conflict => (StatusCode::CONFLICT, None),
            K::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, None),
            K::Timeout => (StatusCode::GATEWAY_TIMEOUT, Some("timeout")),
            K::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded")),
            K::CircuitOpen => (StatusCode::SERVICE_UNAVAILABLE, Some("circuit_open")),
            K::Protocol => (StatusCode::BAD_GATEWAY, None),
            K::Config | K::Io | K::Internal => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        // Internal details stay in the logs; the answer says only what kind of failure.
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            "internal error".to_string()
        } else {
            e.message().to_string()
        };
        let code = code.unwrap_or_else(|| Self::code_for(status));
        Self::new(status, code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_round_trips() {
        let e = ApiError::not_found("no product p-9");
        assert_eq!(
            e.to_json(),
            r#"{"error":{"code":"not_found","message":"no product p-9"}}"#
        );
        assert_eq!(
            ApiError::from_json(StatusCode::NOT_FOUND, e.to_json().as_bytes()),
            Some(e)
        );
    }

    #[test]
    fn internal_errors_hide_details() {
        let e: ApiError = crate::Error::internal("db at /var/secret broke").into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.message, "internal error");
    }
}

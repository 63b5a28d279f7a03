//! The guard: the checks a request passes before the gateway forwards it.
//!
//! Each check is a self-contained piece the proxy calls in turn, cheapest first, and
//! each refusal is a complete JSON answer (`shoal_core::ApiError`'s shape):
//! - [`ip`]: who is asking (the client address behind trusted proxies) and whether
//!   that address may use the route (403 `forbidden`);
//! - [`ratelimit`]: how often one client key may ask (429 `rate_limited`, with
//!   `Retry-After`), in bounded memory;
//! - [`cors`]: browsers' cross-origin preflights answered at the edge (204, or 403
//!   `cors_refused`) and the CORS headers of actual answers;
//! - [`schema`]: JSON request bodies checked against a JSON Schema (400
//!   `malformed_json` or `validation_failed`) so services receive only well-formed
//!   input.
//!
//! Configuration types validate at start and name the config key they came from.

mod cors;
mod ip;
mod ratelimit;
mod schema;

pub(crate) use self::{
    cors::Cors,
    ip::{client_ip, deserialize_nets, forbidden},
    ratelimit::{too_many, ClientKey, RateLimiter},
    schema::BodySchema,
};
pub use self::{cors::CorsConfig, ip::IpRules, ratelimit::RateLimitConfig};
pub use ipnet::IpNet;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when cut: refusal
/// messages quote client input, and a client must not be able to make them large.
pub(super) fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

#[cfg(test)]
pub(super) mod tests {
    use axum::response::Response;
    use shoal_core::ApiError;

    /// The JSON error an answer carries (panics when it carries none).
    pub(crate) async fn api_error(res: Response) -> ApiError {
        let status = res.status();
        assert_eq!(
            res.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
        let body = axum::body::to_bytes(res.into_body(), 64 * 1024)
            .await
            .expect("body");
        ApiError::from_json(status, &body).expect("an ApiError body")
    }

    #[test]
    fn truncate_cuts_on_char_boundaries() {
        assert_eq!(super::truncate("short", 10), "short");
        assert_eq!(super::truncate("abcdef", 3), "abc…");
        assert_eq!(super::truncate("ééé", 3), "é…");
    }
}

//! Header names shoal reads and writes.

/// Correlates one request across every process it touches; a client's own is kept.
pub const X_REQUEST_ID: &str = "x-request-id";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// `service@version` of the instance that answered; how a canary split is seen from outside.
pub const X_SHOAL_SERVED_BY: &str = "x-shoal-served-by";
/// The longest request id kept from a client; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

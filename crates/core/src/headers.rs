//! Header names shoal reads and writes.

/// Correlates one request across every process it touches; a client's own is kept.
pub const X_REQUEST_ID: &str = "x-request-id";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// `service@version` of the instance that answered; how a canary split is seen from outside.
pub const X_SHOAL_SERVED_BY: &str = "x-shoal-served-by";
/// The longest request id kept from a client; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// How many milliseconds the caller will still wait for this request: its deadline,
/// relative so that clocks need not agree. A callee stops working on the request once
/// it runs out and passes what is left on to the services it calls.
pub const X_SHOAL_DEADLINE_MS: &str = "x-shoal-deadline-ms";
/// Marks a request as safe to repeat even when its method is not idempotent: the
/// callee recognises a repeated key. Retries are allowed only with it or an
/// idempotent method.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The caller's identity as the gateway verified it: the token's subject. The
/// gateway removes any a client sends, so a service behind it can trust it.
pub const X_SHOAL_SUBJECT: &str = "x-shoal-subject";
/// The verified token's scopes, space-separated (with [`X_SHOAL_SUBJECT`]).
pub const X_SHOAL_SCOPES: &str = "x-shoal-scopes";

//! A real NATS server with JetStream (`scripts/nats-server`), and a namespace per test.

use std::sync::OnceLock;

/// The environment variable holding the URL of the test server. Not `SHOAL_*`: services
/// read those as configuration and refuse names they do not know.
pub const URL_VAR: &str = "NATS_TEST_URL";

/// The URL of the test server (`nats://127.0.0.1:PORT`): from [`URL_VAR`] when set (as
/// `scripts/test` does), otherwise from `scripts/nats-server start`, which installs and
/// starts the server if needed and leaves it running for the next test.
///
/// # Panics
/// When no server can be had: a test of the JetStream backend must not pass without
/// one.
pub fn url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| crate::server_address(URL_VAR, "nats-server"))
}

/// A namespace no other test uses (`t` and 12 hex digits): give it to the bus as its
/// prefix, so the streams, consumers and group leases of tests running in parallel on
/// one server never meet.
pub fn unique_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}", &id[..12])
}

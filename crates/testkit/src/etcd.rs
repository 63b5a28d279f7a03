//! A real etcd (`scripts/etcd`), and a key prefix per test.

use std::sync::OnceLock;

/// The environment variable holding the URL of the test server. Not `SHOAL_*`: services
/// read those as configuration and refuse names they do not know.
pub const URL_VAR: &str = "ETCD_TEST_URL";

/// The client URL of the test server (`http://127.0.0.1:PORT`): from [`URL_VAR`] when
/// set (as `scripts/test` does), otherwise from `scripts/etcd start`, which installs
/// and starts the server if needed and leaves it running for the next test.
///
/// # Panics
/// When no server can be had: a test of the etcd backend must not pass without one.
pub fn url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| crate::server_address(URL_VAR, "etcd"))
}

/// A key prefix no other test uses (`/t` and 12 hex digits): tests running in
/// parallel on one server never see each other's keys.
pub fn unique_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("/t{}", &id[..12])
}

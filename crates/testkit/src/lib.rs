//! Real servers for shoal's tests: backends are tested against the real thing, never
//! a mock. Each server is installed (Debian package) and started by a script in
//! `scripts/`, so a fresh machine needs nothing done by hand; `scripts/test` starts
//! them once for the whole run and passes their addresses in the environment, and a
//! test run by hand starts them on first use.

pub mod bus;
pub mod etcd;
pub mod nats;
pub mod postgres;

/// The address of a test server: from the environment variable `var` when set (as
/// `scripts/test` does), otherwise from `scripts/<script> start`, which installs and
/// starts the server if needed, leaves it running for the next test, and prints
/// `export <var>=<address>`.
///
/// # Panics
/// When no server can be had: a test of a backend must not pass without it.
fn server_address(var: &str, script: &str) -> String {
    if let Ok(url) = std::env::var(var) {
        if !url.is_empty() {
            return url;
        }
    }
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    let out = std::process::Command::new(&path)
        .arg("start")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "scripts/{script} start failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("export {var}=")))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("scripts/{script} printed no address: {text}"))
}

//! The sidecar's own settings (`[settings]` of its config, `SHOAL_SETTINGS__*`).

use serde::Deserialize;
use shoal_core::Error;
use std::net::SocketAddr;

/// Where the app is and the limits of the two hops. `shoal up` sets `app_addr`,
/// `outbound_listen` and `health_path` for a `sidecar = { … }` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarSettings {
    /// The app's own HTTP server. Loopback only: the hop to it is plain text.
    pub app_addr: SocketAddr,
    /// The app's health path, asked by the sidecar's readiness check: an app that
    /// stops answering it (2xx) makes the instance not ready, and the registry's
    /// probes take it out of discovery.
    pub health_path: String,
    /// Longest wait for the app's health answer.
    pub health_timeout_ms: u64,
    /// Where the app sends its calls to other services (plain HTTP, loopback
    /// only): `http://<outbound_listen>/<service>/<path>`. Port 0 picks one (logged).
    pub outbound_listen: SocketAddr,
    /// Longest wait for the app's response head on a forwarded request (the SDK's
    /// `request_timeout_ms` bounds the whole request too).
    pub app_timeout_ms: u64,
    /// Largest request body forwarded either way, and largest response read back on
    /// an outbound call (the SDK client buffers it, to retry).
    pub body_limit_bytes: usize,
    /// Most outbound calls in flight at once; beyond, a call is answered 503
    /// `overloaded` at once (the resilience policy's bulkhead bounds each
    /// dependency too).
    pub max_outbound_in_flight: usize,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        Self {
            app_addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            health_path: "/health".into(),
            health_timeout_ms: 1_000,
            outbound_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            app_timeout_ms: 10_000,
            body_limit_bytes: 1024 * 1024,
            max_outbound_in_flight: 256,
        }
    }
}

impl SidecarSettings {
    /// Check what deserialisation cannot.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.app_addr.ip().is_loopback() {
            return Err(Error::config(format!(
                "settings.app_addr {}: must be a loopback address (the hop to the app is plain text)",
                self.app_addr
            )));
        }
        if !self.outbound_listen.ip().is_loopback() {
            return Err(Error::config(format!(
                "settings.outbound_listen {}: must be a loopback address (it is plain text and unauthenticated)",
                self.outbound_listen
            )));
        }
        if !self.health_path.starts_with('/') || self.health_path.len() > 256 {
            return Err(Error::config(
                "settings.health_path: must start with / (at most 256 characters)",
            ));
        }
        for (key, v) in [
            ("health_timeout_ms", self.health_timeout_ms),
            ("app_timeout_ms", self.app_timeout_ms),
            ("body_limit_bytes", self.body_limit_bytes as u64),
            ("max_outbound_in_flight", self.max_outbound_in_flight as u64),
        ] {
            if v == 0 {
                return Err(Error::config(format!("settings.{key}: must be positive")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SidecarSettings, String> {
        let s: SidecarSettings = toml::from_str(text).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn defaults_are_valid_and_mistakes_are_named() {
        let s = parse("").unwrap();
        assert_eq!(s.health_path, "/health");
        assert!(parse("app_addr = \"127.0.0.1:9000\"\nhealth_path = \"/ping\"\n").is_ok());
        for (text, key) in [
            ("app_adr = \"127.0.0.1:1\"\n", "app_adr"),
            ("app_addr = \"10.0.0.1:80\"\n", "app_addr"),
            ("outbound_listen = \"0.0.0.0:0\"\n", "outbound_listen"),
            ("health_path = \"health\"\n", "health_path"),
            ("body_limit_bytes = 0\n", "body_limit_bytes"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}

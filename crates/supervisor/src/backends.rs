//! The `[backends]` table of a system file: the distributed engines that replace the
//! embedded defaults when a system outgrows one machine, by configuration alone.
//!
//! Each engine named here replaces one default for the whole system:
//! - `etcd`: the control plane keeps its registry in etcd (leases for TTLs,
//!   watches for discovery), so control planes on several hosts share one catalog;
//! - `jetstream`: every service's bus is a NATS JetStream server instead of the
//!   control plane's embedded broker;
//! - `postgres`: every service's database is a schema of its own (named after the
//!   service) in this PostgreSQL database instead of a SQLite file;
//! - `otlp`: every process sends its spans to this OTLP/HTTP endpoint instead of
//!   the control plane's collector.
//!
//! The supervisor turns the table into each service's `SHOAL_*` environment
//! ([`Backends::service_env`]); a service's own `env` still wins. Deployments without
//! the supervisor (containers, Kubernetes) give services the same environment.

use serde::Deserialize;
use shoal_core::Error;
use shoal_registry::EtcdConfig;

/// The `[backends]` table. Every engine is optional; absent means the embedded one.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backends {
    /// The registry's store (`etcd = { endpoints = ["http://127.0.0.1:2379"] }`).
    pub etcd: Option<EtcdConfig>,
    /// The services' bus (`jetstream = { url = "nats://127.0.0.1:4222" }`).
    pub jetstream: Option<JetStreamBackend>,
    /// The services' databases (`postgres = { url = "postgres://…/shop" }`).
    pub postgres: Option<PostgresBackend>,
    /// Where spans go (`otlp = { endpoint = "http://127.0.0.1:4318/v1/traces" }`).
    pub otlp: Option<OtlpBackend>,
}

/// `[backends.jetstream]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamBackend {
    /// The server's URL, `nats://host:port`.
    pub url: String,
}

/// `[backends.postgres]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresBackend {
    /// `postgres://user:password@host:port/database`. Each service gets its own
    /// schema in it, named after the service (`payment-provider` →
    /// `payment_provider`), created at its first start.
    pub url: String,
}

/// `[backends.otlp]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpBackend {
    /// OTLP/HTTP traces endpoint (`http://host:4318/v1/traces`).
    pub endpoint: String,
}

impl Backends {
    /// Whether any engine replaces a default.
    pub fn any(&self) -> bool {
        self.etcd.is_some()
            || self.jetstream.is_some()
            || self.postgres.is_some()
            || self.otlp.is_some()
    }

    /// The `SHOAL_*` environment a process of `service` (the name it registers
    /// under) needs to use these engines.
    pub fn service_env(&self, service: &str) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(js) = &self.jetstream {
            env.push(("SHOAL_BUS__BACKEND".into(), "jetstream".into()));
            env.push(("SHOAL_BUS__URL".into(), js.url.clone()));
        }
        if let Some(pg) = &self.postgres {
            env.push(("SHOAL_DATABASE__URL".into(), pg.url.clone()));
            env.push(("SHOAL_DATABASE__SCHEMA".into(), schema_name(service)));
        }
        if let Some(otlp) = &self.otlp {
            env.push(("SHOAL_TRACING__ENDPOINT".into(), otlp.endpoint.clone()));
        }
        env
    }

    /// Reject settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(etcd) = &self.etcd {
            etcd.validate("backends.etcd")?;
        }
        if let Some(js) = &self.jetstream {
            if !js.url.starts_with("nats://") {
                return Err(Error::config(format!(
                    "backends.jetstream.url {:?}: must be nats://host:port",
                    js.url
                )));
            }
        }
        if let Some(pg) = &self.postgres {
            if !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://")) {
                return Err(Error::config(
                    "backends.postgres.url: must be postgres://user:password@host:port/database",
                ));
            }
        }
        if let Some(otlp) = &self.otlp {
            if !(otlp.endpoint.starts_with("http://") || otlp.endpoint.starts_with("https://")) {
                return Err(Error::config(format!(
                    "backends.otlp.endpoint {:?}: must be an http(s) URL",
                    otlp.endpoint
                )));
            }
        }
        Ok(())
    }
}

/// The PostgreSQL schema of `service`: a plain lower-case identifier.
pub fn schema_name(service: &str) -> String {
    let s: String = service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    // Service names start with a letter (shoal_core::names), so `s` does too.
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_engine_becomes_environment_and_bad_urls_are_named() {
        let b: Backends = toml::from_str(
            r#"
            jetstream = { url = "nats://127.0.0.1:4222" }
            postgres = { url = "postgres://shoal@127.0.0.1/shop" }
            otlp = { endpoint = "http://127.0.0.1:4318/v1/traces" }
            "#,
        )
        .unwrap();
        b.validate().unwrap();
        let env = b.service_env("payment-provider");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SHOAL_BUS__BACKEND"), Some("jetstream"));
        assert_eq!(get("SHOAL_DATABASE__SCHEMA"), Some("payment_provider"));
        assert_eq!(
            get("SHOAL_TRACING__ENDPOINT"),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert!(Backends::default().service_env("orders").is_empty());

        let bad: Backends = toml::from_str(r#"jetstream = { url = "127.0.0.1:4222" }"#).unwrap();
        let e = bad.validate().unwrap_err();
        assert!(e.message().contains("backends.jetstream.url"), "{e}");
        assert!(toml::from_str::<Backends>("kafka = { url = \"x\" }").is_err());
    }
}

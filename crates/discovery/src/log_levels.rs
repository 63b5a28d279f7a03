//! Run-time log levels from the client side: the calls of `/v1/log-levels` and
//! [`LogLevelWatch`], which keeps a process's log filter in step with the control
//! plane's table (`shoal log-level`), the way [`crate::FaultWatch`] follows the
//! fault table.

use crate::discovery::{AbortOnDrop, WATCH_WAIT};
use crate::registry_client::encode;
use crate::RegistryClient;
use http::{Method, StatusCode};
use shoal_core::log_levels::{LogLevel, LogLevelList, SetLogLevel};
use shoal_core::Error;
use shoal_telemetry::logging::LogHandle;
use std::time::Duration;

impl crate::watch::Indexed for LogLevelList {
    fn index(&self) -> u64 {
        self.index
    }
}

impl RegistryClient {
    /// The log levels set (of `service` only, when given), or (with `after`) once
    /// the table's index differs from `after`, waiting at most `wait`.
    pub async fn log_levels(
        &self,
        service: Option<&str>,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<LogLevelList, Error> {
        let mut query = Vec::new();
        if let Some(s) = service {
            query.push(format!("service={}", encode(s)));
        }
        if let Some(i) = after {
            query.push(format!("index={i}&wait_ms={}", wait.as_millis()));
        }
        let path = if query.is_empty() {
            "/v1/log-levels".to_string()
        } else {
            format!("/v1/log-levels?{}", query.join("&"))
        };
        let timeout = self.timeout()
            + if after.is_some() {
                wait
            } else {
                Duration::ZERO
            };
        let (status, bytes) = self.call(Method::GET, &path, None, timeout).await?;
        Self::decode(status, &bytes, "log levels")
    }

    /// Set `service`'s log filter (`PUT /v1/log-levels/{service}`); a directive the
    /// control plane cannot parse is an `InvalidInput` error naming it.
    pub async fn set_log_level(&self, service: &str, level: &str) -> Result<LogLevel, Error> {
        let body = serde_json::to_vec(&SetLogLevel {
            level: level.to_string(),
        })
        .map_err(|e| Error::internal("encoding log level").with_source(e))?;
        let (status, bytes) = self
            .call(
                Method::PUT,
                &format!("/v1/log-levels/{}", encode(service)),
                Some(body),
                self.timeout(),
            )
            .await?;
        Self::decode(status, &bytes, "set log level")
    }

    /// Forget `service`'s log filter, so its processes go back to their configured
    /// one; answers whether one was set.
    pub async fn reset_log_level(&self, service: &str) -> Result<bool, Error> {
        #[derive(serde::Deserialize)]
        struct Reset {
            reset: bool,
        }
        let (status, bytes) = self
            .call(
                Method::DELETE,
                &format!("/v1/log-levels/{}", encode(service)),
                None,
                self.timeout(),
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            // An older control plane without the table: nothing to reset there.
            return Ok(false);
        }
        Self::decode::<Reset>(status, &bytes, "reset log level").map(|r| r.reset)
    }
}

/// What a process applies when the table changes: the level set for it, else the
/// configured one. `None` when nothing changes (the same as last applied).
fn next_level<'a>(
    list: &'a LogLevelList,
    service: &str,
    configured: &'a str,
    applied: &str,
) -> Option<&'a str> {
    let wanted = list.level_of(service).unwrap_or(configured);
    (wanted != applied).then_some(wanted)
}

/// Keeps a process's log filter in step with the control plane's log-level table,
/// so `shoal log-level` takes effect without a restart. Stops when dropped.
pub struct LogLevelWatch {
    _task: AbortOnDrop,
}

impl LogLevelWatch {
    /// Watch the level of `service`; apply it through `handle`, and go back to
    /// `configured` (the level the process started with) when it is reset.
    pub fn start(
        client: RegistryClient,
        service: &str,
        handle: LogHandle,
        configured: &str,
    ) -> Self {
        let service = service.to_string();
        let watched = service.clone();
        let configured = configured.to_string();
        let mut applied = configured.clone();
        let task = crate::watch::spawn(
            "log levels",
            client.base().to_string(),
            move |index| {
                let client = client.clone();
                let service = watched.clone();
                async move { client.log_levels(Some(&service), index, WATCH_WAIT).await }
            },
            move |list: LogLevelList| {
                if let Some(level) = next_level(&list, &service, &configured, &applied) {
                    match handle.set_level(level) {
                        Ok(()) => {
                            // Logged at warn: at the old level an info line might
                            // not show, and an operator wants to see the switch.
                            // `log_level`, not `level`: that key is the line's own.
                            tracing::warn!(log_level = level, "log level changed at run time");
                            applied = level.to_string();
                        }
                        // The control plane checks levels, so this is a version
                        // mismatch at worst; the old filter stays.
                        Err(e) => {
                            tracing::warn!(log_level = level, error = %e, "log level not applied")
                        }
                    }
                }
                list.index
            },
        );
        Self {
            _task: AbortOnDrop(task),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_the_set_level_then_the_configured_one() {
        let mut list = LogLevelList {
            index: 1,
            levels: vec![LogLevel {
                service: "catalog".into(),
                level: "debug".into(),
            }],
        };
        assert_eq!(next_level(&list, "catalog", "info", "info"), Some("debug"));
        assert_eq!(next_level(&list, "catalog", "info", "debug"), None);
        assert_eq!(next_level(&list, "orders", "info", "info"), None);
        list.levels.clear();
        assert_eq!(next_level(&list, "catalog", "info", "debug"), Some("info"));
    }
}

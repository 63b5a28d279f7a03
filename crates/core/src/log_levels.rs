//! Wire types of run-time log levels (`shoal log-level`, `/v1/log-levels`): the
//! control plane keeps one desired log filter per service, and every process of that
//! service follows it with a long poll.

use serde::{Deserialize, Serialize};

/// Bounds of the log-level table.
pub mod limits {
    /// Longest filter directive (`info,sqlx=warn,…`) the control plane accepts.
    pub const MAX_DIRECTIVE_LEN: usize = 512;
    /// Most services with a level set at once.
    pub const MAX_ENTRIES: usize = 1024;
}

/// One service's desired log filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLevel {
    /// The service (as it registers: `catalog`, `gateway`).
    pub service: String,
    /// An `EnvFilter` directive: `debug`, `info,sqlx=warn`.
    pub level: String,
}

/// `PUT /v1/log-levels/{service}`'s body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetLogLevel {
    /// An `EnvFilter` directive: `debug`, `info,sqlx=warn`.
    pub level: String,
}

/// `GET /v1/log-levels`: the levels set, with the table's change index for watches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLevelList {
    /// Grows on every change; pass it back as `?index=` to wait for the next one.
    pub index: u64,
    /// The levels set, by service name. A service not listed runs its configured
    /// level.
    pub levels: Vec<LogLevel>,
}

impl LogLevelList {
    /// The level set for `service`, if any.
    pub fn level_of(&self, service: &str) -> Option<&str> {
        self.levels
            .iter()
            .find(|l| l.service == service)
            .map(|l| l.level.as_str())
    }
}

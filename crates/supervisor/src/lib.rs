//! The process supervisor behind `shoal up`.
//!
//! It reads a system file ([`SystemFile`], `shoal.toml`), builds what needs
//! building, then starts the control plane, the gateway and every service replica as
//! its own OS process, restarts any that dies (exponential backoff; crash loops are
//! reported), prints a ready summary, and on SIGINT/SIGTERM stops everything in
//! order (services, gateway, control plane) leaving no orphan: children live in their
//! own process group and are killed by the kernel if the supervisor itself dies.
//!
//! The live state (addresses, pids, restarts) is kept in `<state_dir>/up.json` for
//! `shoal status` and for tests. Every process's output goes through the supervisor
//! into `<state_dir>/logs/<name>.log`, rotated by size and pruned by count and age
//! (`[supervisor.logs]`, [`LogStoreConfig`]); `shoal logs` reads it.

mod backends;
mod logstore;
mod process;
mod state;
mod system;
mod up;

pub use backends::{schema_name, Backends, JetStreamBackend, OtlpBackend, PostgresBackend};
pub use logstore::LogStoreConfig;
pub use state::{ProcessState, UpState};
pub use system::{BuildSpec, ServiceSpec, SidecarSpec, SupervisorConfig, SystemFile, SystemTls};
pub use up::{up, UpOptions};

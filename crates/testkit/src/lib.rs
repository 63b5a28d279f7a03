//! Real servers for shoal's tests: backends are tested against the real thing, never
//! a mock. Each server is installed (Debian package) and started by a script in
//! `scripts/`, so a fresh machine needs nothing done by hand; `scripts/test` starts
//! them once for the whole run and passes their addresses in the environment, and a
//! test run by hand starts them on first use.

pub mod bus;
pub mod nats;
pub mod postgres;

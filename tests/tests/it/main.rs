//! shoal's integration tests, in one binary: platform flows against real servers on
//! 127.0.0.1:0 (`platform`), and the whole system under `shoal up` as real processes
//! (`system`), and the reference shop's contract end to end, under faults (`shop`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod broker;
mod dashboard;
mod deploy;
mod gateway;
mod logs;
mod messaging;
mod mtls;
mod openapi;
mod platform;
mod resilience;
mod saga;
mod shop;
mod sidecar;
mod system;
mod twophase;

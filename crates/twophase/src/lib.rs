//! Two-phase commit for shoal services: a [`Coordinator`] with a durable decision
//! log and [`Participant`]s with prepare, commit and abort, each over the service's
//! own database, with recovery on both sides after a crash.
//!
//! - The coordinator logs each transaction's start, asks every participant to
//!   prepare, logs the decision (commit only if all voted yes) **before** telling
//!   anyone, then delivers it until every participant acknowledged. Presumed abort:
//!   no decision record means abort. At start it aborts what is undecided and
//!   re-sends what is decided but not done.
//! - A participant runs the service's [`Resource`] inside a transaction of its own
//!   database that also writes its state row (`prepared`, `committed`, `aborted`),
//!   so effect and state commit together. Commit and abort are idempotent. A
//!   prepared participant never decides alone: it asks the coordinator, after a
//!   restart and whenever a decision is late, and reports a transaction in doubt
//!   longer than `max_in_doubt_ms` as stuck.
//! - Transport: HTTP/JSON ([`participant_router`], [`coordinator_router`],
//!   [`HttpParticipantLink`], [`HttpCoordinatorLink`], plain or mutual TLS) behind
//!   two small traits
//!   ([`ParticipantLink`], [`CoordinatorLink`]) that other transports and tests
//!   implement.
//!
//! Tables (created if missing, SQLite or PostgreSQL): `_shoal_2pc_coordinator_tx`,
//! `_shoal_2pc_coordinator_branch`, `_shoal_2pc_participant`. The protocol, the
//! recovery rules, what to do about a stuck transaction and when to prefer a saga
//! are in docs/twophase.md.

mod config;
mod coordinator;
mod link;
mod participant;
mod routes;
mod schema;
mod stop;
mod wire;

#[cfg(test)]
mod tests;

pub use config::{Backoff, CoordinatorConfig, ParticipantConfig};
pub use coordinator::{Branch, Completion, Coordinator, Recovered};
pub use link::{
    participant_name, CoordinatorLink, HttpCoordinatorLink, HttpParticipantLink, LinkFuture,
    ParticipantLink, PeerOf,
};
pub use participant::{Participant, Resource, ResourceFuture};
pub use routes::{coordinator_router, participant_router, COORDINATOR_PREFIX};
pub use wire::{
    validate_tx_id, BranchStatus, CoordinatorState, CoordinatorTx, Decision, DecisionAnswer,
    Outcome, ParticipantState, ParticipantTx, PrepareAnswer, PrepareRequest, TxRef, Vote,
    MAX_TX_ID_LEN,
};

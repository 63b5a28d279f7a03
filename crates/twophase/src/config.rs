//! Typed configuration of the coordinator and the participant, with every limit and
//! time in one place. Unknown keys are errors, so a typo in TOML fails at start.

use serde::{Deserialize, Serialize};
use shoal_core::Error;
use std::time::Duration;

/// Exponential backoff with a cap and jitter, for calls repeated until they succeed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Wait after the first failure; doubled after each further one.
    pub initial_ms: u64,
    /// Longest wait between two attempts, however many failed: a participant that
    /// comes back is reached within this long.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 100,
            max_ms: 10_000,
        }
    }
}

impl Backoff {
    /// The wait before attempt `failures + 1`, after `failures` failures (at least 1):
    /// between half and all of `min(initial * 2^(failures-1), max)`, so callers that
    /// failed together do not retry together.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let full = self
            .initial_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_ms)
            .max(1);
        let half = full / 2;
        Duration::from_millis(half + fastrand::u64(0..=full - half))
    }

    fn validate(&self, what: &str) -> Result<(), Error> {
        if self.initial_ms == 0 || self.max_ms < self.initial_ms {
            return Err(Error::config(format!(
                "{what}: need 0 < initial_ms <= max_ms (got {} and {})",
                self.initial_ms, self.max_ms
            )));
        }
        Ok(())
    }
}

/// How a [`crate::Coordinator`] runs transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// This coordinator's base URL as participants reach it, the prefix of its
    /// routes included (`http://127.0.0.1:7000/2pc/coordinator`). Sent with every
    /// prepare and stored by each participant, which asks it for the outcome when
    /// it is in doubt. Required.
    pub endpoint: String,
    /// Longest wait for one participant's vote. A participant that has not answered
    /// by then counts as a no. It is also the transaction's prepare deadline, after
    /// which an undecided transaction may be decided abort by a participant's query.
    pub prepare_timeout_ms: u64,
    /// Longest wait for one commit or abort call (each attempt) and for one decision
    /// query answer.
    pub call_timeout_ms: u64,
    /// Backoff between attempts to deliver a decision to a participant. Delivery
    /// never gives up; this bounds how often it knocks.
    pub retry: Backoff,
    /// Most transactions this process runs at once, counted until every participant
    /// acknowledged the decision. One more is refused (`Overloaded`).
    pub max_in_flight: usize,
    /// Most participants in one transaction.
    pub max_participants: usize,
    /// Largest payload for one participant, in JSON bytes.
    pub max_payload_bytes: usize,
    /// How long [`crate::Coordinator::execute`] waits, after the decision, for every
    /// participant to acknowledge before it returns (`done: false`) and leaves the
    /// delivery running in the background.
    pub delivery_wait_ms: u64,
    /// How often the coordinator looks for transactions that are decided but not
    /// done, or undecided past their deadline, and finishes them.
    pub recovery_interval_ms: u64,
    /// Most transactions one recovery pass picks up.
    pub recovery_batch: u32,
    /// How long a finished (done) transaction's record is kept before it is deleted.
    /// Presumed abort makes deleting safe: a participant that asks about a deleted
    /// transaction is answered abort, and only aborts can still be asked about once
    /// every participant acknowledged.
    pub retain_done_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            prepare_timeout_ms: 5_000,
            call_timeout_ms: 5_000,
            retry: Backoff::default(),
            max_in_flight: 256,
            max_participants: 16,
            max_payload_bytes: 64 * 1024,
            delivery_wait_ms: 5_000,
            recovery_interval_ms: 5_000,
            recovery_batch: 256,
            retain_done_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl CoordinatorConfig {
    /// The defaults, with the endpoint participants reach this coordinator at.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if !self.endpoint.starts_with("http://") && !self.endpoint.starts_with("https://") {
            return Err(Error::config(format!(
                "twophase coordinator endpoint {:?}: must be an http:// or https:// URL participants can reach",
                self.endpoint
            )));
        }
        positive(
            "twophase coordinator prepare_timeout_ms",
            self.prepare_timeout_ms,
        )?;
        positive("twophase coordinator call_timeout_ms", self.call_timeout_ms)?;
        positive(
            "twophase coordinator recovery_interval_ms",
            self.recovery_interval_ms,
        )?;
        positive(
            "twophase coordinator max_in_flight",
            self.max_in_flight as u64,
        )?;
        positive(
            "twophase coordinator max_participants",
            self.max_participants as u64,
        )?;
        positive(
            "twophase coordinator max_payload_bytes",
            self.max_payload_bytes as u64,
        )?;
        positive(
            "twophase coordinator recovery_batch",
            u64::from(self.recovery_batch),
        )?;
        self.retry.validate("twophase coordinator retry")
    }
}

/// How a [`crate::Participant`] prepares and how it resolves doubt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParticipantConfig {
    /// Longest a local prepare may take. Past it (or past the coordinator's prepare
    /// deadline, whichever comes first) the participant rolls the prepare back and
    /// votes no: it has not prepared, so it may abort on its own.
    pub prepare_timeout_ms: u64,
    /// How long a transaction may stay prepared without a decision before the
    /// participant starts asking its coordinator. After a restart it asks at once.
    pub in_doubt_after_ms: u64,
    /// Pause between two rounds of questions to coordinators; doubled (up to
    /// `query_backoff_max_ms`) after a round in which a coordinator could not be
    /// reached, back to this after a round that reached them all.
    pub query_interval_ms: u64,
    /// Longest pause between two rounds of questions.
    pub query_backoff_max_ms: u64,
    /// Longest wait for one answer from a coordinator.
    pub call_timeout_ms: u64,
    /// How long a transaction may stay in doubt before it is reported stuck: logged
    /// at error level and counted in [`crate::Participant::stuck_in_doubt`]. The
    /// participant keeps asking; it never decides a prepared transaction alone.
    pub max_in_doubt_ms: u64,
    /// Most transactions prepared at once (holding their effect). A prepare beyond
    /// it votes no.
    pub max_prepared: u32,
    /// Most in-doubt transactions asked about in one round (oldest first).
    pub query_batch: u32,
    /// Largest prepare request body the participant's routes accept.
    pub max_payload_bytes: usize,
    /// How long the state row of a committed or aborted transaction is kept (so a
    /// repeated commit or abort, or a late prepare, is recognised).
    pub retain_finished_ms: u64,
}

impl Default for ParticipantConfig {
    fn default() -> Self {
        Self {
            prepare_timeout_ms: 5_000,
            in_doubt_after_ms: 10_000,
            query_interval_ms: 1_000,
            query_backoff_max_ms: 30_000,
            call_timeout_ms: 5_000,
            max_in_doubt_ms: 60_000,
            max_prepared: 1_024,
            query_batch: 128,
            max_payload_bytes: 64 * 1024,
            retain_finished_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl ParticipantConfig {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        positive(
            "twophase participant prepare_timeout_ms",
            self.prepare_timeout_ms,
        )?;
        positive(
            "twophase participant query_interval_ms",
            self.query_interval_ms,
        )?;
        positive("twophase participant call_timeout_ms", self.call_timeout_ms)?;
        positive(
            "twophase participant max_prepared",
            u64::from(self.max_prepared),
        )?;
        positive(
            "twophase participant query_batch",
            u64::from(self.query_batch),
        )?;
        positive(
            "twophase participant max_payload_bytes",
            self.max_payload_bytes as u64,
        )?;
        if self.query_backoff_max_ms < self.query_interval_ms {
            return Err(Error::config(
                "twophase participant query_backoff_max_ms must be at least query_interval_ms",
            ));
        }
        Ok(())
    }
}

fn positive(what: &str, v: u64) -> Result<(), Error> {
    if v == 0 {
        return Err(Error::config(format!("{what} must be more than 0")));
    }
    Ok(())
}

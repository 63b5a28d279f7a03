//! Orchestrated sagas: one business transaction over several services, each with
//! its own database, kept consistent without a distributed lock.
//!
//! A [`Saga`] is a typed list of steps. Each step is an action with its
//! compensation, or is declared the pivot (the point of no return) or retriable
//! (after the pivot, retried until it succeeds); a step with none of these does not
//! compile, and [`SagaBuilder::build`] rejects kinds in the wrong order.
//!
//! An [`Orchestrator`] runs sagas of one definition over the service's own
//! database: every transition (a step done, refused or failed, a compensation
//! done) is written to the saga log before the saga moves on, group-committed
//! across sagas. When it opens it resumes every unfinished saga: a running one
//! repeats the step it was at, a compensating one goes on compensating. A repeated
//! step has no second effect because every call carries an idempotency key that is
//! the same on every attempt and after every restart ([`StepCtx::idempotency_key`]).
//!
//! A step is either a call the orchestrator awaits ([`Step::new`]) or a command
//! message answered by a reply event ([`Step::command`], [`reply`]); replies that
//! match no awaited step (duplicates, late or out of order) change nothing.
//! Failures follow the step's retry policy and timeout; a refusal
//! ([`StepError::Rejected`]) or attempts run out start compensation, in reverse
//! order. Status with history: [`Orchestrator::status`]; metrics: [`SagaMetrics`].
//! See docs/sagas.md.

mod definition;
mod log;
mod orchestrator;

#[cfg(test)]
mod tests;

pub use definition::{
    Saga, SagaBuilder, Step, StepBuilder, StepError, StepFuture, StepKind, MAX_STEPS,
};
pub use log::{HistoryEntry, Status};
pub use orchestrator::{Orchestrator, OrchestratorBuilder, SagaMetrics, SagaStatus, MAX_ID_LEN};
pub use shoal_resilience::RetryConfig;

use bytes::Bytes;
use shoal_bus::{Message, OutgoingMessage};

/// Header names on command and reply messages.
pub mod headers {
    /// The saga's id.
    pub const SAGA_ID: &str = "saga-id";
    /// The step's index in its saga (from 0).
    pub const SAGA_STEP: &str = "saga-step";
    /// `do` for an action, `undo` for a compensation.
    pub const SAGA_PHASE: &str = "saga-phase";
    /// On a command: the topic the reply goes to.
    pub const REPLY_TO: &str = "saga-reply-to";
    /// On a reply: `ok`, or `rejected` (the body then says why).
    pub const OUTCOME: &str = "saga-outcome";
}

/// Whether a call is a step's action or its compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The action.
    Do,
    /// The compensation.
    Undo,
}

impl Phase {
    /// `do` or `undo`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Do => "do",
            Self::Undo => "undo",
        }
    }
}

/// What a step's action or compensation is given.
#[derive(Clone, Debug)]
pub struct StepCtx<E> {
    /// The saga definition's name.
    pub saga: String,
    /// This saga's id.
    pub saga_id: String,
    /// The step's name.
    pub step: String,
    /// The step's index (from 0).
    pub index: usize,
    /// Action or compensation.
    pub phase: Phase,
    /// 1 for the first attempt in this process, then 2, 3, …
    pub attempt: u32,
    /// The correlation id the saga was started with: pass it on, log it.
    pub correlation_id: String,
    /// What the orchestrator was given for its steps.
    pub env: E,
}

impl<E> StepCtx<E> {
    /// The key that makes this call safe to repeat: the same on every attempt
    /// and after every restart, different for the action and the compensation.
    /// Send it (the `Idempotency-Key` header) and have the participant do the work
    /// once per key.
    pub fn idempotency_key(&self) -> String {
        match self.phase {
            Phase::Do => self.action_key(),
            Phase::Undo => format!("{}:undo", self.action_key()),
        }
    }

    /// The action's key, also from a compensation: it names what to undo.
    pub fn action_key(&self) -> String {
        format!("{}:{}", self.saga_id, self.step)
    }
}

/// A command a [`Step::command`] sends.
#[derive(Clone, Debug)]
pub struct Command {
    /// The participant's command topic.
    pub topic: String,
    /// The body.
    pub payload: Bytes,
}

impl Command {
    /// `payload` to `topic`.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
        }
    }
}

/// A participant's answer to a command.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The saga it answers.
    pub saga_id: String,
    /// The step's index.
    pub step: usize,
    /// Action or compensation.
    pub phase: Phase,
    /// `Some(reason)` when the participant refused.
    pub rejected: Option<String>,
    /// The body (for a refusal: the reason).
    pub payload: Bytes,
}

impl Reply {
    /// The reply a message carries, `None` when it is not a saga reply.
    pub fn from_message(m: &Message) -> Option<Self> {
        let h = |n: &str| m.headers.get(n).map(String::as_str);
        let phase = match h(headers::SAGA_PHASE)? {
            "do" => Phase::Do,
            "undo" => Phase::Undo,
            _ => return None,
        };
        let rejected = match h(headers::OUTCOME)? {
            "ok" => None,
            "rejected" => Some(String::from_utf8_lossy(&m.payload).into_owned()),
            _ => return None,
        };
        Some(Self {
            saga_id: h(headers::SAGA_ID)?.to_string(),
            step: h(headers::SAGA_STEP)?.parse().ok()?,
            phase,
            rejected,
            payload: m.payload.clone(),
        })
    }
}

/// What a participant answers to `command`.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Done; the body goes to the step's `on_reply`.
    Ok(Bytes),
    /// Refused, with the reason.
    Rejected(String),
}

/// The reply to `command` (a message a [`Step::command`] sent): the topic to
/// publish it to and the message, carrying the saga's headers back and the
/// command as its cause. `None` when `command` is not a saga command. A
/// participant keeps each idempotency key's outcome and answers a repeated command
/// with the same one.
pub fn reply(command: &Message, outcome: Outcome) -> Option<(String, OutgoingMessage)> {
    let h = |n: &str| command.headers.get(n).cloned();
    let topic = h(headers::REPLY_TO)?;
    let (label, payload) = match outcome {
        Outcome::Ok(b) => ("ok", b),
        Outcome::Rejected(why) => ("rejected", Bytes::from(why.into_bytes())),
    };
    let msg = OutgoingMessage::new(payload)
        .caused_by(command)
        .with_key(h(headers::SAGA_ID)?)
        .with_header(headers::SAGA_ID, h(headers::SAGA_ID)?)
        .with_header(headers::SAGA_STEP, h(headers::SAGA_STEP)?)
        .with_header(headers::SAGA_PHASE, h(headers::SAGA_PHASE)?)
        .with_header(headers::OUTCOME, label);
    Some((topic, msg))
}

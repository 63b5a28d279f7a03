//! The protocol's messages, as they travel in JSON between coordinator and
//! participants, and the states both sides report.

use serde::{Deserialize, Serialize};
use shoal_core::{Error, ErrorKind, Origin};

/// Longest transaction id.
pub const MAX_TX_ID_LEN: usize = 128;

/// A transaction id is 1 to 128 of `A-Z a-z 0-9 . _ : -`: it travels in URL paths
/// and log lines, so nothing there needs escaping.
pub fn validate_tx_id(tx_id: &str) -> Result<(), Error> {
    let ok = !tx_id.is_empty()
        && tx_id.len() <= MAX_TX_ID_LEN
        && tx_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            Origin::Downstream,
            format!("transaction id {tx_id:?}: use 1 to {MAX_TX_ID_LEN} of A-Z a-z 0-9 . _ : -"),
        ))
    }
}

/// A participant's answer to prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    /// The change is durable and held: the participant can commit it, and will not
    /// give it up until told the outcome.
    Yes,
    /// The participant cannot or will not do its part; it holds nothing.
    No,
}

/// What was decided for a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every participant voted yes and the coordinator logged commit.
    Commit,
    /// Anything else (presumed abort: no decision record means abort).
    Abort,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Abort => "abort",
        }
    }
}

/// The coordinator's answer to "what was decided for tx X?".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Decided commit.
    Commit,
    /// Decided abort (or never begun here).
    Abort,
    /// Still collecting votes, within its prepare deadline: ask again later.
    Pending,
}

impl From<Outcome> for Decision {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Commit => Self::Commit,
            Outcome::Abort => Self::Abort,
        }
    }
}

/// `POST {participant}/prepare`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    /// The transaction.
    pub tx_id: String,
    /// Where the participant asks for the outcome if it is left in doubt.
    pub coordinator: String,
    /// Unix ms after which the coordinator no longer waits for this vote; a
    /// participant still preparing then gives up and votes no.
    pub deadline_ms: u64,
    /// What this participant is asked to do, in its own terms.
    pub payload: serde_json::Value,
}

/// The answer to prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareAnswer {
    /// The participant's vote.
    pub vote: Vote,
}

/// `POST {participant}/commit`, `POST {participant}/abort` and
/// `POST {coordinator}/decision`: which transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxRef {
    /// The transaction.
    pub tx_id: String,
}

/// The coordinator's answer to a decision query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionAnswer {
    /// The transaction asked about.
    pub tx_id: String,
    /// What was decided.
    pub decision: Decision,
}

/// A participant's state for one transaction, as its state row holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantState {
    /// Voted yes; the change is held until the outcome is known.
    Prepared,
    /// The change is applied.
    Committed,
    /// The change was rolled back, or never made.
    Aborted,
}

impl ParticipantState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "prepared" => Ok(Self::Prepared),
            "committed" => Ok(Self::Committed),
            "aborted" => Ok(Self::Aborted),
            other => Err(Error::internal(format!(
                "unknown participant state {other:?} in _shoal_2pc_participant"
            ))),
        }
    }
}

/// One transaction as a participant sees it (`GET {participant}/tx/{tx_id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParticipantTx {
    /// The transaction.
    pub tx_id: String,
    /// Where it stands here.
    pub state: ParticipantState,
    /// The coordinator that asked this participant to prepare (empty for a
    /// transaction aborted before any prepare arrived).
    pub coordinator: String,
    /// When it was prepared (or first recorded), unix ms.
    pub prepared_at_ms: u64,
    /// When it was committed or aborted here, unix ms.
    pub finished_at_ms: Option<u64>,
}

/// A coordinator's state for one transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordinatorState {
    /// Begun, collecting votes; no decision logged.
    Preparing,
    /// Decided commit.
    Commit,
    /// Decided abort.
    Abort,
}

impl CoordinatorState {
    pub(crate) fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "preparing" => Ok(Self::Preparing),
            "commit" => Ok(Self::Commit),
            "abort" => Ok(Self::Abort),
            other => Err(Error::internal(format!(
                "unknown coordinator state {other:?} in _shoal_2pc_coordinator_tx"
            ))),
        }
    }

    /// The decision, if one was logged.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            Self::Preparing => None,
            Self::Commit => Some(Outcome::Commit),
            Self::Abort => Some(Outcome::Abort),
        }
    }
}

/// One participant of a transaction, as the coordinator tracks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchStatus {
    /// The participant's endpoint.
    pub endpoint: String,
    /// Whether it acknowledged the decision.
    pub acked: bool,
}

/// One transaction as the coordinator sees it (`GET {coordinator}/tx/{tx_id}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorTx {
    /// The transaction.
    pub tx_id: String,
    /// Its state: preparing, or the decision.
    pub state: CoordinatorState,
    /// Every participant acknowledged the decision.
    pub done: bool,
    /// Unix ms after which an undecided transaction is decided abort on a query.
    pub deadline_ms: u64,
    /// Its participants.
    pub participants: Vec<BranchStatus>,
}

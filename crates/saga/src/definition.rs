//! A saga's definition: its steps, each an action with a compensation, or declared
//! the pivot or retriable. The types make an undeclared step impossible to write;
//! [`SagaBuilder::build`] checks the order of the kinds.

use crate::{Command, Reply, StepCtx};
use shoal_core::Error;
use shoal_resilience::RetryConfig;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The most steps a saga may have.
pub const MAX_STEPS: usize = 64;

/// Why a step did not succeed.
#[derive(Debug)]
pub enum StepError {
    /// The participant refused (a business rule: out of stock, card declined).
    /// Nothing was applied, so repeating is pointless and this step needs no
    /// compensation; the saga compensates the steps before it.
    Rejected(String),
    /// The call failed. Retried under the step's policy when the error is
    /// retryable; when the attempts run out the step's effect is uncertain, so a
    /// compensable step is compensated too (compensations must accept "nothing to
    /// undo").
    Failed(Error),
}

impl StepError {
    /// A refusal with its reason.
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::Rejected(reason.into())
    }
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        Self::Failed(e)
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(r) => write!(f, "rejected: {r}"),
            Self::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// The future an action returns: the saga's data after the step.
pub type StepFuture<D> = Pin<Box<dyn Future<Output = Result<D, StepError>> + Send>>;

type CallFn<D, E> = Arc<dyn Fn(StepCtx<E>, D) -> StepFuture<D> + Send + Sync>;
type CommandFn<D, E> = Arc<dyn Fn(&StepCtx<E>, &D) -> Result<Command, StepError> + Send + Sync>;
type ReplyFn<D> = Arc<dyn Fn(D, &Reply) -> Result<D, StepError> + Send + Sync>;

/// How an action or a compensation is carried out.
pub(crate) enum Action<D, E> {
    /// A call the orchestrator awaits (an HTTP request to a participant, say).
    Call(CallFn<D, E>),
    /// A command message to a participant, then its reply event.
    Command {
        build: CommandFn<D, E>,
        on_reply: ReplyFn<D>,
    },
}

impl<D, E> Clone for Action<D, E> {
    fn clone(&self) -> Self {
        match self {
            Self::Call(f) => Self::Call(f.clone()),
            Self::Command { build, on_reply } => Self::Command {
                build: build.clone(),
                on_reply: on_reply.clone(),
            },
        }
    }
}

impl<D: 'static, E: 'static> Action<D, E> {
    /// A synchronous call: `f(cx, data)` returns the data after the step.
    pub(crate) fn call<F, Fut>(f: F) -> Self
    where
        F: Fn(StepCtx<E>, D) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<D, StepError>> + Send + 'static,
    {
        Self::Call(Arc::new(move |cx, d| Box::pin(f(cx, d))))
    }
}

/// What kind of step this is, which says what may follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Has a compensation: undone when a later step fails.
    Compensable,
    /// The go/no-go step: once it succeeds the saga only goes forward. It has no
    /// compensation; when it fails, the steps before it are compensated.
    Pivot,
    /// After the pivot: cannot fail for good, so it is retried until it succeeds.
    Retriable,
}

impl StepKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Compensable => "compensable",
            Self::Pivot => "pivot",
            Self::Retriable => "retriable",
        }
    }
}

/// A step being defined: [`StepBuilder::compensate`], [`StepBuilder::pivot`] or
/// [`StepBuilder::retriable`] turns it into a [`Step`], the only thing a saga takes.
#[must_use = "a step needs a compensation, or to be declared the pivot or retriable"]
pub struct StepBuilder<D, E> {
    name: String,
    action: Action<D, E>,
}

/// One step of a saga.
pub struct Step<D, E> {
    pub(crate) name: String,
    pub(crate) kind: StepKind,
    pub(crate) action: Action<D, E>,
    pub(crate) compensation: Option<Action<D, E>>,
    pub(crate) retry: RetryConfig,
    pub(crate) timeout: Duration,
}

impl<D: 'static, E: 'static> Step<D, E> {
    /// A step whose action is a call: `action(cx, data)` does the work (passing
    /// `cx.idempotency_key()` so a repeat has no second effect) and returns the
    /// saga's data after it.
    #[allow(clippy::new_ret_no_self)]
    pub fn new<F, Fut>(name: impl Into<String>, action: F) -> StepBuilder<D, E>
    where
        F: Fn(StepCtx<E>, D) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<D, StepError>> + Send + 'static,
    {
        StepBuilder {
            name: name.into(),
            action: Action::call(action),
        }
    }

    /// A step whose action is a command message: `build(cx, data)` says what to
    /// send, the participant answers with a reply event (see [`crate::reply`]),
    /// and `on_reply(data, reply)` returns the data after the step, or an error
    /// for a refusal. Needs an orchestrator with a bus.
    pub fn command<B, R>(name: impl Into<String>, build: B, on_reply: R) -> StepBuilder<D, E>
    where
        B: Fn(&StepCtx<E>, &D) -> Result<Command, StepError> + Send + Sync + 'static,
        R: Fn(D, &Reply) -> Result<D, StepError> + Send + Sync + 'static,
    {
        StepBuilder {
            name: name.into(),
            action: Action::Command {
                build: Arc::new(build),
                on_reply: Arc::new(on_reply),
            },
        }
    }

    /// Attempts, backoff and their cap for this step's action and compensation
    /// (the resilience crate's retry settings; its budget fields are not used).
    /// Default: 3 attempts, 25 ms base, 1 s cap.
    #[must_use]
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// The longest one attempt may take (default 5 s); an attempt that takes
    /// longer is a retryable failure.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The step's kind.
    pub fn kind(&self) -> StepKind {
        self.kind
    }
}

impl<D: 'static, E: 'static> StepBuilder<D, E> {
    fn finish(self, kind: StepKind, compensation: Option<Action<D, E>>) -> Step<D, E> {
        Step {
            name: self.name,
            kind,
            action: self.action,
            compensation,
            retry: RetryConfig::default(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The compensation, a call: undoes the action's effect (again under the
    /// step's idempotency key, so a repeat has no second effect). It must succeed
    /// even when the action had no effect, and it is retried until it does.
    pub fn compensate<F, Fut>(self, compensation: F) -> Step<D, E>
    where
        F: Fn(StepCtx<E>, D) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<D, StepError>> + Send + 'static,
    {
        self.finish(StepKind::Compensable, Some(Action::call(compensation)))
    }

    /// The compensation, a command message with a reply event.
    pub fn compensate_with_command<B, R>(self, build: B, on_reply: R) -> Step<D, E>
    where
        B: Fn(&StepCtx<E>, &D) -> Result<Command, StepError> + Send + Sync + 'static,
        R: Fn(D, &Reply) -> Result<D, StepError> + Send + Sync + 'static,
    {
        let comp = Action::Command {
            build: Arc::new(build),
            on_reply: Arc::new(on_reply),
        };
        self.finish(StepKind::Compensable, Some(comp))
    }

    /// No compensation: this is the saga's pivot.
    pub fn pivot(self) -> Step<D, E> {
        self.finish(StepKind::Pivot, None)
    }

    /// No compensation: retried until it succeeds (after the pivot).
    pub fn retriable(self) -> Step<D, E> {
        self.finish(StepKind::Retriable, None)
    }
}

/// A checked saga definition: a name and its steps.
pub struct Saga<D, E = ()> {
    pub(crate) name: String,
    pub(crate) steps: Vec<Step<D, E>>,
}

impl<D, E> fmt::Debug for Saga<D, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: Vec<_> = self
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.kind))
            .collect();
        f.debug_struct("Saga")
            .field("name", &self.name)
            .field("steps", &steps)
            .finish()
    }
}

impl<D: 'static, E: 'static> Saga<D, E> {
    /// Start defining saga `name` (letters, digits, `-`, `_`, `.`).
    pub fn builder(name: impl Into<String>) -> SagaBuilder<D, E> {
        SagaBuilder {
            name: name.into(),
            steps: Vec::new(),
        }
    }

    /// The saga's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its steps, in order.
    pub fn steps(&self) -> &[Step<D, E>] {
        &self.steps
    }
}

/// Collects the steps of a [`Saga`].
pub struct SagaBuilder<D, E> {
    name: String,
    steps: Vec<Step<D, E>>,
}

impl<D: 'static, E: 'static> SagaBuilder<D, E> {
    /// Add the next step.
    #[must_use]
    pub fn step(mut self, step: Step<D, E>) -> Self {
        self.steps.push(step);
        self
    }

    /// Check the definition: a valid name; 1 to [`MAX_STEPS`] steps with distinct
    /// names; compensable steps first, then at most one pivot, then retriable
    /// steps only (a compensation after the point of no return could never run,
    /// and a retriable step before a compensable one could never be undone).
    pub fn build(self) -> Result<Saga<D, E>, Error> {
        let bad = |what: String| Err(Error::config(format!("saga {}: {what}", self.name)));
        shoal_bus::validate_name("saga name", &self.name)?;
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return bad(format!(
                "has {} steps; a saga has 1 to {MAX_STEPS}",
                self.steps.len()
            ));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 100 {
                return bad(format!("step {i} needs a name of 1 to 100 characters"));
            }
            if self.steps[..i].iter().any(|p| p.name == s.name) {
                return bad(format!("two steps are named {}", s.name));
            }
            if s.retry.max_attempts == 0 || s.retry.max_delay_ms < s.retry.base_delay_ms {
                return bad(format!(
                    "step {}: retry needs max_attempts >= 1 and max_delay_ms >= base_delay_ms",
                    s.name
                ));
            }
            if s.timeout.is_zero() {
                return bad(format!("step {}: the timeout must be above zero", s.name));
            }
        }
        // The kinds must read compensable* pivot? retriable*.
        let mut past_no_return: Option<&Step<D, E>> = None;
        for s in &self.steps {
            match (s.kind, past_no_return) {
                (StepKind::Compensable, Some(p)) => {
                    return bad(format!(
                        "step {} has a compensation but comes after {} step {}, after which \
                         nothing is compensated; declare it retriable",
                        s.name,
                        p.kind.as_str(),
                        p.name
                    ))
                }
                (StepKind::Pivot, Some(p)) => {
                    return bad(format!(
                        "step {} is a pivot after {} step {}; a saga has one point of no return",
                        s.name,
                        p.kind.as_str(),
                        p.name
                    ))
                }
                (StepKind::Pivot | StepKind::Retriable, None) => past_no_return = Some(s),
                _ => {}
            }
        }
        Ok(Saga {
            name: self.name,
            steps: self.steps,
        })
    }
}

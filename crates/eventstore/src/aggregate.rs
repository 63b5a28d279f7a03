//! Aggregates: state rebuilt from a stream's events (and its latest snapshot), a
//! decision that turns a command into new events, and an append that expects the
//! version the decision saw, tried again on a conflict.

use crate::store::EventStore;
use crate::types::{Appended, Direction, ExpectedVersion, Metadata, NewEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_core::{Error, ErrorKind};

/// Most times [`EventStore::execute`] decides again after a conflict.
pub const MAX_CONFLICT_RETRIES: u32 = 32;

/// A consistency boundary kept as events.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync {
    /// Its events.
    type Event: Serialize + DeserializeOwned + Send + Sync;
    /// Streams of this aggregate are `<KIND>-<id>`.
    const KIND: &'static str;
    /// The version of the events' shape written now.
    const EVENT_VERSION: u32 = 1;
    /// Save a snapshot every this many events (0: never).
    const SNAPSHOT_EVERY: u64 = 0;

    /// The type name stored with `event`.
    fn event_type(event: &Self::Event) -> &'static str;

    /// Fold one event into the state.
    fn apply(&mut self, event: &Self::Event);
}

/// An aggregate's state and the stream version it reflects.
#[derive(Debug)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The version of its stream the state includes (0: no events yet).
    pub version: u64,
}

/// The stream of aggregate `A` with id `id`.
pub fn stream_of<A: Aggregate>(id: &str) -> String {
    format!("{}-{id}", A::KIND)
}

impl EventStore {
    /// Load aggregate `id`: its snapshot, then the events after it.
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>, Error> {
        let stream = stream_of::<A>(id);
        let (mut state, mut version) = match self.load_snapshot(&stream).await? {
            Some(s) => match serde_json::from_value::<A>(s.data) {
                Ok(state) => (state, s.version),
                // A snapshot of an older shape: rebuild from the events instead.
                Err(e) => {
                    tracing::warn!(stream, error = %e, "snapshot does not decode; replaying the stream");
                    (A::default(), 0)
                }
            },
            None => (A::default(), 0),
        };
        loop {
            let batch = self
                .read_stream(&stream, version + 1, Direction::Forwards, 1_000)
                .await?;
            let Some(last) = batch.last() else { break };
            let last_version = last.version;
            for e in &batch {
                state.apply(&e.decode::<A::Event>()?);
            }
            version = last_version;
        }
        Ok(Loaded { state, version })
    }

    /// Load aggregate `id`, let `decide` turn its state into new events, and append
    /// them expecting the version decided on; on a conflict (another writer came
    /// first) load and decide again, up to [`MAX_CONFLICT_RETRIES`] times. Returns the
    /// new state and what was appended (`None` when `decide` returned no events).
    pub async fn execute<A, F>(
        &self,
        id: &str,
        metadata: Metadata,
        decide: F,
    ) -> Result<(A, Option<Appended>), Error>
    where
        A: Aggregate,
        F: Fn(&A) -> Result<Vec<A::Event>, Error>,
    {
        let stream = stream_of::<A>(id);
        let mut attempt = 0;
        loop {
            let Loaded { mut state, version } = self.load::<A>(id).await?;
            let events = decide(&state)?;
            if events.is_empty() {
                return Ok((state, None));
            }
            let new: Vec<NewEvent> = events
                .iter()
                .map(|e| {
                    NewEvent::new(A::event_type(e), A::EVENT_VERSION, e)
                        .map(|n| n.with_metadata(metadata.clone()))
                })
                .collect::<Result<_, _>>()?;
            let expected = if version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(version)
            };
            match self.append(&stream, expected, new).await {
                Ok(appended) => {
                    for e in &events {
                        state.apply(e);
                    }
                    let every = A::SNAPSHOT_EVERY;
                    if every > 0 && appended.version / every > version / every {
                        let data = serde_json::to_value(&state)
                            .map_err(|e| Error::internal("encoding a snapshot").with_source(e))?;
                        // A failed snapshot costs replay time, never correctness.
                        if let Err(e) = self.save_snapshot(&stream, appended.version, &data).await {
                            tracing::warn!(stream, error = %e, "snapshot not saved");
                        }
                    }
                    return Ok((state, Some(appended)));
                }
                Err(e) if e.kind() == ErrorKind::Conflict && attempt < MAX_CONFLICT_RETRIES => {
                    attempt += 1;
                    tracing::debug!(stream, attempt, "conflict; deciding again");
                    // A random pause, so writers that lost together do not collide
                    // again in the same group commit. Its range doubles with each
                    // loss (to 64 ms): on a busy machine, where commits are slow,
                    // a short fixed range let one writer lose every round until it
                    // ran out of retries while the others kept winning.
                    let ms = fastrand::u64(0..=(1u64 << attempt.min(6)));
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

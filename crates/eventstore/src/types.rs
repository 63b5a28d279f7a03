//! What goes into the store and what comes out.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shoal_core::{Error, ErrorKind, Origin};
use std::collections::BTreeMap;

/// Limits that keep one stream or one append from taking the store down.
pub mod limits {
    /// Longest stream id.
    pub const MAX_STREAM_ID_LEN: usize = 200;
    /// Longest event type name.
    pub const MAX_EVENT_TYPE_LEN: usize = 200;
    /// Largest event (data and metadata as stored).
    pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
    /// Most events in one append.
    pub const MAX_EVENTS_PER_APPEND: usize = 1_000;
    /// Most events one read returns.
    pub const MAX_READ: usize = 10_000;
}

/// What the writer expects a stream's version to be (optimistic concurrency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the version.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event must have this version (1 for the first event).
    Exact(u64),
}

/// Who and what caused an event; carried with it for tracing and auditing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Ties together everything one request or workflow caused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The message or command that directly caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Anything else (trace id, user).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

/// An event to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Its id; a re-sent append with the same id is recognised (see
    /// [`crate::EventStore::append`]).
    pub id: String,
    /// Its type (`OrderPlaced`).
    pub event_type: String,
    /// The version of its type's shape; readers upcast older ones.
    pub type_version: u32,
    /// Its content, as JSON.
    pub data: serde_json::Value,
    /// Who and what caused it.
    pub metadata: Metadata,
}

impl NewEvent {
    /// An event from a serializable value, with a fresh time-ordered id.
    pub fn new<T: Serialize>(event_type: &str, type_version: u32, data: &T) -> Result<Self, Error> {
        let data = serde_json::to_value(data).map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                Origin::Internal,
                format!("event {event_type} cannot be encoded as JSON"),
            )
            .with_source(e)
        })?;
        Ok(Self {
            // Time-ordered (UUIDv7): unique without a check by the store, and
            // readable in the order they were made.
            id: uuid::Uuid::now_v7().to_string(),
            event_type: event_type.to_string(),
            type_version,
            data,
            metadata: Metadata::default(),
        })
    }

    /// The same event with this metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    /// Its place in the store's global order: 1, 2, 3, … with no gaps a reader sees.
    pub position: u64,
    /// Its stream.
    pub stream: String,
    /// Its place in its stream: 1, 2, 3, …
    pub version: u64,
    /// Its id.
    pub id: String,
    /// Its type.
    pub event_type: String,
    /// The version of its type's shape, after upcasting.
    pub type_version: u32,
    /// Its content (upcast to the current shape when an upcaster is registered).
    pub data: serde_json::Value,
    /// Who and what caused it.
    pub metadata: Metadata,
    /// When the store recorded it (Unix ms).
    pub recorded_at_ms: u64,
}

impl RecordedEvent {
    /// Decode the content into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_value(self.data.clone()).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                Origin::Internal,
                format!(
                    "event {} (stream {} version {}) does not decode as the expected type",
                    self.event_type, self.stream, self.version
                ),
            )
            .with_source(e)
        })
    }
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Appended {
    /// The stream's version after the append.
    pub version: u64,
    /// The global position of the last event appended.
    pub position: u64,
}

/// Which way to read a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Forwards,
    /// Newest first.
    Backwards,
}

/// A stream id: 1 to 200 visible ASCII characters.
pub fn validate_stream_id(stream: &str) -> Result<(), Error> {
    if stream.is_empty()
        || stream.len() > limits::MAX_STREAM_ID_LEN
        || !stream.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            Origin::Downstream,
            format!(
                "stream id {stream:?}: must be 1 to {} visible ASCII characters",
                limits::MAX_STREAM_ID_LEN
            ),
        ));
    }
    Ok(())
}

/// The conflict error of an append whose expected version did not hold.
pub(crate) fn conflict(stream: &str, expected: ExpectedVersion, actual: u64) -> Error {
    let expected = match expected {
        ExpectedVersion::Any => "any version".to_string(),
        ExpectedVersion::NoStream => "no stream".to_string(),
        ExpectedVersion::Exact(v) => format!("version {v}"),
    };
    Error::new(
        ErrorKind::Conflict,
        Origin::Downstream,
        format!("stream {stream}: expected {expected}, but it is at version {actual}"),
    )
    .with_retryable(false)
}

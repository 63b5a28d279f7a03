//! async-nats failures as the platform's errors: what went wrong, from where, and
//! whether trying again may help.

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishErrorKind, RequestErrorKind};
use async_nats::jetstream::ErrorCode;
use shoal_core::{Error, ErrorKind, Origin};
use std::fmt::Display;

pub(crate) fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, Origin::Downstream, message)
}

pub(crate) fn not_found(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::NotFound, Origin::Downstream, message)
}

pub(crate) fn conflict(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Conflict, Origin::Downstream, message)
}

/// The server did not answer, or the connection is down: retryable.
pub(crate) fn unavailable(
    what: impl Display,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::unavailable(format!("{what}: the NATS server did not answer")).with_source(source)
}

/// A JetStream API call failed before the server answered.
pub(crate) fn request(what: impl Display, e: jetstream::context::RequestError) -> Error {
    match e.kind() {
        // No responders on the API subject: JetStream is not enabled (or not yet ready).
        RequestErrorKind::NoResponders => Error::unavailable(format!(
            "{what}: JetStream does not answer on this server (is it enabled?)"
        ))
        .with_source(e),
        RequestErrorKind::TimedOut => unavailable(what, e),
        _ => Error::new(
            ErrorKind::Protocol,
            Origin::Upstream,
            format!("{what}: the JetStream API call failed"),
        )
        .with_source(e),
    }
}

/// The JetStream API answered with an error the caller did not expect.
pub(crate) fn api(what: impl Display, e: jetstream::Error) -> Error {
    let code = e.error_code();
    let kind = if code == ErrorCode::STREAM_NOT_FOUND || code == ErrorCode::CONSUMER_NOT_FOUND {
        ErrorKind::NotFound
    } else if code == ErrorCode::STREAM_NAME_EXIST
        || code == ErrorCode::STREAM_SUBJECT_OVERLAP
        || code == ErrorCode::CONSUMER_NAME_EXIST
    {
        ErrorKind::Conflict
    } else if code == ErrorCode::JETSTREAM_NOT_ENABLED
        || code == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
    {
        ErrorKind::Config
    } else if e.code() == 503 {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Protocol
    };
    Error::new(kind, Origin::Upstream, format!("{what}: JetStream refused")).with_source(e)
}

/// A publish failed (after validation: the caller's input was fine).
pub(crate) fn publish(topic: &str, e: jetstream::context::PublishError) -> Error {
    match e.kind() {
        PublishErrorKind::StreamNotFound => {
            not_found(format!("topic {topic} does not exist")).with_source(e)
        }
        PublishErrorKind::MaxPayloadExceeded => invalid(format!(
            "a message to {topic} is over the NATS server's max_payload"
        ))
        .with_source(e),
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => Error::unavailable(format!(
            "publish to {topic}: no acknowledgement from the NATS server; \
             the message may or may not be stored (publish it again with the same id: \
             JetStream drops the duplicate)"
        ))
        .with_source(e),
        _ => Error::new(
            ErrorKind::Protocol,
            Origin::Upstream,
            format!("publish to {topic}: JetStream refused"),
        )
        .with_source(e),
    }
}

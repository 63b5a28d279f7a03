//! Small helpers: lock handling, error constructors, the storage error mapping.

use crate::protocol::UnknownMember;
use shoal_core::{Error, ErrorKind, Origin};
use std::sync::{Mutex, MutexGuard};

/// Locks `m`. A panic while it was held leaves state that is still consistent
/// for our uses (every critical section is a plain update), so go on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The caller's input is refused.
pub(crate) fn invalid(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, Origin::Downstream, what)
}

/// The thing asked for does not exist.
pub(crate) fn not_found(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::NotFound, Origin::Downstream, what)
}

/// A bounded resource is full; `retryable` says whether waiting may help.
pub(crate) fn overloaded(what: impl Into<String>, retryable: bool) -> Error {
    Error::new(ErrorKind::Overloaded, Origin::Internal, what).with_retryable(retryable)
}

/// The broker is shutting down.
pub(crate) fn closing() -> Error {
    Error::new(
        ErrorKind::Unavailable,
        Origin::Internal,
        "the broker is shutting down",
    )
}

/// The member id is not in any group (left, lease expired, or broker restarted).
pub(crate) fn unknown_member(id: u64) -> Error {
    Error::new(
        ErrorKind::NotFound,
        Origin::Downstream,
        format!("member {id} is not in a group (it left, its lease ran out, or the broker restarted); join again"),
    )
    .with_source(UnknownMember)
}

/// A storage error as the platform's error.
pub(crate) fn from_log(e: shoal_log::Error) -> Error {
    use shoal_log::Error as L;
    let (kind, origin, retryable) = match &e {
        L::TooLarge { .. } | L::EmptyBatch | L::InvalidArgument(_) => {
            (ErrorKind::InvalidInput, Origin::Downstream, false)
        }
        L::OffsetOutOfRange { .. } => (ErrorKind::NotFound, Origin::Downstream, false),
        // A closed log belongs to a broker going down; a restarted one will answer.
        L::Closed | L::AlreadyOpen { .. } => (ErrorKind::Unavailable, Origin::Internal, true),
        L::Io { .. } | L::WriterFailed { .. } => (ErrorKind::Io, Origin::Internal, e.retryable()),
        _ => (ErrorKind::Internal, Origin::Internal, false),
    };
    Error::new(kind, origin, "broker storage")
        .with_source(e)
        .with_retryable(retryable)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which configured limit a refused append ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// One record's encoded frame is larger than `LogConfig::max_record_bytes`.
    RecordBytes {
        /// Position of the offending record inside the batch.
        index: usize,
    },
    /// The batch has more records than `LogConfig::max_batch_records`.
    BatchRecords,
    /// The batch's encoded size is larger than `LogConfig::max_batch_bytes`.
    BatchBytes,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::RecordBytes { index } => write!(f, "record {index} of the batch (bytes)"),
            Limit::BatchRecords => f.write_str("batch (records)"),
            Limit::BatchBytes => f.write_str("batch (bytes)"),
        }
    }
}

/// Everything that can go wrong in this crate.
///
/// The enum is `Clone` because one failed group commit has to be reported to
/// every appender that shared it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being attempted ("open", "fsync", "read", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Arc<io::Error>,
    },
    /// A frame failed its checksum or is malformed somewhere it cannot be a torn write.
    #[error(
        "corrupt data in {} at byte {position} (record offset {offset}): {reason}",
        segment.display()
    )]
    Corrupt {
        /// The segment file.
        segment: PathBuf,
        /// Byte position of the bad frame inside the segment file.
        position: u64,
        /// The offset the record at that position should have had.
        offset: u64,
        /// What check failed.
        reason: &'static str,
    },
    /// A non-segment file (consumer offsets) is unreadable.
    #[error("corrupt file {}: {reason}", path.display())]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// What check failed.
        reason: &'static str,
    },
    /// An append was refused because it exceeds a configured limit; nothing was written.
    #[error("{what} is {size}, over the limit of {limit}")]
    TooLarge {
        /// Which limit.
        what: Limit,
        /// The size of the refused item.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A read asked for an offset that is not in the log (deleted by retention, or not yet written).
    #[error("offset {requested} is out of range: the log holds [{first}, {next})")]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// The first offset still retained.
        first: u64,
        /// The next offset to be assigned (the durable high-water mark).
        next: u64,
    },
    /// An append with no records.
    #[error("empty batch")]
    EmptyBatch,
    /// The log was closed.
    #[error("log is closed")]
    Closed,
    /// An earlier write or fsync failed; the log refuses appends until reopened,
    /// because after a failed fsync the kernel's view of the file can no longer be trusted.
    #[error("log writer stopped after an earlier failure: {cause}")]
    WriterFailed {
        /// The first failure, as text.
        cause: String,
    },
    /// Another `Log` holds the directory's lock file.
    #[error("log directory {} is already open", dir.display())]
    AlreadyOpen {
        /// The directory.
        dir: PathBuf,
    },
    /// An argument is unusable (e.g. an absurdly long group name).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The configuration is inconsistent.
    #[error("invalid log config: {0}")]
    InvalidConfig(String),
}

impl Error {
    /// Whether repeating the same call later, on the same object, may succeed.
    ///
    /// Corruption, limits, out-of-range offsets and a closed or failed log
    /// need a change by the caller or an operator, so they are not retryable.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            // The previous owner of the directory may just be shutting down.
            Error::AlreadyOpen { .. } => true,
            Error::Corrupt { .. }
            | Error::CorruptFile { .. }
            | Error::TooLarge { .. }
            | Error::OffsetOutOfRange { .. }
            | Error::EmptyBatch
            | Error::Closed
            | Error::WriterFailed { .. }
            | Error::InvalidArgument(_)
            | Error::InvalidConfig(_) => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Error {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

/// Shorthand for `map_err(io_err("op", path))`.
pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| Error::io(op, path, e)
}

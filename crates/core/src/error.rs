use std::fmt;

/// Where a failure came from, from the point of view of the component that reports it.
///
/// Resilience policies need this: a breaker counts upstream failures, never a
/// caller's bad input; a retry never repeats a downstream (caller) error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A dependency we called failed or could not be reached.
    Upstream,
    /// Our caller sent something we cannot accept.
    Downstream,
    /// Something inside this process went wrong (disk, config, a bug).
    Internal,
}

/// What kind of failure happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Input failed validation.
    InvalidInput,
    /// The thing asked for does not exist.
    NotFound,
    /// The request conflicts with current state.
    Conflict,
    /// No healthy instance, a refused connection, or a 503 from a dependency.
    Unavailable,
    /// A time limit ran out.
    Timeout,
    /// A bounded resource (queue, pool, body, rate) is full.
    Overloaded,
    /// A circuit breaker is open: the dependency is failing and calls fail fast
    /// without reaching it. Trying again at once will not help; later may.
    CircuitOpen,
    /// Bad configuration, found at start.
    Config,
    /// A file or socket operation failed.
    Io,
    /// A dependency answered with an unexpected status or body.
    Protocol,
    /// Anything else.
    Internal,
}

impl ErrorKind {
    /// Whether errors of this kind may succeed when tried again, all else equal.
    pub fn default_retryable(self) -> bool {
        matches!(self, Self::Unavailable | Self::Timeout | Self::Overloaded)
    }
}

/// The platform's error: a kind, an origin, a retryability verdict and a message,
/// with the underlying cause kept for the chain.
pub struct Error {
    kind: ErrorKind,
    origin: Origin,
    retryable: bool,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error; retryability defaults from the kind.
    pub fn new(kind: ErrorKind, origin: Origin, message: impl Into<String>) -> Self {
        Self {
            kind,
            origin,
            retryable: kind.default_retryable(),
            message: message.into(),
            source: None,
        }
    }

    /// A configuration error (found at start, never retryable).
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, Origin::Internal, message)
    }

    /// An internal error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, Origin::Internal, message)
    }

    /// A dependency could not be reached or has no healthy instance.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, Origin::Upstream, message)
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Override the retryability verdict.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Where it came from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Whether trying again may help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The message, without the cause chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("origin", &self.origin)
            .field("retryable", &self.retryable)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, Origin::Internal, "i/o error").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_follows_kind_unless_overridden() {
        assert!(Error::unavailable("x").is_retryable());
        assert!(!Error::config("x").is_retryable());
        assert!(!Error::unavailable("x").with_retryable(false).is_retryable());
    }

    #[test]
    fn display_includes_cause() {
        let e = Error::internal("reading state").with_source(std::io::Error::other("disk gone"));
        assert_eq!(e.to_string(), "reading state: disk gone");
    }
}

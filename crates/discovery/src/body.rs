//! Reading a whole response body, within a limit.

use bytes::Bytes;
use http_body_util::BodyExt;
use shoal_core::{Error, ErrorKind, Origin};

/// Read all of `body`, refusing more than `limit` bytes. A failure (the peer went
/// away mid-body, or sent too much) is an upstream `Unavailable` error saying `what`
/// was being read.
pub(crate) async fn read_limited<B>(
    body: B,
    limit: usize,
    what: impl FnOnce() -> String,
) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(Error::new(ErrorKind::Unavailable, Origin::Upstream, what())
            .with_source(std::io::Error::other(e.to_string()))),
    }
}

//! The context of the request being handled, visible anywhere in its task.

use crate::spans::Tracer;
use shoal_core::deadline::Deadline;
use shoal_core::trace::TraceContext;
use std::future::Future;

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// What a request carries through a process and on to the services it calls.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// The request id (the client's own when it sent a valid one).
    pub request_id: String,
    /// This hop's position in the trace.
    pub trace: TraceContext,
    /// When the caller stops waiting; calls made for this request end by then.
    pub deadline: Option<Deadline>,
    /// Where the spans of this request's work go (calls it makes, messages it
    /// publishes): the tracer of the service handling it.
    pub tracer: Tracer,
}

impl RequestContext {
    /// A fresh context: new request id, new trace.
    pub fn new_root() -> Self {
        Self {
            request_id: new_request_id(),
            trace: TraceContext::new_root(),
            deadline: None,
            tracer: Tracer::disabled(),
        }
    }

    /// The context of background work (a consumed message, a saga step, a relay)
    /// at trace position `trace`, recording into `tracer`.
    pub fn background(trace: TraceContext, tracer: Tracer) -> Self {
        Self {
            request_id: new_request_id(),
            trace,
            deadline: None,
            tracer,
        }
    }

    /// The context of the request this task is handling, if any.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// `f` of the current context, without cloning it (the hot paths need a field
    /// or two, not a copy of the request id).
    pub fn with_current<R>(f: impl FnOnce(&RequestContext) -> R) -> Option<R> {
        CURRENT.try_with(f).ok()
    }

    /// Run `fut` with this context as the current one.
    pub fn scope<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }
}

/// A new request id (a random UUID, version 4).
pub fn new_request_id() -> String {
    // From the thread's fast generator, as trace ids are: a request id names a
    // request in logs and is no secret, and the OS generator would cost every
    // request a system call.
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_string()
}

/// Keep a client's request id only if it is short, visible ASCII: it ends up in logs
/// and headers, so nothing that could break either is accepted.
pub fn accept_request_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= shoal_core::headers::MAX_REQUEST_ID_LEN
        && value.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn current_is_visible_inside_scope_only() {
        assert!(RequestContext::current().is_none());
        let ctx = RequestContext::new_root();
        let id = ctx.request_id.clone();
        let seen = ctx
            .scope(async { RequestContext::current().map(|c| c.request_id) })
            .await;
        assert_eq!(seen, Some(id));
    }

    #[test]
    fn new_request_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(20) {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 4, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert_eq!(id, &u.hyphenated().to_string(), "lower case, hyphenated");
            assert!(accept_request_id(id));
        }
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(accept_request_id("abc-123"));
        assert!(!accept_request_id(""));
        assert!(!accept_request_id("a b"));
        assert!(!accept_request_id("x\n"));
        assert!(!accept_request_id(&"a".repeat(129)));
    }
}

//! The wire protocol's frames, shared by the server and the client. The layout is
//! specified in `docs/bus-protocol.md`; this file and that document must agree.
//!
//! Every integer is big-endian. A frame is `u32 length` (of what follows), `u8 kind`,
//! `u64 request id`, then a body whose layout depends on the kind.

use bytes::{Buf, Bytes, BytesMut};
use shoal_bus::{OutgoingMessage, Published, StartAt, SubscribeOptions, TopicSpec};
use shoal_core::{Error, ErrorKind, Origin};
use std::collections::BTreeMap;
use std::fmt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version spoken by this crate.
pub(crate) const VERSION: u16 = 1;
/// `kind` + request id: the smallest frame length.
pub(crate) const HEADER_LEN: u32 = 9;
/// Most headers on one message (the bus itself has no such limit; this one keeps
/// per-header framing overhead bounded).
pub(crate) const MAX_HEADERS: usize = 1024;
/// Length value of an absent optional string.
const NONE_LEN: u32 = u32::MAX;
/// `u64` value meaning "not set" (retention, nack delay).
pub(crate) const UNSET: u64 = u64::MAX;

/// Request kinds; an answer's kind is the request's with [`kind::ANSWER`] set, or
/// [`kind::ERROR`].
pub(crate) mod kind {
    pub(crate) const HELLO: u8 = 0x01;
    pub(crate) const CREATE_TOPIC: u8 = 0x02;
    pub(crate) const PUBLISH: u8 = 0x03;
    pub(crate) const JOIN: u8 = 0x04;
    pub(crate) const FETCH: u8 = 0x05;
    pub(crate) const ACK: u8 = 0x06;
    pub(crate) const NACK: u8 = 0x07;
    pub(crate) const HEARTBEAT: u8 = 0x08;
    pub(crate) const LEAVE: u8 = 0x09;
    pub(crate) const SEEK: u8 = 0x0A;
    pub(crate) const LAG: u8 = 0x0B;
    pub(crate) const ANSWER: u8 = 0x80;
    pub(crate) const ERROR: u8 = 0xFF;
}

/// Error codes of an error answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub(crate) enum Code {
    InvalidInput = 1,
    NotFound = 2,
    Conflict = 3,
    Unavailable = 4,
    Timeout = 5,
    Overloaded = 6,
    UnknownMember = 7,
    Malformed = 8,
    UnknownRequest = 9,
    FrameTooLarge = 10,
    Internal = 11,
    Storage = 12,
}

impl Code {
    pub(crate) fn from_u16(v: u16) -> Code {
        match v {
            1 => Code::InvalidInput,
            2 => Code::NotFound,
            3 => Code::Conflict,
            4 => Code::Unavailable,
            5 => Code::Timeout,
            6 => Code::Overloaded,
            7 => Code::UnknownMember,
            8 => Code::Malformed,
            9 => Code::UnknownRequest,
            10 => Code::FrameTooLarge,
            12 => Code::Storage,
            _ => Code::Internal,
        }
    }

    /// The code an error travels as.
    pub(crate) fn of(e: &Error) -> Code {
        if is_unknown_member(e) {
            return Code::UnknownMember;
        }
        match e.kind() {
            ErrorKind::InvalidInput => Code::InvalidInput,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::Conflict => Code::Conflict,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Timeout => Code::Timeout,
            ErrorKind::Overloaded => Code::Overloaded,
            ErrorKind::Io => Code::Storage,
            _ => Code::Internal,
        }
    }

    /// The error a client reports for an error answer. The broker refusing our
    /// input is the caller's problem (downstream); anything else is the broker's.
    pub(crate) fn into_error(self, retryable: bool, message: String) -> Error {
        let (kind, origin) = match self {
            Code::InvalidInput | Code::Malformed | Code::UnknownRequest | Code::FrameTooLarge => {
                (ErrorKind::InvalidInput, Origin::Downstream)
            }
            Code::NotFound | Code::UnknownMember => (ErrorKind::NotFound, Origin::Downstream),
            Code::Conflict => (ErrorKind::Conflict, Origin::Downstream),
            Code::Unavailable => (ErrorKind::Unavailable, Origin::Upstream),
            Code::Timeout => (ErrorKind::Timeout, Origin::Upstream),
            Code::Overloaded => (ErrorKind::Overloaded, Origin::Upstream),
            Code::Storage => (ErrorKind::Io, Origin::Upstream),
            Code::Internal => (ErrorKind::Internal, Origin::Upstream),
        };
        let e = Error::new(kind, origin, message).with_retryable(retryable);
        if self == Code::UnknownMember {
            e.with_source(UnknownMember)
        } else {
            e
        }
    }
}

/// Cause attached to errors saying the member id is not (or no longer) in a group:
/// its lease ran out, it left, or the broker restarted. The client joins again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnknownMember;

impl fmt::Display for UnknownMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown member")
    }
}

impl std::error::Error for UnknownMember {}

/// Whether `e` says the member is unknown (found by walking the cause chain).
pub(crate) fn is_unknown_member(e: &Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<UnknownMember>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// One ack or nack target: the delivery's partition, offset and token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AckItem {
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) token: u64,
}

/// A decoded request.
#[derive(Debug, PartialEq)]
pub(crate) enum Request {
    Hello {
        version: u16,
        client: String,
    },
    CreateTopic(TopicSpec),
    Publish {
        topic: String,
        messages: Vec<OutgoingMessage>,
    },
    Join {
        topic: String,
        group: String,
        lease_ms: u64,
        options: SubscribeOptions,
    },
    Fetch {
        member: u64,
        max_messages: u32,
        max_wait_ms: u32,
    },
    Ack {
        member: u64,
        items: Vec<AckItem>,
    },
    Nack {
        member: u64,
        item: AckItem,
        delay_ms: Option<u64>,
    },
    Heartbeat {
        member: u64,
    },
    Leave {
        member: u64,
    },
    Seek {
        topic: String,
        group: String,
        to: StartAt,
    },
    Lag {
        topic: String,
        group: String,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    UnknownKind(u8),
    Malformed(String),
}

impl DecodeError {
    pub(crate) fn code(&self) -> Code {
        match self {
            DecodeError::UnknownKind(_) => Code::UnknownRequest,
            DecodeError::Malformed(_) => Code::Malformed,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnknownKind(k) => write!(f, "unknown request kind 0x{k:02x}"),
            DecodeError::Malformed(why) => write!(f, "malformed frame: {why}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Encoding

/// Builds one frame; [`Enc::finish`] fills in the length.
pub(crate) struct Enc(Vec<u8>);

impl Enc {
    pub(crate) fn new(kind: u8, request_id: u64) -> Self {
        Self::with_capacity(kind, request_id, 64)
    }

    pub(crate) fn with_capacity(kind: u8, request_id: u64, capacity: usize) -> Self {
        let mut v = Vec::with_capacity(capacity + 13);
        v.extend_from_slice(&[0; 4]);
        v.push(kind);
        v.extend_from_slice(&request_id.to_be_bytes());
        Enc(v)
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Length-prefixed bytes. Lengths were checked against the frame limit, which
    /// is far below 4 GiB.
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(u32::try_from(b.len()).unwrap_or(NONE_LEN - 1));
        self.0.extend_from_slice(b);
        self
    }
    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    pub(crate) fn opt_bytes(&mut self, s: Option<&[u8]>) -> &mut Self {
        match s {
            Some(s) => self.bytes(s),
            None => self.u32(NONE_LEN),
        }
    }
    pub(crate) fn headers<'a>(
        &mut self,
        count: usize,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> &mut Self {
        self.u32(u32::try_from(count).unwrap_or(u32::MAX));
        for (k, v) in headers {
            self.str(k).bytes(v);
        }
        self
    }

    /// The frame, its length prefix filled in.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len() - 4).unwrap_or(u32::MAX);
        self.0[..4].copy_from_slice(&len.to_be_bytes());
        self.0
    }
}

fn start_at(e: &mut Enc, to: StartAt) {
    let (k, v) = match to {
        StartAt::Earliest => (0, 0),
        StartAt::Latest => (1, 0),
        StartAt::Offset(o) => (2, o),
        StartAt::TimeMs(t) => (3, t),
    };
    e.u8(k).u64(v);
}

fn opt_u64(v: Option<u64>) -> u64 {
    v.unwrap_or(UNSET)
}

/// Encodes a request frame.
pub(crate) fn encode_request(id: u64, req: &Request) -> Vec<u8> {
    match req {
        Request::Hello { version, client } => {
            let mut e = Enc::new(kind::HELLO, id);
            e.u16(*version).str(client);
            e.finish()
        }
        Request::CreateTopic(spec) => {
            let mut e = Enc::new(kind::CREATE_TOPIC, id);
            e.str(&spec.name)
                .u32(spec.partitions)
                .u64(opt_u64(spec.retention_bytes))
                .u64(opt_u64(spec.retention_ms));
            e.finish()
        }
        Request::Publish { topic, messages } => encode_publish(id, topic, messages),
        Request::Join {
            topic,
            group,
            lease_ms,
            options,
        } => {
            let mut e = Enc::new(kind::JOIN, id);
            e.str(topic).str(group).u64(*lease_ms);
            start_at(&mut e, options.start);
            e.u32(options.max_in_flight)
                .u64(options.ack_timeout_ms)
                .u32(options.max_deliveries)
                .u64(options.backoff_initial_ms)
                .u64(options.backoff_max_ms)
                .opt_bytes(options.dead_letter_topic.as_deref().map(str::as_bytes));
            e.finish()
        }
        Request::Fetch {
            member,
            max_messages,
            max_wait_ms,
        } => {
            let mut e = Enc::new(kind::FETCH, id);
            e.u64(*member).u32(*max_messages).u32(*max_wait_ms);
            e.finish()
        }
        Request::Ack { member, items } => {
            let mut e = Enc::with_capacity(kind::ACK, id, 12 + items.len() * 20);
            e.u64(*member)
                .u32(u32::try_from(items.len()).unwrap_or(u32::MAX));
            for i in items {
                e.u32(i.partition).u64(i.offset).u64(i.token);
            }
            e.finish()
        }
        Request::Nack {
            member,
            item,
            delay_ms,
        } => {
            let mut e = Enc::new(kind::NACK, id);
            e.u64(*member)
                .u32(item.partition)
                .u64(item.offset)
                .u64(item.token)
                .u64(opt_u64(*delay_ms));
            e.finish()
        }
        Request::Heartbeat { member } => {
            let mut e = Enc::new(kind::HEARTBEAT, id);
            e.u64(*member);
            e.finish()
        }
        Request::Leave { member } => {
            let mut e = Enc::new(kind::LEAVE, id);
            e.u64(*member);
            e.finish()
        }
        Request::Seek { topic, group, to } => {
            let mut e = Enc::new(kind::SEEK, id);
            e.str(topic).str(group);
            start_at(&mut e, *to);
            e.finish()
        }
        Request::Lag { topic, group } => {
            let mut e = Enc::new(kind::LAG, id);
            e.str(topic).str(group);
            e.finish()
        }
    }
}

/// Encodes a publish without copying the batch into a [`Request`] first.
pub(crate) fn encode_publish(id: u64, topic: &str, messages: &[OutgoingMessage]) -> Vec<u8> {
    let size: usize = messages
        .iter()
        .map(|m| m.size() + 16 + 8 * m.headers.len())
        .sum();
    let mut e = Enc::with_capacity(kind::PUBLISH, id, topic.len() + 8 + size);
    e.str(topic)
        .u32(u32::try_from(messages.len()).unwrap_or(u32::MAX));
    for m in messages {
        e.str(&m.id)
            .opt_bytes(m.key.as_deref().map(str::as_bytes))
            .headers(
                m.headers.len(),
                m.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
            )
            .bytes(&m.payload);
    }
    e.finish()
}

/// An error answer.
pub(crate) fn encode_error(id: u64, code: Code, retryable: bool, message: &str) -> Vec<u8> {
    let mut e = Enc::new(kind::ERROR, id);
    // Messages are for people; a long one is cut rather than refused.
    let mut msg = message;
    if msg.len() > 4096 {
        let mut end = 4096;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg = &msg[..end];
    }
    e.u16(code as u16).u8(u8::from(retryable)).str(msg);
    e.finish()
}

/// An error answer for `err`.
pub(crate) fn encode_error_for(id: u64, err: &Error) -> Vec<u8> {
    encode_error(id, Code::of(err), err.is_retryable(), &err.to_string())
}

/// An answer with an empty body.
pub(crate) fn encode_empty(request_kind: u8, id: u64) -> Vec<u8> {
    Enc::new(request_kind | kind::ANSWER, id).finish()
}

/// The publish answer.
pub(crate) fn encode_published(id: u64, published: &[Published]) -> Vec<u8> {
    let mut e = Enc::with_capacity(kind::PUBLISH | kind::ANSWER, id, 4 + published.len() * 12);
    e.u32(u32::try_from(published.len()).unwrap_or(u32::MAX));
    for p in published {
        e.u32(p.partition).u64(p.offset);
    }
    e.finish()
}

// ---------------------------------------------------------------------------
// Decoding

/// Reads fields off a frame body; every read checks the length first.
pub(crate) struct Dec {
    buf: Bytes,
}

type DResult<T> = Result<T, DecodeError>;

fn short(what: &str) -> DecodeError {
    DecodeError::Malformed(format!("frame ends inside {what}"))
}

impl Dec {
    pub(crate) fn new(buf: Bytes) -> Self {
        Dec { buf }
    }
    pub(crate) fn u8(&mut self, what: &str) -> DResult<u8> {
        if self.buf.remaining() < 1 {
            return Err(short(what));
        }
        Ok(self.buf.get_u8())
    }
    pub(crate) fn u16(&mut self, what: &str) -> DResult<u16> {
        if self.buf.remaining() < 2 {
            return Err(short(what));
        }
        Ok(self.buf.get_u16())
    }
    pub(crate) fn u32(&mut self, what: &str) -> DResult<u32> {
        if self.buf.remaining() < 4 {
            return Err(short(what));
        }
        Ok(self.buf.get_u32())
    }
    pub(crate) fn u64(&mut self, what: &str) -> DResult<u64> {
        if self.buf.remaining() < 8 {
            return Err(short(what));
        }
        Ok(self.buf.get_u64())
    }
    fn take(&mut self, len: u32, what: &str) -> DResult<Bytes> {
        let len = len as usize;
        if self.buf.remaining() < len {
            return Err(short(what));
        }
        Ok(self.buf.split_to(len))
    }
    /// Length-prefixed bytes, sharing the frame's buffer.
    pub(crate) fn bytes(&mut self, what: &str) -> DResult<Bytes> {
        let len = self.u32(what)?;
        if len == NONE_LEN {
            return Err(DecodeError::Malformed(format!("{what} is missing")));
        }
        self.take(len, what)
    }
    pub(crate) fn opt_bytes(&mut self, what: &str) -> DResult<Option<Bytes>> {
        let len = self.u32(what)?;
        if len == NONE_LEN {
            return Ok(None);
        }
        self.take(len, what).map(Some)
    }
    pub(crate) fn str(&mut self, what: &str) -> DResult<String> {
        let b = self.bytes(what)?;
        utf8(b, what)
    }
    pub(crate) fn opt_str(&mut self, what: &str) -> DResult<Option<String>> {
        self.opt_bytes(what)?.map(|b| utf8(b, what)).transpose()
    }
    pub(crate) fn headers(&mut self, max: usize) -> DResult<BTreeMap<String, String>> {
        let n = self.u32("header count")? as usize;
        if n > max {
            return Err(DecodeError::Malformed(format!(
                "{n} headers; at most {max} per message"
            )));
        }
        let mut h = BTreeMap::new();
        for _ in 0..n {
            let k = self.str("header name")?;
            let v = self.str("header value")?;
            h.insert(k, v);
        }
        Ok(h)
    }
    fn start_at(&mut self) -> DResult<StartAt> {
        let k = self.u8("start kind")?;
        let v = self.u64("start value")?;
        match k {
            0 => Ok(StartAt::Earliest),
            1 => Ok(StartAt::Latest),
            2 => Ok(StartAt::Offset(v)),
            3 => Ok(StartAt::TimeMs(v)),
            _ => Err(DecodeError::Malformed(format!("unknown start kind {k}"))),
        }
    }
    /// A count of items each at least `min_item` bytes long: refuses counts the
    /// rest of the frame cannot hold, before anything is allocated for them.
    pub(crate) fn count(&mut self, what: &str, min_item: usize) -> DResult<usize> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_item) > self.buf.remaining() {
            return Err(DecodeError::Malformed(format!(
                "{what} {n} does not fit in the frame"
            )));
        }
        Ok(n)
    }
    pub(crate) fn end(&self) -> DResult<()> {
        if self.buf.has_remaining() {
            return Err(DecodeError::Malformed(format!(
                "{} bytes after the last field",
                self.buf.remaining()
            )));
        }
        Ok(())
    }
}

fn utf8(b: Bytes, what: &str) -> DResult<String> {
    String::from_utf8(b.to_vec())
        .map_err(|_| DecodeError::Malformed(format!("{what} is not UTF-8")))
}

fn opt_from(v: u64) -> Option<u64> {
    (v != UNSET).then_some(v)
}

/// Decodes a request body of `kind`.
pub(crate) fn decode_request(k: u8, body: Bytes) -> Result<Request, DecodeError> {
    let mut d = Dec::new(body);
    let req = match k {
        kind::HELLO => Request::Hello {
            version: d.u16("version")?,
            client: d.str("client name")?,
        },
        kind::CREATE_TOPIC => Request::CreateTopic(TopicSpec {
            name: d.str("topic")?,
            partitions: d.u32("partitions")?,
            retention_bytes: opt_from(d.u64("retention_bytes")?),
            retention_ms: opt_from(d.u64("retention_ms")?),
        }),
        kind::PUBLISH => {
            let topic = d.str("topic")?;
            // id, key, header count, payload: 16 bytes at least per message.
            let n = d.count("message count", 16)?;
            let mut messages = Vec::with_capacity(n);
            for _ in 0..n {
                let id = d.str("message id")?;
                let key = d.opt_str("key")?;
                let headers = d.headers(MAX_HEADERS)?;
                let payload = d.bytes("payload")?;
                messages.push(OutgoingMessage {
                    id,
                    key,
                    headers,
                    payload,
                });
            }
            Request::Publish { topic, messages }
        }
        kind::JOIN => {
            let topic = d.str("topic")?;
            let group = d.str("group")?;
            let lease_ms = d.u64("lease_ms")?;
            let options = SubscribeOptions {
                start: d.start_at()?,
                max_in_flight: d.u32("max_in_flight")?,
                ack_timeout_ms: d.u64("ack_timeout_ms")?,
                max_deliveries: d.u32("max_deliveries")?,
                backoff_initial_ms: d.u64("backoff_initial_ms")?,
                backoff_max_ms: d.u64("backoff_max_ms")?,
                dead_letter_topic: d.opt_str("dead_letter_topic")?,
            };
            Request::Join {
                topic,
                group,
                lease_ms,
                options,
            }
        }
        kind::FETCH => Request::Fetch {
            member: d.u64("member")?,
            max_messages: d.u32("max_messages")?,
            max_wait_ms: d.u32("max_wait_ms")?,
        },
        kind::ACK => {
            let member = d.u64("member")?;
            let n = d.count("ack count", 20)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(AckItem {
                    partition: d.u32("partition")?,
                    offset: d.u64("offset")?,
                    token: d.u64("token")?,
                });
            }
            Request::Ack { member, items }
        }
        kind::NACK => Request::Nack {
            member: d.u64("member")?,
            item: AckItem {
                partition: d.u32("partition")?,
                offset: d.u64("offset")?,
                token: d.u64("token")?,
            },
            delay_ms: opt_from(d.u64("delay_ms")?),
        },
        kind::HEARTBEAT => Request::Heartbeat {
            member: d.u64("member")?,
        },
        kind::LEAVE => Request::Leave {
            member: d.u64("member")?,
        },
        kind::SEEK => Request::Seek {
            topic: d.str("topic")?,
            group: d.str("group")?,
            to: d.start_at()?,
        },
        kind::LAG => Request::Lag {
            topic: d.str("topic")?,
            group: d.str("group")?,
        },
        other => return Err(DecodeError::UnknownKind(other)),
    };
    d.end()?;
    Ok(req)
}

// ---------------------------------------------------------------------------
// Frames on a stream

/// One frame as read: its kind, request id and body.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) id: u64,
    pub(crate) body: Bytes,
}

/// Why no frame could be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The peer closed the connection between frames.
    Closed,
    /// The connection failed or closed inside a frame.
    Io(std::io::Error),
    /// The length prefix is below the 9-byte header.
    TooShort(u32),
    /// The length prefix is over the limit; `id` is the request id when it could
    /// be read from the bytes after the prefix.
    TooLarge { len: u32, id: Option<u64> },
}

/// Reads one frame of at most `max_len` bytes (after the prefix).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: u32,
) -> Result<Frame, FrameError> {
    let mut prefix = [0u8; 4];
    // A clean close is only a close between frames.
    let n = r.read(&mut prefix[..1]).await.map_err(FrameError::Io)?;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    r.read_exact(&mut prefix[1..])
        .await
        .map_err(FrameError::Io)?;
    let len = u32::from_be_bytes(prefix);
    if len < HEADER_LEN {
        return Err(FrameError::TooShort(len));
    }
    if len > max_len {
        let mut head = [0u8; 9];
        let id = match r.read_exact(&mut head).await {
            Ok(_) => {
                let mut idb = [0u8; 8];
                idb.copy_from_slice(&head[1..]);
                Some(u64::from_be_bytes(idb))
            }
            Err(_) => None,
        };
        return Err(FrameError::TooLarge { len, id });
    }
    let mut buf = BytesMut::zeroed(len as usize);
    r.read_exact(&mut buf).await.map_err(FrameError::Io)?;
    let mut buf = buf.freeze();
    let kind = buf.get_u8();
    let id = buf.get_u64();
    Ok(Frame {
        kind,
        id,
        body: buf,
    })
}

/// Encoded frames join into one write up to this size.
pub(crate) const WRITE_BATCH_BYTES: usize = 256 << 10;

/// Write the frames `rx` yields, joining those already queued into one write (one
/// syscall for many pipelined frames), until `rx` closes or a write fails.
pub(crate) async fn write_frames(
    wr: &mut (impl AsyncWrite + Unpin),
    rx: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES);
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        wr.write_all(&buf).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(req: Request) {
        let frame = encode_request(42, &req);
        let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        assert_eq!(len, frame.len() - 4);
        let mut body = Bytes::from(frame[4..].to_vec());
        let k = body.get_u8();
        assert_eq!(body.get_u64(), 42);
        assert_eq!(decode_request(k, body).unwrap(), req);
    }

    #[test]
    fn every_request_survives_a_roundtrip() {
        roundtrip(Request::Hello {
            version: VERSION,
            client: "t".into(),
        });
        roundtrip(Request::CreateTopic(TopicSpec::new("orders", 4)));
        roundtrip(Request::CreateTopic(TopicSpec {
            retention_ms: None,
            retention_bytes: Some(10),
            ..TopicSpec::new("o", 1)
        }));
        roundtrip(Request::Publish {
            topic: "orders".into(),
            messages: vec![
                OutgoingMessage::new(&b"\x00\xffbinary"[..])
                    .with_key("k")
                    .with_header("a", "b"),
                OutgoingMessage::new(Bytes::new()),
            ],
        });
        roundtrip(Request::Join {
            topic: "t".into(),
            group: "g".into(),
            lease_ms: 10_000,
            options: SubscribeOptions {
                start: StartAt::TimeMs(77),
                dead_letter_topic: Some("dl".into()),
                ..Default::default()
            },
        });
        roundtrip(Request::Fetch {
            member: 7,
            max_messages: 10,
            max_wait_ms: 100,
        });
        roundtrip(Request::Ack {
            member: 7,
            items: vec![AckItem {
                partition: 1,
                offset: 2,
                token: 3,
            }],
        });
        roundtrip(Request::Nack {
            member: 7,
            item: AckItem {
                partition: 1,
                offset: 2,
                token: 3,
            },
            delay_ms: None,
        });
        roundtrip(Request::Nack {
            member: 7,
            item: AckItem {
                partition: 1,
                offset: 2,
                token: 3,
            },
            delay_ms: Some(5),
        });
        roundtrip(Request::Heartbeat { member: 1 });
        roundtrip(Request::Leave { member: 1 });
        roundtrip(Request::Seek {
            topic: "t".into(),
            group: "g".into(),
            to: StartAt::Offset(9),
        });
        roundtrip(Request::Lag {
            topic: "t".into(),
            group: "g".into(),
        });
    }

    #[test]
    fn truncated_trailing_and_unknown_frames_are_refused() {
        let frame = encode_request(1, &Request::Heartbeat { member: 5 });
        let body = Bytes::from(frame[13..frame.len() - 1].to_vec());
        assert!(matches!(
            decode_request(kind::HEARTBEAT, body),
            Err(DecodeError::Malformed(_))
        ));
        let mut long = frame[13..].to_vec();
        long.push(0);
        assert!(matches!(
            decode_request(kind::HEARTBEAT, Bytes::from(long)),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            decode_request(0x42, Bytes::new()),
            Err(DecodeError::UnknownKind(0x42))
        );
        // A count that cannot fit is refused before allocating for it.
        let mut e = Enc::new(kind::PUBLISH, 1);
        e.str("t").u32(u32::MAX);
        let f = e.finish();
        assert!(matches!(
            decode_request(kind::PUBLISH, Bytes::from(f[13..].to_vec())),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn frames_over_the_limit_report_their_request_id() {
        let frame = encode_request(99, &Request::Heartbeat { member: 5 });
        let mut r = &frame[..];
        let err = read_frame(&mut r, 10).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { id: Some(99), .. }));
        let mut r = &frame[..];
        let f = read_frame(&mut r, 100).await.unwrap();
        assert_eq!((f.kind, f.id), (kind::HEARTBEAT, 99));
        let mut r = &[0u8, 0, 0, 3][..];
        assert!(matches!(
            read_frame(&mut r, 100).await,
            Err(FrameError::TooShort(3))
        ));
        let mut r = &[][..];
        assert!(matches!(
            read_frame(&mut r, 100).await,
            Err(FrameError::Closed)
        ));
    }

    /// The frames of the document's example exchange, as bytes, with `C`/`S`.
    fn doc_frames() -> Vec<(char, Vec<u8>)> {
        let doc = include_str!("../../../docs/bus-protocol.md");
        let example = doc
            .split("## Example exchange")
            .nth(1)
            .and_then(|s| s.split("```text").nth(1))
            .and_then(|s| s.split("```").next())
            .unwrap();
        let mut frames: Vec<(char, String)> = Vec::new();
        for line in example.lines() {
            let hex = |l: &str| l.replace(['|', ' '], "");
            if let Some(rest) = line.strip_prefix("C: ").or(line.strip_prefix("S: ")) {
                frames.push((line.chars().next().unwrap(), hex(rest)));
            } else if line.trim_start().starts_with('|') {
                frames.last_mut().unwrap().1.push_str(&hex(line));
            }
        }
        frames
            .into_iter()
            .map(|(who, h)| {
                let bytes = (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                    .collect();
                (who, bytes)
            })
            .collect()
    }

    #[test]
    fn the_documented_example_is_what_the_code_sends_and_reads() {
        let frames = doc_frames();
        assert_eq!(frames.len(), 14);
        for (who, f) in frames {
            let len = u32::from_be_bytes(f[..4].try_into().unwrap()) as usize;
            assert_eq!(len, f.len() - 4, "length prefix of {f:02x?}");
            let (k, id) = (f[4], u64::from_be_bytes(f[5..13].try_into().unwrap()));
            let body = Bytes::from(f[13..].to_vec());
            if who == 'C' {
                let req = decode_request(k, body).unwrap();
                assert_eq!(encode_request(id, &req), f, "{req:?}");
                continue;
            }
            let again = match k {
                0x83 => {
                    let mut d = Dec::new(body);
                    let n = d.u32("n").unwrap();
                    let p: Vec<Published> = (0..n)
                        .map(|_| Published {
                            partition: d.u32("p").unwrap(),
                            offset: d.u64("o").unwrap(),
                        })
                        .collect();
                    encode_published(id, &p)
                }
                0x85 => {
                    let mut d = Dec::new(body);
                    let n = d.u32("n").unwrap();
                    let mut e = Enc::new(k, id);
                    e.u32(n);
                    for _ in 0..n {
                        let dl = crate::message::decode_delivery(&mut d, "orders").unwrap();
                        let m = &dl.message;
                        let mut headers = vec![(
                            crate::message::ID_HEADER.to_owned(),
                            m.id.clone().into_bytes(),
                        )];
                        headers.extend(
                            m.headers
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
                        );
                        let r = shoal_log::StoredRecord {
                            offset: m.offset,
                            timestamp_ms: m.timestamp_ms,
                            key: m.key.clone().map(String::into_bytes),
                            headers,
                            payload: m.payload.to_vec(),
                        };
                        crate::message::encode_delivery(
                            &mut e,
                            m.partition,
                            dl.token,
                            dl.attempt,
                            &r,
                        );
                    }
                    d.end().unwrap();
                    e.finish()
                }
                kind::ERROR => {
                    let mut d = Dec::new(body);
                    let code = d.u16("code").unwrap();
                    let retry = d.u8("retry").unwrap() == 1;
                    let msg = d.str("message").unwrap();
                    encode_error(id, Code::from_u16(code), retry, &msg)
                }
                _ => continue,
            };
            assert_eq!(again, f, "answer kind 0x{k:02x}");
        }
    }

    #[test]
    fn error_codes_keep_kind_and_unknown_member() {
        let e = Code::UnknownMember.into_error(false, "gone".into());
        assert!(is_unknown_member(&e));
        assert_eq!(Code::of(&e), Code::UnknownMember);
        let e = Code::Unavailable.into_error(true, "x".into());
        assert_eq!(Code::of(&e), Code::Unavailable);
        assert!(e.is_retryable());
        for c in 1..=12 {
            assert_eq!(Code::from_u16(c) as u16, c);
        }
    }
}

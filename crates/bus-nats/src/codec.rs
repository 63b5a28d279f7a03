//! Bus messages as NATS messages: the id in `Nats-Msg-Id` (so JetStream drops a
//! re-published duplicate within the stream's duplicate window), the key in
//! `Shoal-Bus-Key`, the caller's headers as they are.

use crate::error::invalid;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};
use bytes::Bytes;
use shoal_bus::{Message, OutgoingMessage};
use shoal_core::Error;
use std::collections::BTreeMap;
use std::str::FromStr;

/// The partition key.
pub(crate) const KEY_HEADER: &str = "Shoal-Bus-Key";
/// The bus id when it differs from `Nats-Msg-Id` (on dead letters, whose dedupe id
/// names the group that gave up, so two groups can dead-letter one message).
pub(crate) const ID_HEADER: &str = "Shoal-Bus-Id";

/// Header names the bus keeps for itself or that steer the server.
fn reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-") || lower.starts_with("shoal-bus-")
}

fn name(n: &str) -> Result<HeaderName, Error> {
    if n.is_empty() {
        return Err(invalid("a header name is empty"));
    }
    HeaderName::from_str(n).map_err(|_| {
        invalid(format!(
            "header name {n:?}: use printable ASCII without ':' or spaces"
        ))
    })
}

fn value(what: &str, v: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(v).map_err(|_| invalid(format!("{what} {v:?} holds a line break")))
}

/// A header value the bus makes itself (from names and ids already checked).
pub(crate) fn header_value(v: &str) -> Result<HeaderValue, Error> {
    value("header value", v)
}

/// The NATS headers of `m`, refusing what NATS cannot carry (line breaks, names the
/// bus or the server reserve).
pub(crate) fn encode(m: &OutgoingMessage) -> Result<HeaderMap, Error> {
    let mut h = HeaderMap::new();
    h.insert(NATS_MESSAGE_ID, value("message id", &m.id)?);
    if let Some(k) = &m.key {
        h.insert(name(KEY_HEADER)?, value("key", k)?);
    }
    for (k, v) in &m.headers {
        if reserved(k) {
            return Err(invalid(format!(
                "header {k:?}: names starting with 'Nats-' or 'Shoal-Bus-' are reserved"
            )));
        }
        h.insert(name(k)?, value(&format!("header {k}"), v)?);
    }
    Ok(h)
}

/// Bytes the message takes against the server's `max_payload` (payload plus the
/// header block as NATS frames it).
pub(crate) fn wire_size(headers: &HeaderMap, payload: usize) -> usize {
    let mut n = "NATS/1.0\r\n\r\n".len();
    for (k, vs) in headers.iter() {
        for v in vs {
            n += AsRef::<str>::as_ref(k).len() + 2 + v.as_str().len() + 2;
        }
    }
    n + payload
}

/// Where a stored message is, as the delivery carries it.
pub(crate) struct Position<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: u32,
    pub(crate) offset: u64,
    pub(crate) timestamp_ms: u64,
}

/// The bus message of a delivered NATS message.
pub(crate) fn decode(at: Position<'_>, headers: Option<&HeaderMap>, payload: Bytes) -> Message {
    let mut id = None;
    let mut dedupe_id = None;
    let mut key = None;
    let mut out = BTreeMap::new();
    if let Some(h) = headers {
        for (k, vs) in h.iter() {
            let Some(v) = vs.first() else { continue };
            let k: &str = k.as_ref();
            if k == ID_HEADER {
                id = Some(v.as_str().to_string());
            } else if k == KEY_HEADER {
                key = Some(v.as_str().to_string());
            } else if k == AsRef::<str>::as_ref(&NATS_MESSAGE_ID) {
                dedupe_id = Some(v.as_str().to_string());
            } else if !reserved(k) {
                out.insert(k.to_string(), v.as_str().to_string());
            }
        }
    }
    Message {
        topic: at.topic.to_string(),
        partition: at.partition,
        offset: at.offset,
        // A message published by something else than the bus has no id: its position
        // is one.
        id: id
            .or(dedupe_id)
            .unwrap_or_else(|| format!("{}/{}/{}", at.topic, at.partition, at.offset)),
        key,
        headers: out,
        payload,
        timestamp_ms: at.timestamp_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_headers_are_refused() {
        let m = OutgoingMessage::new(Bytes::from_static(b"body"))
            .with_key("k-1")
            .with_id("id-1")
            .with_header("traceparent", "00-ab-cd-01")
            .with_header("Mixed-Case", "v");
        let h = encode(&m).expect("encode");
        assert!(wire_size(&h, 4) > 4 + "Nats-Msg-Id: id-1".len());
        let at = Position {
            topic: "t",
            partition: 2,
            offset: 9,
            timestamp_ms: 1,
        };
        let back = decode(at, Some(&h), m.payload.clone());
        assert_eq!(back.id, "id-1");
        assert_eq!(back.key.as_deref(), Some("k-1"));
        assert_eq!(back.headers, m.headers);

        for (k, v) in [
            ("Nats-Expected-Stream", "x"),
            ("shoal-bus-key", "x"),
            ("a b", "x"),
            ("a:b", "x"),
            ("", "x"),
            ("ok", "line\nbreak"),
        ] {
            let m = OutgoingMessage::new(Bytes::new()).with_header(k, v);
            assert!(encode(&m).is_err(), "{k:?}: {v:?}");
        }
        assert!(encode(&OutgoingMessage::new(Bytes::new()).with_key("a\r\nb")).is_err());
    }
}

//! How a bus message is kept in a log record: the key as the record key, the
//! message id as the record's first header (named `shoal-id`; read back by its
//! position, so a user header of the same name is harmless), then the user
//! headers, then the payload.

use crate::protocol::{Dec, DecodeError, Enc};
use bytes::Bytes;
use shoal_bus::{Delivery, Message, OutgoingMessage};
use shoal_log::{Record, StoredRecord};
use std::collections::BTreeMap;

/// Name of the record header holding the message id.
pub(crate) const ID_HEADER: &str = "shoal-id";

/// The record for `m`.
pub(crate) fn to_record(m: OutgoingMessage) -> Record {
    let mut headers = Vec::with_capacity(m.headers.len() + 1);
    headers.push((ID_HEADER.to_owned(), m.id.into_bytes()));
    headers.extend(m.headers.into_iter().map(|(k, v)| (k, v.into_bytes())));
    Record {
        key: m.key.map(String::into_bytes),
        headers,
        payload: m.payload.to_vec(),
    }
}

/// The message id and user headers of a stored record.
fn split_headers(r: &StoredRecord) -> (&[u8], &[(String, Vec<u8>)]) {
    match r.headers.split_first() {
        Some((first, rest)) if first.0 == ID_HEADER => (&first.1, rest),
        // Not written by this broker: no id.
        _ => (&[], &r.headers),
    }
}

/// Writes one delivery of a fetch answer (layout in docs/bus-protocol.md).
pub(crate) fn encode_delivery(
    e: &mut Enc,
    partition: u32,
    token: u64,
    attempt: u32,
    r: &StoredRecord,
) {
    let (id, headers) = split_headers(r);
    e.u32(partition)
        .u64(r.offset)
        .u64(token)
        .u32(attempt)
        .u64(r.timestamp_ms)
        .bytes(id)
        .opt_bytes(r.key.as_deref())
        .headers(
            headers.len(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        )
        .bytes(&r.payload);
}

fn lossy(b: Bytes) -> String {
    match String::from_utf8(b.to_vec()) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// Reads one delivery of a fetch answer. Text the broker stored is UTF-8 (it
/// came in as such); anything else is shown lossily rather than failing a fetch.
pub(crate) fn decode_delivery(d: &mut Dec, topic: &str) -> Result<Delivery, DecodeError> {
    let partition = d.u32("partition")?;
    let offset = d.u64("offset")?;
    let token = d.u64("token")?;
    let attempt = d.u32("attempt")?;
    let timestamp_ms = d.u64("timestamp")?;
    let id = lossy(d.bytes("message id")?);
    let key = d.opt_bytes("key")?.map(lossy);
    let n = d.count("header count", 8)?;
    let mut headers = BTreeMap::new();
    for _ in 0..n {
        let k = lossy(d.bytes("header name")?);
        let v = lossy(d.bytes("header value")?);
        headers.insert(k, v);
    }
    let payload = d.bytes("payload")?;
    Ok(Delivery {
        message: Message {
            topic: topic.to_owned(),
            partition,
            offset,
            id,
            key,
            headers,
            payload,
            timestamp_ms,
        },
        attempt,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_record_and_wire() {
        let m = OutgoingMessage::new(&b"\x00\x01payload"[..])
            .with_key("k-1")
            .with_header("shoal-id", "user header of the same name")
            .with_header("traceparent", "00-abc");
        let r = to_record(m.clone());
        let stored = StoredRecord {
            offset: 7,
            timestamp_ms: 99,
            key: r.key,
            headers: r.headers,
            payload: r.payload,
        };
        let mut e = Enc::new(0, 0);
        encode_delivery(&mut e, 3, 11, 2, &stored);
        let frame = e.finish();
        let mut d = Dec::new(Bytes::from(frame[13..].to_vec()));
        let got = decode_delivery(&mut d, "t").unwrap();
        d.end().unwrap();
        assert_eq!(got.attempt, 2);
        assert_eq!(got.token, 11);
        let msg = got.message;
        assert_eq!((msg.partition, msg.offset, msg.timestamp_ms), (3, 7, 99));
        assert_eq!(msg.id, m.id);
        assert_eq!(msg.key, m.key);
        assert_eq!(msg.headers, m.headers);
        assert_eq!(msg.payload, m.payload);
    }
}

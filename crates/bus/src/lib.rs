//! The bus contract: what services rely on when they talk through events, whatever
//! carries them. Two backends implement it: the embedded broker hosted by the
//! control plane (the default; `shoal-broker`) and NATS JetStream (by configuration).
//! One conformance suite (`shoal_testkit::bus`) runs against both.
//!
//! The model:
//! - a **topic** has a fixed number of **partitions**; a message with a **key** goes
//!   to the partition the key hashes to ([`partition_for`], the same function on
//!   every backend), so messages with one key keep their order; a message without a
//!   key goes to partition 0;
//! - **publish** is durable when it returns ([`Published`] carries the partition and
//!   offset); a batch is published in order;
//! - a **consumer group** shares a topic's messages: each message goes to one member.
//!   Partitions are spread over the group's members and move when members join,
//!   leave or stop renewing their lease (rebalancing);
//! - each delivery is **acked** (done), or **nacked** (deliver again after a delay); a
//!   delivery neither acked nor nacked within `ack_timeout_ms` is delivered again
//!   (at-least-once). Each partition has at most `max_in_flight` unacked deliveries;
//!   with 1, a partition is processed strictly in order, redeliveries included;
//! - after `max_deliveries` attempts a message goes to the **dead-letter topic**
//!   (`<topic>.dead` unless named) with headers saying why, and is acked;
//! - a group's position can be moved (**replay**) to the start, the end, an offset
//!   or a time.
//!
//! Message ids let consumers drop duplicates (see the SDK's inbox); headers carry
//! trace context and correlation and causation ids ([`headers`]).

use bytes::Bytes;
use shoal_core::{Error, ErrorKind, Origin};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The future the contract's methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Header names with a meaning on the bus.
pub mod headers {
    /// W3C trace context of the publishing request.
    pub const TRACEPARENT: &str = "traceparent";
    /// The request or business flow the message belongs to.
    pub const CORRELATION_ID: &str = "correlation-id";
    /// The id of the message or request that caused this one.
    pub const CAUSATION_ID: &str = "causation-id";
    /// On a dead letter: the topic it was published to.
    pub const DEAD_TOPIC: &str = "shoal-dead-topic";
    /// On a dead letter: its partition and offset there, as `partition/offset`.
    pub const DEAD_POSITION: &str = "shoal-dead-position";
    /// On a dead letter: how many times it was delivered.
    pub const DEAD_ATTEMPTS: &str = "shoal-dead-attempts";
    /// On a dead letter: the group that gave up on it.
    pub const DEAD_GROUP: &str = "shoal-dead-group";
}

/// Limits every backend enforces (a broker may be configured lower).
pub mod limits {
    /// Largest payload plus key plus headers of one message.
    pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
    /// Most messages in one publish.
    pub const MAX_BATCH: usize = 1_000;
    /// Most partitions of a topic.
    pub const MAX_PARTITIONS: u32 = 256;
    /// Longest topic or group name.
    pub const MAX_NAME_LEN: usize = 100;
    /// Most deliveries in flight per partition and member.
    pub const MAX_IN_FLIGHT: u32 = 10_000;
    /// Most attempts before a message is dead-lettered.
    pub const MAX_DELIVERIES: u32 = 100;
}

/// A message to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct OutgoingMessage {
    /// Unique per message (a UUIDv7 by default); consumers use it to drop duplicates.
    pub id: String,
    /// Messages with the same key keep their order.
    pub key: Option<String>,
    /// Free-form headers (see [`headers`]).
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub payload: Bytes,
}

impl OutgoingMessage {
    /// A message with a fresh id: a UUIDv7, so ids sort by the millisecond they
    /// were made in (not within one).
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            id: fresh_id(),
            key: None,
            headers: BTreeMap::new(),
            payload: payload.into(),
        }
    }

    /// With a partition key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// With one more header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// With this id (an id derived from the business event makes a re-publish a
    /// duplicate consumers can drop).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// As a consequence of `cause` (choreography): the same correlation id (the
    /// cause's id when it had none), `cause`'s id as the causation id, and its trace
    /// context, so the whole process can be followed from message to message.
    pub fn caused_by(mut self, cause: &Message) -> Self {
        let correlation = cause
            .headers
            .get(headers::CORRELATION_ID)
            .cloned()
            .unwrap_or_else(|| cause.id.clone());
        self.headers
            .insert(headers::CORRELATION_ID.to_string(), correlation);
        self.headers
            .insert(headers::CAUSATION_ID.to_string(), cause.id.clone());
        if let Some(tp) = cause.headers.get(headers::TRACEPARENT) {
            self.headers
                .insert(headers::TRACEPARENT.to_string(), tp.clone());
        }
        self
    }

    /// Bytes counted against [`limits::MAX_MESSAGE_BYTES`].
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.id.len()
            + self.key.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// A UUIDv7 with its random part from the thread's fast generator: a message id must
/// be unique, not secret, and the OS generator would cost every message a system
/// call.
fn fresh_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut random = [0u8; 10];
    random.copy_from_slice(&fastrand::u128(..).to_le_bytes()[..10]);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf).to_string()
}

/// Where a published message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// Its partition.
    pub partition: u32,
    /// Its offset in the partition (from 0, without gaps on the embedded broker).
    pub offset: u64,
}

/// A stored message, as delivered.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The topic.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset in the partition.
    pub offset: u64,
    /// The id it was published with.
    pub id: String,
    /// The key it was published with.
    pub key: Option<String>,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub payload: Bytes,
    /// When the broker stored it (Unix ms).
    pub timestamp_ms: u64,
}

/// One delivery of a message to a group member: ack or nack it through the
/// [`Consumer`] that returned it.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// 1 for the first delivery, then 2, 3, …
    pub attempt: u32,
    /// The backend's handle for acking this delivery.
    pub token: u64,
}

/// A topic's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TopicSpec {
    /// The name: letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// Fixed at creation.
    pub partitions: u32,
    /// Drop the oldest messages past this size per partition (`None`: no limit).
    pub retention_bytes: Option<u64>,
    /// Drop messages older than this (`None`: no limit).
    pub retention_ms: Option<u64>,
}

impl TopicSpec {
    /// A topic with `partitions` partitions, kept 7 days.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        Self {
            name: name.into(),
            partitions,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
        }
    }
}

/// Where a group starts, or is moved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest message kept.
    Earliest,
    /// Only messages published from now on.
    Latest,
    /// This offset, in every partition.
    Offset(u64),
    /// The first message stored at or after this time (Unix ms).
    TimeMs(u64),
}

/// How a member consumes.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscribeOptions {
    /// Where a group with no position yet starts.
    pub start: StartAt,
    /// Unacked deliveries per partition at most (1: strictly in order).
    pub max_in_flight: u32,
    /// Deliver again when neither acked nor nacked within this.
    pub ack_timeout_ms: u64,
    /// Attempts before the message is dead-lettered.
    pub max_deliveries: u32,
    /// The first redelivery's delay; doubled on each further attempt.
    pub backoff_initial_ms: u64,
    /// The longest redelivery delay.
    pub backoff_max_ms: u64,
    /// Where dead letters go (`<topic>.dead` by default; created when needed).
    pub dead_letter_topic: Option<String>,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            start: StartAt::Earliest,
            max_in_flight: 256,
            ack_timeout_ms: 30_000,
            max_deliveries: 5,
            backoff_initial_ms: 200,
            backoff_max_ms: 30_000,
            dead_letter_topic: None,
        }
    }
}

impl SubscribeOptions {
    /// The delay before delivery number `attempt + 1`, after `attempt` failed ones.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(30);
        let ms = self
            .backoff_initial_ms
            .saturating_mul(1u64 << shift)
            .min(self.backoff_max_ms);
        Duration::from_millis(ms)
    }

    /// The dead-letter topic for `topic`.
    pub fn dead_letter_topic_for(&self, topic: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.dead"))
    }

    /// Refuse settings outside the limits, naming them.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(invalid(what));
        if self.max_in_flight == 0 || self.max_in_flight > limits::MAX_IN_FLIGHT {
            return bad(format!(
                "max_in_flight {} is out of range (1 to {})",
                self.max_in_flight,
                limits::MAX_IN_FLIGHT
            ));
        }
        if self.max_deliveries == 0 || self.max_deliveries > limits::MAX_DELIVERIES {
            return bad(format!(
                "max_deliveries {} is out of range (1 to {})",
                self.max_deliveries,
                limits::MAX_DELIVERIES
            ));
        }
        if self.ack_timeout_ms < 10 {
            return bad("ack_timeout_ms must be at least 10".into());
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return bad("backoff_max_ms is below backoff_initial_ms".into());
        }
        if let Some(t) = &self.dead_letter_topic {
            validate_name("dead-letter topic", t)?;
        }
        Ok(())
    }
}

/// A group member's stream of deliveries. Dropping it (or [`Consumer::close`])
/// leaves the group; its unacked deliveries go to other members.
pub trait Consumer: Send {
    /// The next delivery, waiting for one.
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, Error>>;

    /// Done with `delivery`: it is not delivered again. Answers once the ack is on
    /// its way, not confirmed (on both backends, as JetStream's own acks): an ack
    /// lost with the connection means the delivery comes again, as at-least-once
    /// allows. On the embedded broker, calls made after it on the same bus find it
    /// carried out.
    fn ack<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), Error>>;

    /// Failed: deliver it again after `delay` (the options' backoff for its attempt
    /// when `None`), or dead-letter it if that was its last attempt.
    fn nack<'a>(
        &'a self,
        delivery: &'a Delivery,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Leave the group now.
    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>>;
}

/// A message bus.
pub trait Bus: Send + Sync {
    /// Which backend this is, for logs and metrics (`embedded`, `jetstream`).
    fn backend(&self) -> &'static str;

    /// Make the topic; a no-op when it exists with the same partitions, a
    /// `Conflict` when it exists with others.
    fn create_topic<'a>(&'a self, spec: &'a TopicSpec) -> BoxFuture<'a, Result<(), Error>>;

    /// Publish `batch` in order; durable when this returns. A `NotFound` error for a
    /// topic that does not exist, `InvalidInput` for a message or batch over the
    /// limits (nothing of the batch is published then).
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'a, Result<Vec<Published>, Error>>;

    /// Join `group` on `topic` as a new member.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, Error>>;

    /// Move `group`'s position on `topic` (replay or skip). Members see the new
    /// position from their next delivery on.
    fn seek<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        to: StartAt,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Messages stored but not yet acked by `group`, over all partitions.
    fn lag<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, Error>>;
}

/// A shared bus.
pub type SharedBus = Arc<dyn Bus>;

/// Publish one message.
pub async fn publish_one(
    bus: &dyn Bus,
    topic: &str,
    message: OutgoingMessage,
) -> Result<Published, Error> {
    bus.publish(topic, vec![message])
        .await?
        .pop()
        .ok_or_else(|| Error::internal("a publish of one message returned no position"))
}

/// The partition `key` belongs to, of `partitions`: FNV-1a of the key, the same on
/// every backend and in every language (documented in docs/bus-protocol.md).
pub fn partition_for(key: Option<&str>, partitions: u32) -> u32 {
    let Some(key) = key else { return 0 };
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

fn invalid(what: String) -> Error {
    Error::new(ErrorKind::InvalidInput, Origin::Downstream, what)
}

/// Check a topic or group name: 1 to 100 of letters, digits, `-`, `_` and `.`, not
/// starting with `.` or `_`.
pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= limits::MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with(['.', '_'])
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {name:?}: use 1 to {} letters, digits, '-', '_' and '.', not starting with '.' or '_'",
            limits::MAX_NAME_LEN
        )))
    }
}

/// Check a batch against the limits before anything is published.
pub fn validate_batch(topic: &str, batch: &[OutgoingMessage]) -> Result<(), Error> {
    validate_name("topic", topic)?;
    if batch.is_empty() || batch.len() > limits::MAX_BATCH {
        return Err(invalid(format!(
            "a publish carries 1 to {} messages, not {}",
            limits::MAX_BATCH,
            batch.len()
        )));
    }
    for m in batch {
        if m.id.is_empty() || m.id.len() > 200 {
            return Err(invalid(format!(
                "message id {:?} must be 1 to 200 characters",
                m.id
            )));
        }
        let size = m.size();
        if size > limits::MAX_MESSAGE_BYTES {
            return Err(invalid(format!(
                "message {} is {size} bytes; the limit is {}",
                m.id,
                limits::MAX_MESSAGE_BYTES
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_distinct_time_ordered_version_7_uuids() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| OutgoingMessage::new("x").id).collect();
        assert_eq!(ids.len(), 1000);
        for id in ids.iter().take(20) {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 7, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert_eq!(id, &u.hyphenated().to_string(), "lower case, hyphenated");
            let (secs, nanos) = u.get_timestamp().unwrap().to_unix();
            let millis = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(millis >= before && millis < before + 60_000, "{id}");
        }
    }

    #[test]
    fn keys_spread_and_stay_put() {
        assert_eq!(partition_for(None, 8), 0);
        let p = partition_for(Some("order-17"), 8);
        assert_eq!(p, partition_for(Some("order-17"), 8));
        let used: std::collections::HashSet<u32> = (0..200)
            .map(|i| partition_for(Some(&format!("k-{i}")), 8))
            .collect();
        assert_eq!(used.len(), 8);
        // FNV-1a 32 of "a" is 0xe40c292c: other languages must agree.
        assert_eq!(partition_for(Some("a"), u32::MAX), 0xe40c_292c);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let o = SubscribeOptions {
            backoff_initial_ms: 100,
            backoff_max_ms: 350,
            ..Default::default()
        };
        assert_eq!(o.backoff(1), Duration::from_millis(100));
        assert_eq!(o.backoff(2), Duration::from_millis(200));
        assert_eq!(o.backoff(3), Duration::from_millis(350));
        assert_eq!(o.backoff(40), Duration::from_millis(350));
    }

    #[test]
    fn bad_names_batches_and_options_are_refused() {
        assert!(validate_name("topic", "orders.placed-v1").is_ok());
        for bad in ["", ".x", "_x", "a..b", "a b", "ä", &"x".repeat(101)] {
            assert!(validate_name("topic", bad).is_err(), "{bad:?}");
        }
        assert!(validate_batch("t", &[]).is_err());
        let big = OutgoingMessage::new(vec![0u8; limits::MAX_MESSAGE_BYTES + 1]);
        let err = validate_batch("t", &[big]).unwrap_err().to_string();
        assert!(err.contains("limit"), "{err}");
        let o = SubscribeOptions {
            max_in_flight: 0,
            ..Default::default()
        };
        assert!(o.validate().is_err());
        assert!(SubscribeOptions::default().validate().is_ok());
    }
}

//! The bus over one NATS connection: topics, publishing, positions and lag.

use crate::codec;
use crate::consumer::{self, Member};
use crate::error::{self, conflict, invalid, not_found};
use crate::names::{self, Names};
use crate::options::NatsOptions;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer, ReplayPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, kv, AckKind, ErrorCode};
use async_nats::Subject;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use shoal_bus::{
    headers, limits, partition_for, validate_batch, validate_name, BoxFuture, Bus, Consumer,
    Message, OutgoingMessage, Published, StartAt, SubscribeOptions, TopicSpec,
};
use shoal_core::{Error, ErrorKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tokio::sync::OnceCell;

/// Topics whose partition count a bus remembers; past this it forgets them all and
/// asks again (one stream-info call per topic).
const MAX_CACHED_TOPICS: usize = 4_096;
/// How long the group bucket keeps a lease nobody renews (leases are judged by their
/// own TTL; this only clears away the keys of members that died).
const BUCKET_MAX_AGE: Duration = Duration::from_secs(3_600);
/// JetStream's default duplicate window, shortened to the retention when that is
/// shorter (the server refuses a window longer than the stream's max age).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// A topic's partitions and their subjects, ready for publishing.
pub(crate) struct TopicInfo {
    pub(crate) subjects: Vec<Subject>,
}

/// The members of each (topic, group) in this process.
type LocalMembers = HashMap<(String, String), Vec<Weak<Member>>>;

/// What the bus and its consumers share.
pub(crate) struct Inner {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) options: NatsOptions,
    pub(crate) names: Names,
    max_payload: usize,
    /// Publishes sent and not yet acknowledged, over all callers: a batch takes its
    /// permits all at once, before sending, and gives them back when its
    /// acknowledgements are in. All at once, so concurrent batches cannot each hold
    /// part of the window and wait for the rest forever.
    window: tokio::sync::Semaphore,
    topics: RwLock<HashMap<String, Arc<TopicInfo>>>,
    kv: OnceCell<kv::Store>,
    /// The members of each (topic, group) in this process, so a `seek` through this
    /// bus can hold them while it moves the group.
    members: Mutex<LocalMembers>,
}

/// The bus contract on NATS JetStream. See the crate documentation for the mapping.
#[derive(Clone)]
pub struct JetStreamBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JetStreamBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamBus")
            .field("prefix", &self.inner.options.prefix)
            .finish_non_exhaustive()
    }
}

impl JetStreamBus {
    /// Connect to the NATS server at `url` (`nats://host:port`), which must have
    /// JetStream enabled. `Unavailable` (retryable) when the server cannot be reached,
    /// `Config` for bad options or a server without JetStream.
    ///
    /// Once connected, the client reconnects by itself after the connection drops;
    /// calls made meanwhile fail with `Unavailable` after `request_timeout_ms`.
    pub async fn connect(url: &str, options: NatsOptions) -> Result<Self, Error> {
        options.validate()?;
        let client = async_nats::ConnectOptions::new()
            .name("shoal-bus")
            .connection_timeout(Duration::from_millis(options.connect_timeout_ms))
            .request_timeout(Some(options.request_timeout()))
            .connect(url)
            .await
            .map_err(|e| {
                Error::unavailable(format!("cannot connect to the NATS server at {url}"))
                    .with_source(e)
            })?;
        // async-nats's own limit sits above ours (a batch larger than the window, and
        // dead letters, go past ours), so it never makes a sender wait.
        let js = jetstream::ContextBuilder::new()
            .timeout(options.request_timeout())
            .max_ack_inflight(options.max_pending_acks + 2 * limits::MAX_BATCH)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let account: Response<serde_json::Value> = js
            .request("INFO", &())
            .await
            .map_err(|e| error::request(format!("JetStream at {url}"), e))?;
        if let Response::Err { error } = account {
            let code = error.error_code();
            if code == ErrorCode::JETSTREAM_NOT_ENABLED
                || code == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
            {
                return Err(Error::config(format!(
                    "the NATS server at {url} runs without JetStream (start it with -js)"
                ))
                .with_source(error));
            }
            return Err(error::api(format!("JetStream at {url}"), error));
        }
        let max_payload = client.server_info().max_payload;
        let names = Names::new(options.prefix.clone());
        let window = options.max_pending_acks;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                options,
                names,
                max_payload,
                window: tokio::sync::Semaphore::new(window),
                topics: RwLock::new(HashMap::new()),
                kv: OnceCell::new(),
                members: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl Inner {
    /// A JetStream API call: the outer error when the server did not answer, the
    /// inner one when it refused.
    pub(crate) async fn api<T: DeserializeOwned>(
        &self,
        what: &str,
        subject: String,
        body: &serde_json::Value,
    ) -> Result<Result<T, jetstream::Error>, Error> {
        match self.js.request(subject, body).await {
            Ok(Response::Ok(v)) => Ok(Ok(v)),
            Ok(Response::Err { error }) => Ok(Err(error)),
            Err(e) => Err(error::request(what, e)),
        }
    }

    async fn stream_info(&self, stream: &str) -> Result<Option<stream::Info>, Error> {
        let what = format!("stream {stream}");
        match self
            .api::<stream::Info>(
                &what,
                format!("STREAM.INFO.{stream}"),
                &serde_json::json!({}),
            )
            .await?
        {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND => Ok(None),
            Err(e) => Err(error::api(what, e)),
        }
    }

    /// The consumer's state; `None` when it does not exist.
    pub(crate) async fn consumer_info(
        &self,
        stream: &str,
        consumer: &str,
    ) -> Result<Option<jetstream::consumer::Info>, Error> {
        let what = format!("consumer {consumer} of stream {stream}");
        match self
            .api::<jetstream::consumer::Info>(
                &what,
                format!("CONSUMER.INFO.{stream}.{consumer}"),
                &serde_json::json!({}),
            )
            .await?
        {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND => Ok(None),
            Err(e) => Err(error::api(what, e)),
        }
    }

    async fn delete_consumer(&self, stream: &str, consumer: &str) -> Result<(), Error> {
        let what = format!("delete consumer {consumer} of stream {stream}");
        match self
            .api::<serde_json::Value>(
                &what,
                format!("CONSUMER.DELETE.{stream}.{consumer}"),
                &serde_json::json!({}),
            )
            .await?
        {
            Ok(_) => Ok(()),
            Err(e) if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND => Ok(()),
            Err(e) => Err(error::api(what, e)),
        }
    }

    /// The topic's partitions, from the cache or its stream's description.
    pub(crate) async fn topic(&self, topic: &str) -> Result<Arc<TopicInfo>, Error> {
        if let Some(t) = self.read_topics().get(topic) {
            return Ok(t.clone());
        }
        let stream = self.names.stream(topic);
        let Some(info) = self.stream_info(&stream).await? else {
            return Err(not_found(format!("topic {topic} does not exist")));
        };
        match info
            .config
            .description
            .as_deref()
            .and_then(names::parse_topic_description)
        {
            Some((t, partitions)) if t == topic => Ok(self.remember(topic, partitions)),
            _ => Err(not_found(format!(
                "topic {topic} does not exist (stream {stream} belongs to something else)"
            ))),
        }
    }

    fn read_topics(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<TopicInfo>>> {
        // A panic while holding this lock cannot leave the map half-changed: every
        // write is one insert or clear.
        self.topics.read().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, topic: &str, partitions: u32) -> Arc<TopicInfo> {
        let info = Arc::new(TopicInfo {
            subjects: (0..partitions)
                .map(|p| Subject::from(self.names.subject(topic, p)))
                .collect(),
        });
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if topics.len() >= MAX_CACHED_TOPICS {
            topics.clear();
        }
        topics.insert(topic.to_string(), info.clone());
        info
    }

    fn forget(&self, topic: &str) {
        self.topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(topic);
    }

    pub(crate) async fn create_topic(&self, spec: &TopicSpec) -> Result<(), Error> {
        validate_name("topic", &spec.name)?;
        if spec.partitions == 0 || spec.partitions > limits::MAX_PARTITIONS {
            return Err(invalid(format!(
                "topic {}: {} partitions is out of range (1 to {})",
                spec.name,
                spec.partitions,
                limits::MAX_PARTITIONS
            )));
        }
        let stream = self.names.stream(&spec.name);
        let max_age = Duration::from_millis(spec.retention_ms.unwrap_or(0));
        let config = stream::Config {
            name: stream.clone(),
            description: Some(names::topic_description(&spec.name, spec.partitions)),
            subjects: vec![self.names.subjects(&spec.name)],
            // JetStream limits a whole stream: the topic's limit per partition times
            // its partitions. A busy partition may so hold more than its share.
            max_bytes: spec.retention_bytes.map_or(-1, |b| {
                i64::try_from(b.saturating_mul(u64::from(spec.partitions))).unwrap_or(i64::MAX)
            }),
            max_messages: -1,
            max_age,
            duplicate_window: if max_age.is_zero() {
                DUPLICATE_WINDOW
            } else {
                DUPLICATE_WINDOW.min(max_age)
            },
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            num_replicas: 1,
            ..Default::default()
        };
        let what = format!("create topic {}", spec.name);
        match self.js.create_stream(config).await {
            Ok(_) => {
                self.remember(&spec.name, spec.partitions);
                return Ok(());
            }
            Err(e) => match e.kind() {
                jetstream::context::CreateStreamErrorKind::JetStream(api)
                    if api.error_code() == ErrorCode::STREAM_NAME_EXIST => {}
                jetstream::context::CreateStreamErrorKind::JetStream(api)
                    if api.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP =>
                {
                    return Err(conflict(format!(
                        "topic {}: another stream on this server takes its subjects",
                        spec.name
                    ))
                    .with_source(e));
                }
                jetstream::context::CreateStreamErrorKind::JetStream(api) => {
                    return Err(error::api(what, api));
                }
                jetstream::context::CreateStreamErrorKind::TimedOut => {
                    return Err(error::unavailable(what, e));
                }
                _ => {
                    return Err(
                        Error::new(ErrorKind::Protocol, shoal_core::Origin::Upstream, what)
                            .with_source(e),
                    )
                }
            },
        }
        // The stream exists with another configuration: the same topic with other
        // retention (kept as it is), or a conflict.
        let info = self
            .stream_info(&stream)
            .await?
            .ok_or_else(|| Error::unavailable(format!("{what}: the stream came and went")))?;
        match info
            .config
            .description
            .as_deref()
            .and_then(names::parse_topic_description)
        {
            Some((t, partitions)) if t == spec.name && partitions == spec.partitions => {
                self.remember(&spec.name, partitions);
                Ok(())
            }
            Some((t, partitions)) if t == spec.name => Err(conflict(format!(
                "topic {t} exists with {partitions} partitions, not {}",
                spec.partitions
            ))),
            Some((t, _)) => Err(conflict(format!(
                "topic {} would share stream {stream} with topic {t}; rename one \
                 (stream names spell '.' as '_')",
                spec.name
            ))),
            None => Err(conflict(format!(
                "topic {}: stream {stream} exists and is not a bus topic",
                spec.name
            ))),
        }
    }

    pub(crate) async fn publish(
        &self,
        topic: &str,
        batch: Vec<OutgoingMessage>,
    ) -> Result<Vec<Published>, Error> {
        validate_batch(topic, &batch)?;
        // Everything is checked before anything is sent: a refused batch leaves
        // nothing behind.
        let mut encoded = Vec::with_capacity(batch.len());
        for m in &batch {
            let h = codec::encode(m)?;
            self.check_size(topic, &m.id, &h, m.payload.len())?;
            encoded.push(h);
        }
        let info = self.topic(topic).await?;
        let partitions = info.subjects.len() as u32;
        let want = batch.len().min(self.options.max_pending_acks) as u32;
        let _permits = self
            .window
            .acquire_many(want)
            .await
            .map_err(|_| Error::internal("the publish window is closed"))?;
        let mut pending = Vec::with_capacity(batch.len());
        for (m, h) in batch.into_iter().zip(encoded) {
            let p = partition_for(m.key.as_deref(), partitions);
            let ack = self
                .send(topic, &info.subjects[p as usize], m.payload, h)
                .await?;
            pending.push((p, ack));
        }
        // All sent, now the acknowledgements: one round trip for the whole batch.
        let mut out = Vec::with_capacity(pending.len());
        for (partition, ack) in pending {
            let ack = ack.await.map_err(|e| {
                let e = error::publish(topic, e);
                if e.kind() == ErrorKind::NotFound {
                    self.forget(topic);
                }
                e
            })?;
            out.push(Published {
                partition,
                offset: ack.sequence,
            });
        }
        Ok(out)
    }

    fn check_size(
        &self,
        topic: &str,
        id: &str,
        headers: &async_nats::HeaderMap,
        payload: usize,
    ) -> Result<(), Error> {
        let size = codec::wire_size(headers, payload);
        if size > self.max_payload {
            return Err(invalid(format!(
                "message {id} to {topic} takes {size} bytes with its NATS headers; the \
                 server's max_payload is {} (scripts/nats-server sets 2 MiB)",
                self.max_payload
            )));
        }
        Ok(())
    }

    async fn send(
        &self,
        topic: &str,
        subject: &Subject,
        payload: Bytes,
        headers: async_nats::HeaderMap,
    ) -> Result<PublishAckFuture, Error> {
        self.js
            .send_publish(
                subject.clone(),
                PublishMessage::build().payload(payload).headers(headers),
            )
            .await
            .map_err(|e| error::publish(topic, e))
    }

    /// Put `message` on the dead-letter topic of `topic` for `group`, after `attempts`
    /// deliveries. It keeps its id, key, headers and payload, and gains headers saying
    /// where it came from.
    pub(crate) async fn dead_letter(
        &self,
        group: &str,
        options: &SubscribeOptions,
        message: &Message,
        attempts: u32,
    ) -> Result<(), Error> {
        let dead = options.dead_letter_topic_for(&message.topic);
        let info = match self.topic(&dead).await {
            Ok(info) => info,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.create_topic(&TopicSpec::new(&dead, 1)).await?;
                self.topic(&dead).await?
            }
            Err(e) => return Err(e),
        };
        let mut out = OutgoingMessage {
            id: message.id.clone(),
            key: message.key.clone(),
            headers: message.headers.clone(),
            payload: message.payload.clone(),
        };
        out.headers
            .insert(headers::DEAD_TOPIC.into(), message.topic.clone());
        out.headers.insert(
            headers::DEAD_POSITION.into(),
            format!("{}/{}", message.partition, message.offset),
        );
        out.headers
            .insert(headers::DEAD_ATTEMPTS.into(), attempts.to_string());
        out.headers
            .insert(headers::DEAD_GROUP.into(), group.to_string());
        let mut h = codec::encode(&out)?;
        // Dedupe on what was given up and by whom: a second try of this dead-lettering
        // (after a crash) is dropped, another group's is not.
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            codec::header_value(&format!(
                "dead/{group}/{}/{}/{}",
                message.topic, message.partition, message.offset
            ))?,
        );
        h.insert(codec::ID_HEADER, codec::header_value(&message.id)?);
        self.check_size(&dead, &message.id, &h, out.payload.len())?;
        let partitions = info.subjects.len() as u32;
        let p = partition_for(out.key.as_deref(), partitions);
        let ack = self
            .send(&dead, &info.subjects[p as usize], out.payload, h)
            .await?;
        ack.await.map_err(|e| error::publish(&dead, e))?;
        Ok(())
    }

    /// Acknowledge a delivery without waiting for the server's confirmation, as
    /// JetStream clients do by default: it travels on the connection ahead of anything
    /// sent after it, and if the connection drops first the message is delivered again,
    /// which at-least-once allows. Waiting would cost a round trip per message.
    pub(crate) async fn ack_async(&self, reply: &Subject) -> Result<(), Error> {
        self.client
            .publish(reply.clone(), Bytes::from(AckKind::Ack))
            .await
            .map_err(|e| error::unavailable("ack", e))
    }

    /// Nak or terminate a delivery (or acknowledge it) and wait for the server to
    /// confirm it: what follows (a dead letter, a lag query) relies on it.
    pub(crate) async fn ack(&self, reply: &Subject, kind: AckKind) -> Result<(), Error> {
        match self.client.request(reply.clone(), Bytes::from(kind)).await {
            Ok(_) => Ok(()),
            // The consumer is gone (the group was moved by a seek): nothing to ack.
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(error::unavailable("ack", e)),
        }
    }

    /// The KV bucket of group leases, made on first use. Its stream is made here
    /// rather than by async-nats's `create_key_value`, which reads the account info in
    /// a shape nats-server 2.9 does not answer; the settings are the same.
    pub(crate) async fn kv(&self) -> Result<&kv::Store, Error> {
        self.kv
            .get_or_try_init(|| async {
                let bucket = self.names.bucket();
                let what = format!("group bucket {bucket}");
                let config = stream::Config {
                    name: format!("KV_{bucket}"),
                    description: Some("shoal bus group members (leases)".into()),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    max_messages: -1,
                    max_bytes: -1,
                    max_age: BUCKET_MAX_AGE,
                    duplicate_window: DUPLICATE_WINDOW,
                    storage: StorageType::File,
                    discard: DiscardPolicy::New,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    num_replicas: 1,
                    ..Default::default()
                };
                match self.js.create_stream(config).await {
                    Ok(_) => {}
                    // Made by another process, perhaps with other settings: use it.
                    Err(e) => match e.kind() {
                        jetstream::context::CreateStreamErrorKind::JetStream(api)
                            if api.error_code() == ErrorCode::STREAM_NAME_EXIST => {}
                        jetstream::context::CreateStreamErrorKind::JetStream(api) => {
                            return Err(error::api(what, api))
                        }
                        _ => return Err(error::unavailable(what, e)),
                    },
                }
                self.js
                    .get_key_value(&bucket)
                    .await
                    .map_err(|e| error::unavailable(what, e))
            })
            .await
    }

    /// The settings of a group's consumer for one partition.
    pub(crate) fn consumer_config(
        &self,
        topic: &str,
        group: &str,
        partition: u32,
        options: &SubscribeOptions,
        deliver_policy: DeliverPolicy,
    ) -> pull::Config {
        let name = names::consumer(group, partition);
        pull::Config {
            durable_name: Some(name.clone()),
            name: Some(name),
            description: Some(names::group_description(group, partition)),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(options.ack_timeout_ms),
            // Unlimited: the bus counts attempts and dead-letters, so the server never
            // drops a message silently after its last delivery.
            max_deliver: -1,
            filter_subject: self.names.subject(topic, partition),
            replay_policy: ReplayPolicy::Instant,
            max_ack_pending: i64::from(options.max_in_flight),
            ..Default::default()
        }
    }

    /// The group's consumer of `partition`: made at `start` when the group has none,
    /// otherwise the existing one (its position kept), with this member's ack timeout
    /// and in-flight limit applied to it.
    pub(crate) async fn ensure_consumer(
        &self,
        topic: &str,
        group: &str,
        partition: u32,
        options: &SubscribeOptions,
        start: StartAt,
    ) -> Result<PullConsumer, Error> {
        let stream = self.names.stream(topic);
        let name = names::consumer(group, partition);
        for _ in 0..3 {
            let config = match self.consumer_info(&stream, &name).await? {
                Some(info) => {
                    check_group(&info, topic, group, partition)?;
                    let want_wait = Duration::from_millis(options.ack_timeout_ms);
                    let want_pending = i64::from(options.max_in_flight);
                    if info.config.ack_wait == want_wait
                        && info.config.max_ack_pending == want_pending
                    {
                        return Ok(PullConsumer::new(
                            pull_config(&info)?,
                            info,
                            self.js.clone(),
                        ));
                    }
                    self.consumer_config(
                        topic,
                        group,
                        partition,
                        options,
                        info.config.deliver_policy,
                    )
                }
                None => {
                    self.consumer_config(topic, group, partition, options, deliver_policy(start)?)
                }
            };
            match self.js.create_consumer_on_stream(config, &stream).await {
                Ok(c) => return Ok(c),
                // Another member made it a moment ago: take that one.
                Err(e) if consumer_exists(&e) => continue,
                Err(e) => return Err(consumer_error(&format!("consumer {name}"), e)),
            }
        }
        Err(Error::unavailable(format!(
            "consumer {name} of {stream} keeps changing under us"
        )))
    }

    pub(crate) fn register(&self, member: &Arc<Member>) {
        let mut all = self.members.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|_, v| {
            v.retain(|w| w.strong_count() > 0);
            !v.is_empty()
        });
        all.entry((member.topic.clone(), member.group.clone()))
            .or_default()
            .push(Arc::downgrade(member));
    }

    fn local_members(&self, topic: &str, group: &str) -> Vec<Arc<Member>> {
        let all = self.members.lock().unwrap_or_else(|e| e.into_inner());
        all.get(&(topic.to_string(), group.to_string()))
            .map(|v| v.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default()
    }

    async fn seek(&self, topic: &str, group: &str, to: StartAt) -> Result<(), Error> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let policy = deliver_policy(to)?;
        let partitions = self.topic(topic).await?.subjects.len() as u32;
        // This process's members stop fetching and drop what they hold until the
        // group's consumers are made again at the new position.
        let _hold = consumer::Hold::new(self.local_members(topic, group));
        let stream = self.names.stream(topic);
        for p in 0..partitions {
            let name = names::consumer(group, p);
            let mut config = match self.consumer_info(&stream, &name).await? {
                Some(info) => {
                    check_group(&info, topic, group, p)?;
                    pull_config(&info)?
                }
                None => self.consumer_config(topic, group, p, &SubscribeOptions::default(), policy),
            };
            config.deliver_policy = policy;
            let mut made = false;
            for _ in 0..3 {
                self.delete_consumer(&stream, &name).await?;
                match self
                    .js
                    .create_consumer_on_stream(config.clone(), &stream)
                    .await
                {
                    Ok(_) => {
                        made = true;
                        break;
                    }
                    // A member of another process made it again in between (at the
                    // old start): delete it again.
                    Err(e) if consumer_exists(&e) => continue,
                    Err(e) => return Err(consumer_error(&format!("seek {name}"), e)),
                }
            }
            if !made {
                return Err(Error::unavailable(format!(
                    "seek of group {group} on {topic}: its consumer {name} keeps being made \
                     again by members; try again"
                )));
            }
        }
        Ok(())
    }

    async fn lag(&self, topic: &str, group: &str) -> Result<u64, Error> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        let partitions = self.topic(topic).await?.subjects.len() as u32;
        let stream = self.names.stream(topic);
        let mut lag = 0u64;
        for p in 0..partitions {
            let name = names::consumer(group, p);
            let info = self.consumer_info(&stream, &name).await?.ok_or_else(|| {
                not_found(format!(
                    "group {group} has no position on topic {topic} (it never subscribed)"
                ))
            })?;
            check_group(&info, topic, group, p)?;
            lag += info.num_pending + info.num_ack_pending as u64;
        }
        Ok(lag)
    }
}

/// The consumer belongs to this group (and not to another whose name maps onto the
/// same consumer name).
fn check_group(
    info: &jetstream::consumer::Info,
    topic: &str,
    group: &str,
    partition: u32,
) -> Result<(), Error> {
    let want = names::group_description(group, partition);
    if info.config.description.as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    Err(conflict(format!(
        "group {group} on topic {topic}: consumer {} is taken by {:?} (consumer names \
         spell '.' as '_'); rename the group",
        info.name,
        info.config
            .description
            .as_deref()
            .unwrap_or("something else")
    )))
}

fn pull_config(info: &jetstream::consumer::Info) -> Result<pull::Config, Error> {
    use async_nats::jetstream::consumer::FromConsumer;
    pull::Config::try_from_consumer_config(info.config.clone()).map_err(|e| {
        conflict(format!(
            "consumer {} is not a pull consumer: {e}; it is not the bus's",
            info.name
        ))
    })
}

fn consumer_exists(e: &jetstream::stream::ConsumerError) -> bool {
    matches!(
        e.kind(),
        jetstream::stream::ConsumerErrorKind::JetStream(api)
            if api.error_code() == ErrorCode::CONSUMER_NAME_EXIST
                || api.error_code() == ErrorCode::CONSUMER_ALREADY_EXISTS
                || api.error_code() == ErrorCode::CONSUMER_EXISTING_ACTIVE
    )
}

fn consumer_error(what: &str, e: jetstream::stream::ConsumerError) -> Error {
    match e.kind() {
        jetstream::stream::ConsumerErrorKind::JetStream(api) => error::api(what, api),
        jetstream::stream::ConsumerErrorKind::TimedOut
        | jetstream::stream::ConsumerErrorKind::Request => error::unavailable(what, e),
        _ => Error::new(
            ErrorKind::Protocol,
            shoal_core::Origin::Upstream,
            what.to_string(),
        )
        .with_source(e),
    }
}

fn deliver_policy(start: StartAt) -> Result<DeliverPolicy, Error> {
    Ok(match start {
        StartAt::Earliest | StartAt::Offset(0) => DeliverPolicy::All,
        StartAt::Latest => DeliverPolicy::New,
        StartAt::Offset(n) => DeliverPolicy::ByStartSequence { start_sequence: n },
        StartAt::TimeMs(ms) => DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::from_nanos(i128::from(ms) * 1_000_000)
                .map_err(|e| invalid(format!("start time {ms} ms: {e}")))?,
        },
    })
}

impl Bus for JetStreamBus {
    fn backend(&self) -> &'static str {
        "jetstream"
    }

    fn create_topic<'a>(&'a self, spec: &'a TopicSpec) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.create_topic(spec))
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'a, Result<Vec<Published>, Error>> {
        Box::pin(self.inner.publish(topic, batch))
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, Error>> {
        Box::pin(async move {
            let c = consumer::subscribe(self.inner.clone(), topic, group, options).await?;
            Ok(Box::new(c) as Box<dyn Consumer>)
        })
    }

    fn seek<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        to: StartAt,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.seek(topic, group, to))
    }

    fn lag<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(self.inner.lag(topic, group))
    }
}

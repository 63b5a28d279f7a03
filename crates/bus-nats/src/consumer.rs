//! A group member: its lease, the fetchers of its partitions, its deliveries in flight.

use crate::bus::Inner;
use crate::codec::{self, Position};
use crate::membership::{self, Lease, View};
use crate::names;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, kv, AckKind};
use async_nats::Subject;
use bytes::Bytes;
use futures_util::StreamExt;
use shoal_bus::{validate_name, BoxFuture, Consumer, Delivery, Message, SubscribeOptions};
use shoal_core::{Error, ErrorKind};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Deliveries fetched and not yet handed out, over all partitions of a member.
const BUFFERED: usize = 256;
/// Messages asked for in one pull request, at most (fewer when `max_in_flight` is
/// lower). With the buffer above, this bounds what a member holds that it has not
/// handed out yet.
const MAX_FETCH_BATCH: u32 = 64;
/// How long one pull request waits on the server for messages. A member keeps a
/// partition it lost until its request ends: this is the overlap of a rebalance.
const FETCH_WAIT: Duration = Duration::from_secs(2);
/// Failed fetches back off from this, doubling.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// A consumer missing this many fetches in a row was deleted by someone else than a
/// seek (which makes it again within milliseconds): the member makes it again.
const MISSING_BEFORE_REMAKE: u32 = 5;

/// One member, as its tasks and the bus (for a seek) see it.
pub(crate) struct Member {
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) options: SubscribeOptions,
    /// (generation, holds): deliveries are tagged with the generation they were
    /// fetched in, and one of an older generation is dropped instead of handed out.
    /// A seek holds the member (no fetching while `holds > 0`) and moves the
    /// generation on; so does a fetcher that finds its consumer made again by a seek
    /// of another process.
    state: watch::Sender<(u64, u32)>,
}

impl Member {
    fn generation(&self) -> u64 {
        self.state.borrow().0
    }
}

/// The members of a group held while a seek moves it; they resume when this drops.
pub(crate) struct Hold {
    members: Vec<Arc<Member>>,
}

impl Hold {
    pub(crate) fn new(members: Vec<Arc<Member>>) -> Self {
        for m in &members {
            m.state.send_modify(|(g, holds)| {
                *g += 1;
                *holds += 1;
            });
        }
        Self { members }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        for m in &self.members {
            m.state.send_modify(|(g, holds)| {
                *g += 1;
                *holds = holds.saturating_sub(1);
            });
        }
    }
}

/// What fetchers hand to the member.
enum Fetched {
    Delivery {
        message: Message,
        attempt: u32,
        reply: Subject,
        generation: u64,
    },
    /// The topic is gone: the member cannot go on.
    Failed(Error),
}

/// A delivery handed out and not yet acked or nacked.
struct InFlight {
    reply: Subject,
    generation: u64,
}

/// Deliveries in flight by token, bounded: past `cap` the oldest are forgotten (they
/// were redelivered long ago; an ack of one is then a no-op and the message comes
/// again).
struct Tokens {
    next: u64,
    cap: usize,
    map: BTreeMap<u64, InFlight>,
}

impl Tokens {
    fn insert(&mut self, f: InFlight) -> u64 {
        self.next += 1;
        while self.map.len() >= self.cap {
            self.map.pop_first();
        }
        self.map.insert(self.next, f);
        self.next
    }
}

/// One member of a group, as handed to the caller.
pub(crate) struct JetStreamConsumer {
    bus: Arc<Inner>,
    member: Arc<Member>,
    tokens: Arc<Mutex<Tokens>>,
    rx: mpsc::Receiver<Fetched>,
    running: Option<Running>,
}

/// The member's background task, until it leaves.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// Join `group` on `topic`.
pub(crate) async fn subscribe(
    bus: Arc<Inner>,
    topic: &str,
    group: &str,
    options: SubscribeOptions,
) -> Result<JetStreamConsumer, Error> {
    validate_name("topic", topic)?;
    validate_name("group", group)?;
    options.validate()?;
    validate_name("dead-letter topic", &options.dead_letter_topic_for(topic))?;
    let partitions = bus.topic(topic).await?.subjects.len() as u32;
    // Every partition's consumer exists before this returns: the group's position is
    // fixed now (`StartAt::Latest` means from now on), and lag counts from here.
    let mut consumers = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        consumers.push(
            bus.ensure_consumer(topic, group, p, &options, options.start)
                .await?,
        );
    }
    let kv = bus.kv().await?.clone();
    let me = uuid::Uuid::now_v7().simple().to_string();
    let prefix = names::lease_prefix(topic, group);
    let ttl = bus.options.lease_ttl();
    let lease = Lease::new(kv.clone(), &prefix, &me, ttl);
    lease.renew().await?;
    let mut view = View::new(&prefix, &me, ttl);
    let watch = membership::watch(&kv, &mut view, bus.options.request_timeout()).await?;

    let member = Arc::new(Member {
        topic: topic.to_string(),
        group: group.to_string(),
        options,
        state: watch::Sender::new((0, 0)),
    });
    bus.register(&member);
    let cap = (member.options.max_in_flight as usize)
        .saturating_mul(partitions as usize)
        .saturating_mul(2)
        .clamp(1_024, 131_072);
    let (tx, rx) = mpsc::channel(BUFFERED);
    let (stop, stop_rx) = oneshot::channel();
    let run = Membership {
        bus: bus.clone(),
        member: member.clone(),
        consumers,
        tx,
        kv,
        lease,
        view,
        fetchers: HashMap::new(),
    };
    let task = tokio::spawn(run.run(watch, stop_rx));
    Ok(JetStreamConsumer {
        bus,
        member,
        tokens: Arc::new(Mutex::new(Tokens {
            next: 0,
            cap,
            map: BTreeMap::new(),
        })),
        rx,
        running: Some(Running { stop, task }),
    })
}

/// A fetcher of one partition.
struct Fetcher {
    owned: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// The member's background work: lease, view, and the fetchers of its partitions.
struct Membership {
    bus: Arc<Inner>,
    member: Arc<Member>,
    consumers: Vec<PullConsumer>,
    tx: mpsc::Sender<Fetched>,
    kv: kv::Store,
    lease: Lease,
    view: View,
    fetchers: HashMap<u32, Fetcher>,
}

impl Membership {
    async fn run(mut self, watch: kv::Watch, mut stop: oneshot::Receiver<()>) {
        let ttl = self.bus.options.lease_ttl();
        let mut renew = tokio::time::interval_at(Instant::now() + ttl / 3, ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = Some(watch);
        let mut rewatch_at = Instant::now();
        let mut rewatch_delay = RETRY_MIN;
        loop {
            self.rebalance();
            let expiry = self.view.next_expiry();
            tokio::select! {
                _ = &mut stop => break,
                _ = renew.tick() => {
                    if let Err(e) = self.lease.renew().await {
                        tracing::warn!(topic = %self.member.topic, group = %self.member.group, error = %e, "group lease not renewed");
                    }
                }
                entry = next_entry(&mut watch) => match entry {
                    Some(Ok(entry)) => self.view.apply(&entry),
                    other => {
                        let why = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "the watch ended".to_string(),
                        };
                        tracing::warn!(topic = %self.member.topic, group = %self.member.group, error = %why, "group watch lost; watching again");
                        watch = None;
                        rewatch_at = Instant::now() + rewatch_delay;
                    }
                },
                _ = tokio::time::sleep_until(rewatch_at), if watch.is_none() => {
                    match membership::watch(&self.kv, &mut self.view, self.bus.options.request_timeout()).await {
                        Ok(w) => {
                            watch = Some(w);
                            rewatch_delay = RETRY_MIN;
                        }
                        Err(e) => {
                            tracing::warn!(topic = %self.member.topic, group = %self.member.group, error = %e, "cannot watch the group");
                            rewatch_delay = (rewatch_delay * 2).min(RETRY_MAX);
                            rewatch_at = Instant::now() + rewatch_delay;
                        }
                    }
                }
                _ = sleep_until_some(expiry) => self.view.expire(Instant::now()),
            }
        }
        // Leaving: stop fetching first (dropping a pull request unsubscribes its inbox,
        // so the server stops sending to it), then give up the lease.
        for (_, f) in self.fetchers.drain() {
            f.task.abort();
            let _ = f.task.await;
        }
        self.lease.end().await;
    }

    /// Start fetchers for the partitions this member owns now, let the others finish
    /// their current request and stop.
    fn rebalance(&mut self) {
        let partitions = self.consumers.len() as u32;
        let owned = self.view.owned(partitions);
        for p in 0..partitions {
            let want = owned.contains(&p);
            let running = match self.fetchers.get(&p) {
                Some(f) if !f.task.is_finished() => {
                    if f.owned.swap(want, Ordering::Relaxed) != want {
                        tracing::debug!(topic = %self.member.topic, group = %self.member.group, partition = p, owned = want, members = self.view.size(), "partition moved");
                    }
                    true
                }
                _ => false,
            };
            if running {
                continue;
            }
            self.fetchers.remove(&p);
            if want {
                let owned = Arc::new(AtomicBool::new(true));
                let fetch = Fetch {
                    bus: self.bus.clone(),
                    member: self.member.clone(),
                    partition: p,
                    consumer: self.consumers[p as usize].clone(),
                    owned: owned.clone(),
                    tx: self.tx.clone(),
                };
                let task = tokio::spawn(fetch.run());
                self.fetchers.insert(p, Fetcher { owned, task });
            }
        }
    }
}

async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Fetches one partition for its member while the member owns it.
struct Fetch {
    bus: Arc<Inner>,
    member: Arc<Member>,
    partition: u32,
    consumer: PullConsumer,
    owned: Arc<AtomicBool>,
    tx: mpsc::Sender<Fetched>,
}

impl Fetch {
    async fn run(mut self) {
        let mut state = self.member.state.subscribe();
        let batch = self.member.options.max_in_flight.min(MAX_FETCH_BATCH) as usize;
        let mut created = self.consumer.cached_info().created;
        let mut failures = 0u32;
        while self.owned.load(Ordering::Relaxed) {
            let (generation, holds) = *state.borrow_and_update();
            if holds > 0 {
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let pull = self
                .consumer
                .batch()
                .max_messages(batch)
                .expires(FETCH_WAIT)
                .messages()
                .await;
            let failed = match pull {
                Ok(mut messages) => {
                    let mut failed = None;
                    while let Some(item) = messages.next().await {
                        match item {
                            Ok(m) => {
                                failures = 0;
                                if !self.deliver(m, generation).await {
                                    return;
                                }
                            }
                            Err(e) => {
                                failed = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    failed
                }
                Err(e) => Some(e.to_string()),
            };
            let Some(why) = failed else { continue };
            failures += 1;
            tracing::debug!(topic = %self.member.topic, group = %self.member.group, partition = self.partition, error = %why, "fetch failed");
            if let Err(e) = self.heal(&mut created, generation, failures).await {
                if e.kind() == ErrorKind::NotFound {
                    let _ = self.tx.send(Fetched::Failed(e)).await;
                    return;
                }
                tracing::warn!(topic = %self.member.topic, group = %self.member.group, partition = self.partition, error = %e, "cannot fetch");
            }
            let delay = RETRY_MIN
                .saturating_mul(1 << failures.min(5))
                .min(RETRY_MAX);
            tokio::time::sleep(delay).await;
        }
    }

    /// After a failed fetch: find out whether the consumer was made again (by a seek:
    /// what this member holds from before is stale) or is missing (made again after a
    /// while, in case someone deleted it). `NotFound` when the topic is gone.
    async fn heal(
        &mut self,
        created: &mut async_nats::datetime::DateTime,
        generation: u64,
        failures: u32,
    ) -> Result<(), Error> {
        let stream = self.bus.names.stream(&self.member.topic);
        let name = names::consumer(&self.member.group, self.partition);
        let info = match self.bus.consumer_info(&stream, &name).await {
            Ok(info) => info,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(shoal_core::Error::new(
                    ErrorKind::NotFound,
                    shoal_core::Origin::Upstream,
                    format!("topic {} was deleted", self.member.topic),
                ))
            }
            Err(e) => return Err(e),
        };
        let renewed = match info {
            Some(info) => info.created != *created,
            None if failures >= MISSING_BEFORE_REMAKE => {
                let m = &self.member;
                self.consumer = self
                    .bus
                    .ensure_consumer(
                        &m.topic,
                        &m.group,
                        self.partition,
                        &m.options,
                        m.options.start,
                    )
                    .await?;
                true
            }
            None => false,
        };
        if renewed {
            *created = self.consumer.cached_info().created;
            if let Some(info) = self.bus.consumer_info(&stream, &name).await? {
                *created = info.created;
            }
            self.member.state.send_if_modified(|(g, _)| {
                if *g == generation {
                    *g += 1;
                    true
                } else {
                    false
                }
            });
        }
        Ok(())
    }

    /// Hand one fetched message to the member, or dead-letter it when its last attempt
    /// ran out of time. `false` when the member is gone.
    async fn deliver(&self, m: jetstream::Message, generation: u64) -> bool {
        let (offset, timestamp_ms, delivered) = match m.info() {
            Ok(info) => (
                info.stream_sequence,
                u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
            ),
            Err(e) => {
                tracing::warn!(topic = %self.member.topic, error = %e, "a delivery without JetStream metadata");
                return true;
            }
        };
        let m = m.message;
        let Some(reply) = m.reply.clone() else {
            return true;
        };
        let message = codec::decode(
            Position {
                topic: &self.member.topic,
                partition: self.partition,
                offset,
                timestamp_ms,
            },
            m.headers.as_ref(),
            m.payload,
        );
        let max = self.member.options.max_deliveries;
        if delivered > max {
            // Its last attempt timed out: to the dead-letter topic instead of another.
            match self
                .bus
                .dead_letter(&self.member.group, &self.member.options, &message, max)
                .await
            {
                Ok(()) => {
                    if let Err(e) = self.bus.ack(&reply, AckKind::Term).await {
                        tracing::warn!(topic = %self.member.topic, offset, error = %e, "dead-lettered but not terminated; it may be dead-lettered twice");
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %self.member.topic, offset, error = %e, "cannot dead-letter; trying again after the ack timeout");
                }
            }
            return true;
        }
        self.tx
            .send(Fetched::Delivery {
                message,
                attempt: delivered,
                reply,
                generation,
            })
            .await
            .is_ok()
    }
}

impl JetStreamConsumer {
    fn take(&self, token: u64) -> Option<InFlight> {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .remove(&token)
    }

    fn put_back(&self, token: u64, f: InFlight) {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .insert(token, f);
    }

    /// Stop the member; what it fetched and did not see acked goes back to the group
    /// at once (nak without delay) instead of after its ack timeout.
    fn leave(&mut self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let running = self.running.take()?;
        let bus = self.bus.clone();
        let tokens = self.tokens.clone();
        let mut rx = std::mem::replace(&mut self.rx, mpsc::channel(1).1);
        Some(async move {
            let _ = running.stop.send(());
            let _ = running.task.await;
            let mut replies = Vec::new();
            rx.close();
            while let Ok(f) = rx.try_recv() {
                if let Fetched::Delivery { reply, .. } = f {
                    replies.push(reply);
                }
            }
            let held = std::mem::take(&mut tokens.lock().unwrap_or_else(|e| e.into_inner()).map);
            replies.extend(held.into_values().map(|f| f.reply));
            for reply in replies {
                let _ = bus
                    .client
                    .publish(reply, Bytes::from(AckKind::Nak(None)))
                    .await;
            }
            let _ = bus.client.flush().await;
        })
    }
}

impl Drop for JetStreamConsumer {
    fn drop(&mut self) {
        if let Some(leave) = self.leave() {
            // Without a runtime to leave from, the lease runs out by itself and the
            // server redelivers after the ack timeout.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(leave);
            }
        }
    }
}

impl Consumer for JetStreamConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, Error>> {
        Box::pin(async move {
            loop {
                let Some(f) = self.rx.recv().await else {
                    return Err(Error::internal(format!(
                        "the member of group {} on {} has stopped",
                        self.member.group, self.member.topic
                    )));
                };
                let (message, attempt, reply, generation) = match f {
                    Fetched::Failed(e) => return Err(e),
                    Fetched::Delivery {
                        message,
                        attempt,
                        reply,
                        generation,
                    } => (message, attempt, reply, generation),
                };
                if generation != self.member.generation() {
                    // Fetched before a seek moved the group: the new position decides
                    // what comes next. A nak makes it come again at once in case it was
                    // fetched from the new position after all.
                    let _ = self
                        .bus
                        .client
                        .publish(reply, Bytes::from(AckKind::Nak(None)))
                        .await;
                    continue;
                }
                let token = self
                    .tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(InFlight { reply, generation });
                return Ok(Delivery {
                    message,
                    attempt,
                    token,
                });
            }
        })
    }

    fn ack<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            // Unknown: acked already, or forgotten (see `Tokens`); stale: the group was
            // moved and its old consumer is gone.
            let Some(f) = self.take(delivery.token) else {
                return Ok(());
            };
            if f.generation != self.member.generation() {
                return Ok(());
            }
            if let Err(e) = self.bus.ack_async(&f.reply).await {
                self.put_back(delivery.token, f);
                return Err(e);
            }
            Ok(())
        })
    }

    fn nack<'a>(
        &'a self,
        delivery: &'a Delivery,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let Some(f) = self.take(delivery.token) else {
                return Ok(());
            };
            if f.generation != self.member.generation() {
                return Ok(());
            }
            let options = &self.member.options;
            let result = if delivery.attempt >= options.max_deliveries {
                match self
                    .bus
                    .dead_letter(
                        &self.member.group,
                        options,
                        &delivery.message,
                        delivery.attempt,
                    )
                    .await
                {
                    Ok(()) => self.bus.ack(&f.reply, AckKind::Term).await,
                    Err(e) => Err(e),
                }
            } else {
                let delay = delay.unwrap_or_else(|| options.backoff(delivery.attempt));
                self.bus.ack(&f.reply, AckKind::Nak(Some(delay))).await
            };
            if let Err(e) = result {
                self.put_back(delivery.token, f);
                return Err(e);
            }
            Ok(())
        })
    }

    fn close(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        let leave = self.leave();
        Box::pin(async move {
            if let Some(leave) = leave {
                leave.await;
            }
            Ok(())
        })
    }
}

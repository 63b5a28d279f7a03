//! The broker core: topics and their partition logs, the publish path, consumer
//! groups and their background timers.
//!
//! # Publish path
//!
//! A publish checks the batch, splits it by partition and queues each part straight
//! into that partition log's writer queue ([`Log::submit`]), in the order the
//! connection read the requests, then waits for the answers. The log's writer
//! thread takes everything queued while its previous fsync ran and writes it with
//! one fsync: requests arriving during an fsync share the next one (group commit),
//! however many connections or pipelined requests they come from, and publishes
//! read from one connection are stored in the order they were read. No task sits
//! between a publish and the writer: each hop between threads is paid by every
//! publisher waiting for its answer, and between two fsyncs.

use crate::config::BrokerConfig;
use crate::group::{Bounds, DeadLetter, Effects, GroupLimits, GroupState, MemberId, Reserved};
use crate::metrics::{BrokerMetrics, GroupMetrics, TopicMetrics};
use crate::offsets::{CommitWait, Committer};
use crate::protocol::{AckItem, MAX_HEADERS};
use crate::util::{
    closing, from_log, invalid, lock, not_found, now_ms, overloaded, unknown_member,
};
use crate::{catalog, message};
use shoal_bus::{
    headers, limits, partition_for, validate_name, OutgoingMessage, Published, StartAt,
    SubscribeOptions, TopicSpec,
};
use shoal_core::{Error, ErrorKind, Origin};
use shoal_log::{Log, LogConfig, Record, StoredRecord};
use shoal_telemetry::Metrics;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

/// How often leases and ack timeouts are checked when no fetch is waiting on them
/// (a waiting fetch wakes at the exact deadline itself).
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);
/// Lag gauges are refreshed every this many sweeps (one second).
const LAG_EVERY_SWEEPS: u64 = 20;
/// Publishes queued per partition before a publisher waits (back-pressure).
const APPEND_QUEUE: usize = 4096;
/// Most records in one log append (one publish's part for a partition).
const MAX_APPEND_RECORDS: usize = 100_000;
/// A fetch of at most this many deliveries, all among the newest
/// [`INLINE_READ_WINDOW`] records of their partitions, reads on the calling task.
const INLINE_READ_MAX: usize = 16;
const INLINE_READ_WINDOW: u64 = 1024;
/// Room left in a fetch answer for the frame's own fields.
const FETCH_ANSWER_SLACK: usize = 64 << 10;
/// Per-delivery framing in a fetch answer, beyond the stored record's size.
const DELIVERY_OVERHEAD: usize = 48;
/// Longest a nack waits for the dead letter it caused to be stored.
const DEAD_LETTER_WAIT: Duration = Duration::from_secs(10);
/// Name of the broker's lock file: one broker per data directory.
const LOCK_FILE: &str = "LOCK";

/// The embedded broker: open it on a data directory, [`serve`](crate::serve) it,
/// [`close`](Broker::close) it. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    config: BrokerConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serialises topic creation and catalogue writes.
    create: tokio::sync::Mutex<()>,
    members: Mutex<HashMap<MemberId, Arc<Group>>>,
    groups: AtomicUsize,
    metrics: BrokerMetrics,
    closed: AtomicBool,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Held until [`Broker::close`], so a second broker cannot open the folder.
    lock: Mutex<Option<File>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Groups point back at their topic: let both go, so the appenders end and
        // the logs close even without `Broker::close`.
        let topics = self.topics.get_mut().unwrap_or_else(|e| e.into_inner());
        for t in topics.values() {
            lock(&t.groups).clear();
        }
    }
}

pub(crate) struct Topic {
    spec: TopicSpec,
    parts: Vec<Partition>,
    groups: Mutex<HashMap<String, Arc<Group>>>,
    /// Serialises group creation on this topic (it reads the logs and persists).
    group_create: tokio::sync::Mutex<()>,
    offsets: Committer,
    /// Bumped after every append, for fetches waiting for messages.
    published: watch::Sender<u64>,
    metrics: TopicMetrics,
}

struct Partition {
    log: Arc<Log>,
}

pub(crate) struct Group {
    name: String,
    topic: Arc<Topic>,
    state: Mutex<GroupState>,
    /// Bumped whenever a waiting fetch may find something new.
    changed: watch::Sender<u64>,
    metrics: GroupMetrics,
}

/// What a join answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Joined {
    pub(crate) member: MemberId,
    pub(crate) lease_ms: u64,
    pub(crate) partitions: u32,
}

/// One delivery and its stored message.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) reserved: Reserved,
    pub(crate) record: StoredRecord,
}

/// A publish whose parts are queued; [`PublishTicket::wait`] gives the positions.
pub(crate) struct PublishTicket {
    total: usize,
    /// Per partition: the batch positions of its messages and the append's answer.
    waits: Vec<(u32, Vec<usize>, shoal_log::AppendWait)>,
    metrics: TopicMetrics,
}

impl PublishTicket {
    /// The positions, once every part is durable. If one partition's append
    /// failed the error is returned; other partitions' parts may be stored.
    pub(crate) async fn wait(self) -> Result<Vec<Published>, Error> {
        let mut out = vec![
            Published {
                partition: 0,
                offset: 0
            };
            self.total
        ];
        let mut failed = None;
        for (partition, idx, wait) in self.waits {
            match wait.wait().await {
                Ok(range) => {
                    for (k, i) in idx.into_iter().enumerate() {
                        out[i] = Published {
                            partition,
                            offset: range.start + k as u64,
                        };
                    }
                }
                Err(e) => {
                    failed.get_or_insert(from_log(e));
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        self.metrics.published.inc_by(self.total as u64);
        Ok(out)
    }
}

fn log_config(cfg: &BrokerConfig, spec: &TopicSpec) -> LogConfig {
    // A publish's part is at most a frame; its encoded records are a little larger
    // than their wire form (38 bytes of record header each).
    let max_batch_bytes = cfg.max_frame_bytes as usize + (1 << 20);
    LogConfig {
        segment_bytes: cfg.segment_bytes,
        // The bus's message limit plus the record's own framing: the id header and
        // up to MAX_HEADERS headers at 8 bytes each.
        max_record_bytes: limits::MAX_MESSAGE_BYTES + (16 << 10),
        max_batch_records: MAX_APPEND_RECORDS,
        max_batch_bytes,
        max_group_bytes: max_batch_bytes.max(16 << 20),
        write_queue: APPEND_QUEUE,
        index_interval_bytes: 4096,
        preallocate_bytes: 4 << 20,
        retention_bytes: spec.retention_bytes,
        retention_ms: spec.retention_ms,
    }
}

fn topic_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join("topics").join(name)
}

fn bad_dir(what: &str, dir: &Path, e: std::io::Error) -> Error {
    catalog::io_error(format!("{what} {}", dir.display()), e)
}

/// The blocking half of opening a topic: its logs (with recovery) and offsets.
fn open_topic_files(
    dir: &Path,
    cfg: &BrokerConfig,
    spec: &TopicSpec,
) -> Result<(Vec<Log>, Committer), Error> {
    let tdir = topic_dir(dir, &spec.name);
    std::fs::create_dir_all(&tdir).map_err(|e| bad_dir("creating", &tdir, e))?;
    let mut logs = Vec::with_capacity(spec.partitions as usize);
    for p in 0..spec.partitions {
        let log = Log::open(tdir.join(p.to_string()), log_config(cfg, spec)).map_err(|e| {
            let msg = format!("opening partition {p} of topic {}", spec.name);
            let e = from_log(e);
            Error::new(e.kind(), e.origin(), format!("{msg}: {e}")).with_retryable(e.is_retryable())
        })?;
        if let Some(t) = &log.recovery().truncation {
            warn!(topic = %spec.name, partition = p, bytes = t.bytes, resumed_at = t.resumed_at, reason = t.reason, "cut a torn tail off the partition log");
        }
        logs.push(log);
    }
    let offsets = Committer::open(&tdir.join("offsets"))?;
    Ok((logs, offsets))
}

impl Broker {
    /// Opens the broker in `dir` (created if needed): reads the topic catalogue,
    /// opens and recovers every partition log, starts the timers. Its series go
    /// into `metrics`.
    pub async fn open(
        dir: impl AsRef<Path>,
        config: BrokerConfig,
        metrics: &Metrics,
    ) -> Result<Broker, Error> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let d = dir.clone();
        let cfg = config.clone();
        let (lock_file, opened) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&d).map_err(|e| bad_dir("creating", &d, e))?;
            let lock_path = d.join(LOCK_FILE);
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| bad_dir("opening", &lock_path, e))?;
            match f.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        Origin::Internal,
                        format!(
                            "broker directory {} is in use by another broker",
                            d.display()
                        ),
                    ))
                }
                Err(TryLockError::Error(e)) => return Err(bad_dir("locking", &lock_path, e)),
            }
            let specs = catalog::load(&d)?;
            let mut opened = Vec::with_capacity(specs.len());
            for spec in specs {
                let files = open_topic_files(&d, &cfg, &spec)?;
                opened.push((spec, files));
            }
            Ok::<_, Error>((f, opened))
        })
        .await
        .map_err(|e| Error::internal("opening the broker").with_source(e))??;

        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            dir,
            config,
            topics: RwLock::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
            members: Mutex::new(HashMap::new()),
            groups: AtomicUsize::new(0),
            metrics: BrokerMetrics::register(metrics),
            closed: AtomicBool::new(false),
            stop,
            tasks: Mutex::new(Vec::new()),
            lock: Mutex::new(Some(lock_file)),
        });
        let broker = Broker { inner };
        for (spec, (logs, offsets)) in opened {
            let topic = broker.start_topic(spec, logs, offsets);
            let mut topics = broker
                .inner
                .topics
                .write()
                .unwrap_or_else(|e| e.into_inner());
            topics.insert(topic.spec.name.clone(), topic);
        }
        let weak = Arc::downgrade(&broker.inner);
        let stop = broker.inner.stop.subscribe();
        let sweeper = tokio::spawn(sweeper(weak.clone(), stop.clone()));
        let retention = tokio::spawn(retention(
            weak,
            stop,
            Duration::from_millis(broker.inner.config.retention_interval_ms),
        ));
        lock(&broker.inner.tasks).extend([sweeper, retention]);
        info!(dir = %broker.inner.dir.display(), topics = broker.topics().len(), "broker opened");
        Ok(broker)
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// Stops the timers, lets queued publishes and offset commits finish, and
    /// closes every log. Calls after this answer `Unavailable`.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.inner.stop.send(true);
        let tasks: Vec<JoinHandle<()>> = lock(&self.inner.tasks).drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
        let topics = self.topics();
        for t in &topics {
            for p in &t.parts {
                // Lets queued appends finish (their publishers get answers).
                if let Err(e) = p.log.close().await {
                    warn!(topic = %t.spec.name, error = %e, "closing a partition log");
                }
            }
        }
        for t in &topics {
            t.offsets.flush().await;
            // Groups point back at their topic; let both go.
            lock(&t.groups).clear();
        }
        lock(&self.inner.members).clear();
        drop(lock(&self.inner.lock).take());
        info!(dir = %self.inner.dir.display(), "broker closed");
    }

    pub(crate) fn metrics_connections(&self, delta: i64) {
        self.inner.metrics.connections.inc_by(delta);
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(closing());
        }
        Ok(())
    }

    fn topics(&self) -> Vec<Arc<Topic>> {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.values().cloned().collect()
    }

    pub(crate) fn topic(&self, name: &str) -> Result<Arc<Topic>, Error> {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        topics
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(format!("topic {name} does not exist")))
    }

    fn start_topic(&self, spec: TopicSpec, logs: Vec<Log>, offsets: Committer) -> Arc<Topic> {
        let (published, _) = watch::channel(0u64);
        let parts = logs
            .into_iter()
            .map(|log| Partition { log: Arc::new(log) })
            .collect();
        let topic = Arc::new(Topic {
            metrics: self.inner.metrics.topic(&spec.name),
            spec,
            parts,
            groups: Mutex::new(HashMap::new()),
            group_create: tokio::sync::Mutex::new(()),
            offsets,
            published,
        });
        for p in &topic.parts {
            // The log's writer thread wakes the topic's waiting fetches itself after
            // each commit, and counts the fsyncs it made.
            let published = topic.published.clone();
            let fsyncs = self.inner.metrics.fsyncs.clone();
            let counted = AtomicU64::new(p.log.stats().fsyncs);
            p.log.on_durable(move |total| {
                published.send_modify(|v| *v = v.wrapping_add(1));
                let before = counted.swap(total, Ordering::Relaxed);
                fsyncs.inc_by(total.saturating_sub(before));
            });
        }
        topic
    }

    /// Makes a topic. Returns whether it was created (false: it existed with the
    /// same partition count). `Conflict` when it exists with another count.
    pub(crate) async fn create_topic(&self, spec: &TopicSpec) -> Result<bool, Error> {
        validate_name("topic", &spec.name)?;
        if spec.partitions == 0 || spec.partitions > limits::MAX_PARTITIONS {
            return Err(invalid(format!(
                "topic {}: partitions must be 1 to {}, not {}",
                spec.name,
                limits::MAX_PARTITIONS,
                spec.partitions
            )));
        }
        self.check_open()?;
        let _serial = self.inner.create.lock().await;
        if let Ok(t) = self.topic(&spec.name) {
            if t.spec.partitions == spec.partitions {
                return Ok(false);
            }
            return Err(Error::new(
                ErrorKind::Conflict,
                Origin::Downstream,
                format!(
                    "topic {} exists with {} partitions, not {}",
                    spec.name, t.spec.partitions, spec.partitions
                ),
            ));
        }
        let existing = self.topics();
        let cfg = &self.inner.config;
        if existing.len() >= cfg.max_topics {
            return Err(overloaded(
                format!(
                    "the broker has {} topics, its limit (max_topics)",
                    existing.len()
                ),
                false,
            ));
        }
        let used: u32 = existing.iter().map(|t| t.spec.partitions).sum();
        if used + spec.partitions > cfg.max_partitions {
            return Err(overloaded(
                format!(
                    "topic {} needs {} partitions; {used} of the broker's {} (max_partitions) are used",
                    spec.name, spec.partitions, cfg.max_partitions
                ),
                false,
            ));
        }
        let mut specs: Vec<TopicSpec> = existing.iter().map(|t| t.spec.clone()).collect();
        specs.push(spec.clone());
        let dir = self.inner.dir.clone();
        let cfg = cfg.clone();
        let new = spec.clone();
        let (logs, offsets) = tokio::task::spawn_blocking(move || {
            let files = open_topic_files(&dir, &cfg, &new)?;
            // The catalogue names the topic only once its files exist.
            catalog::store(&dir, &specs)?;
            Ok::<_, Error>(files)
        })
        .await
        .map_err(|e| Error::internal("creating a topic").with_source(e))??;
        let topic = self.start_topic(spec.clone(), logs, offsets);
        let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
        topics.insert(spec.name.clone(), topic);
        info!(topic = %spec.name, partitions = spec.partitions, "topic created");
        Ok(true)
    }

    /// Checks `batch` and queues it, partition by partition, in the order of the
    /// calls; the ticket waits for durability. Nothing is queued when a check fails.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        batch: Vec<OutgoingMessage>,
    ) -> Result<PublishTicket, Error> {
        shoal_bus::validate_batch(topic, &batch)?;
        if let Some(m) = batch.iter().find(|m| m.headers.len() > MAX_HEADERS) {
            return Err(invalid(format!(
                "message {} has {} headers; the limit is {MAX_HEADERS}",
                m.id,
                m.headers.len()
            )));
        }
        let t = self.topic(topic)?;
        self.check_open()?;
        let n = t.spec.partitions;
        let total = batch.len();
        let mut parts: BTreeMap<u32, (Vec<usize>, Vec<Record>)> = BTreeMap::new();
        for (i, m) in batch.into_iter().enumerate() {
            let p = partition_for(m.key.as_deref(), n);
            let e = parts.entry(p).or_default();
            e.0.push(i);
            e.1.push(message::to_record(m));
        }
        let mut waits = Vec::with_capacity(parts.len());
        for (p, (idx, records)) in parts {
            waits.push((p, idx, t.append(p, records).await?));
        }
        Ok(PublishTicket {
            total,
            waits,
            metrics: t.metrics.clone(),
        })
    }

    /// Joins `group` on `topic` as a new member.
    pub(crate) async fn join(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
        lease_ms: u64,
    ) -> Result<Joined, Error> {
        validate_name("group", group)?;
        options.validate()?;
        validate_name("dead-letter topic", &options.dead_letter_topic_for(topic))?;
        let t = self.topic(topic)?;
        self.check_open()?;
        let cfg = &self.inner.config;
        let lease_ms = lease_ms.clamp(cfg.min_lease_ms, cfg.max_lease_ms);
        let g = self.group(&t, group, Some(options.start)).await?;
        let id = {
            let mut members = lock(&self.inner.members);
            let mut id = fastrand::u64(1..);
            while members.contains_key(&id) {
                id = fastrand::u64(1..);
            }
            members.insert(id, g.clone());
            id
        };
        let mut fx = Effects::default();
        let joined = {
            let mut st = lock(&g.state);
            st.join(
                id,
                options,
                Duration::from_millis(lease_ms),
                Instant::now(),
                &mut fx,
            )
            .map(|()| st.assignment(id).map_or(0, |a| a.len() as u32))
        };
        match joined {
            Ok(partitions) => {
                self.apply(&g, fx);
                Ok(Joined {
                    member: id,
                    lease_ms,
                    partitions,
                })
            }
            Err(e) => {
                lock(&self.inner.members).remove(&id);
                Err(e)
            }
        }
    }

    fn member_group(&self, member: MemberId) -> Result<Arc<Group>, Error> {
        lock(&self.inner.members)
            .get(&member)
            .cloned()
            .ok_or_else(|| unknown_member(member))
    }

    /// Renews `member`'s lease.
    pub(crate) fn heartbeat(&self, member: MemberId) -> Result<(), Error> {
        let g = self.member_group(member)?;
        if lock(&g.state).renew(member, Instant::now()) {
            Ok(())
        } else {
            Err(unknown_member(member))
        }
    }

    /// Removes `member` from its group; its unacked deliveries go to others. A
    /// member already gone is not an error.
    pub(crate) fn leave(&self, member: MemberId) {
        let Ok(g) = self.member_group(member) else {
            return;
        };
        let mut fx = Effects::default();
        lock(&g.state).leave(member, Instant::now(), &mut fx);
        self.apply(&g, fx);
    }

    /// Acks deliveries. Answers once the group's state has them; the committed
    /// offsets they move reach disk in the next offsets write (batched with other
    /// acks, a few milliseconds). Waiting for that write made one consumer acking
    /// each message in turn as slow as one file write per message; not waiting
    /// costs only this: a broker crash in between delivers those messages again,
    /// which at-least-once delivery allows (and the inbox absorbs).
    pub(crate) async fn ack(&self, member: MemberId, items: &[AckItem]) -> Result<(), Error> {
        let g = self.member_group(member)?;
        let mut fx = Effects::default();
        {
            let mut st = lock(&g.state);
            st.renew(member, Instant::now());
            for i in items {
                st.ack(i.partition, i.offset, i.token, &mut fx);
            }
        }
        // Nobody waits for an ack's commit: it goes in the next offsets write.
        let commits = std::mem::take(&mut fx.commits);
        self.apply(&g, fx);
        if !commits.is_empty() {
            let wait = g.topic.offsets.submit_lazy(&g.name, &commits);
            let (topic, group) = (g.topic.spec.name.clone(), g.name.clone());
            tokio::spawn(async move {
                if let Err(e) = committed(wait).await {
                    warn!(%topic, %group, error = %e, "cannot persist committed offsets; acked messages may be delivered again");
                }
            });
        }
        Ok(())
    }

    /// Nacks a delivery: due again after `delay` (the backoff when `None`).
    pub(crate) async fn nack(
        &self,
        member: MemberId,
        item: AckItem,
        delay: Option<Duration>,
    ) -> Result<(), Error> {
        let g = self.member_group(member)?;
        let mut fx = Effects::default();
        {
            let mut st = lock(&g.state);
            let now = Instant::now();
            st.renew(member, now);
            st.nack(item.partition, item.offset, item.token, delay, now, &mut fx);
        }
        let applied = self.apply(&g, fx);
        // A nack of the last attempt answers once the dead letter is stored (or
        // still failing after a while: it keeps trying in the background).
        for h in applied.dead {
            let _ = tokio::time::timeout(DEAD_LETTER_WAIT, h).await;
        }
        match applied.commit {
            Some(w) => committed(w).await,
            None => Ok(()),
        }
    }

    /// Up to `max` deliveries for `member`, waiting up to `wait` for the first.
    pub(crate) async fn fetch(
        &self,
        member: MemberId,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Fetched>, Error> {
        let g = self.member_group(member)?;
        let cfg = &self.inner.config;
        let max = max.clamp(1, cfg.max_fetch_messages) as usize;
        let wait = wait.min(Duration::from_millis(cfg.max_fetch_wait_ms));
        let deadline = Instant::now() + wait;
        let budget = (cfg.max_frame_bytes as usize).saturating_sub(FETCH_ANSWER_SLACK);
        let t = g.topic.clone();
        let mut changed = g.changed.subscribe();
        let mut published = t.published.subscribe();
        loop {
            self.check_open()?;
            changed.borrow_and_update();
            published.borrow_and_update();
            let bounds = t.bounds();
            let mut fx = Effects::default();
            let (reserved, wake) = {
                let mut st = lock(&g.state);
                let now = Instant::now();
                if !st.renew(member, now) {
                    return Err(unknown_member(member));
                }
                st.expire(now, &mut fx);
                let r = st.reserve(member, max, now, &bounds, &mut fx);
                // A member waiting in a fetch is alive: look again (and renew)
                // well before its lease would run out.
                let renew = st.lease(member).map(|l| now + l / 3);
                let wake = match (st.next_wakeup(Some(member)), renew) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                (r, wake)
            };
            self.apply(&g, fx);
            if !reserved.is_empty() {
                let got = self.read_reserved(&g, reserved, budget).await?;
                if !got.is_empty() {
                    let again = got.iter().filter(|f| f.reserved.attempt > 1).count() as u64;
                    g.metrics.delivered.inc_by(got.len() as u64);
                    g.metrics.redelivered.inc_by(again);
                    return Ok(got);
                }
                // Retention removed them meanwhile: look again at once.
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = wake.map_or(deadline, |w| w.min(deadline));
            tokio::select! {
                r = changed.changed() => if r.is_err() { return Ok(Vec::new()) },
                r = published.changed() => if r.is_err() { return Ok(Vec::new()) },
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Reads the reserved messages; gives back to the group what could not be
    /// read or did not fit `budget` bytes.
    async fn read_reserved(
        &self,
        g: &Arc<Group>,
        reserved: Vec<Reserved>,
        budget: usize,
    ) -> Result<Vec<Fetched>, Error> {
        let t = g.topic.clone();
        // A consumer keeping up reads what was appended a moment ago: those pages
        // are in the page cache (the writer just wrote them), so the read is a copy
        // that costs less than the hop to the blocking pool and back.
        let recent = reserved.len() <= INLINE_READ_MAX
            && reserved.iter().all(|r| {
                t.parts[r.partition as usize].log.next_offset() <= r.offset + INLINE_READ_WINDOW
            });
        let read = if recent {
            read_runs(&t, reserved, budget)
        } else {
            tokio::task::spawn_blocking(move || read_runs(&t, reserved, budget))
                .await
                .map_err(|e| Error::internal("reading messages").with_source(e))?
        };
        let mut fx = Effects::default();
        {
            let mut st = lock(&g.state);
            let now = Instant::now();
            for r in &read.unread {
                st.unreserve(r, now);
            }
            for &(p, first) in &read.skipped {
                st.skip_below(p, first, &mut fx);
            }
        }
        self.apply(&g.clone(), fx);
        match (read.got.is_empty(), read.error) {
            (true, Some(e)) => Err(from_log(e)),
            (_, e) => {
                if let Some(e) = e {
                    warn!(topic = %g.topic.spec.name, error = %e, "reading messages for a fetch");
                }
                Ok(read.got)
            }
        }
    }

    /// Moves `group`'s position on `topic`.
    pub(crate) async fn seek(&self, topic: &str, group: &str, to: StartAt) -> Result<(), Error> {
        validate_name("group", group)?;
        let t = self.topic(topic)?;
        self.check_open()?;
        let g = self.group(&t, group, Some(to)).await?;
        let positions = resolve(&t, to).await?;
        let mut fx = Effects::default();
        lock(&g.state).seek(&positions, &mut fx);
        self.apply(&g, fx).durable().await
    }

    /// Messages on `topic` not yet acked by `group`.
    pub(crate) async fn lag(&self, topic: &str, group: &str) -> Result<u64, Error> {
        validate_name("group", group)?;
        let t = self.topic(topic)?;
        let bounds = t.bounds();
        let existing = lock(&t.groups).get(group).cloned();
        if let Some(g) = existing {
            return Ok(lock(&g.state).lag(&bounds));
        }
        let stored = t.offsets.group(group);
        if stored.is_empty() {
            return Err(not_found(format!(
                "group {group} has no position on topic {topic}"
            )));
        }
        Ok(bounds
            .iter()
            .enumerate()
            .map(|(p, b)| {
                let c = stored.get(&(p as u32)).copied().unwrap_or(b.first);
                b.next.saturating_sub(c.clamp(b.first, b.next))
            })
            .sum())
    }

    /// The group, made (and its position persisted) if it does not exist: from
    /// the stored offsets, else at `start`.
    async fn group(
        &self,
        t: &Arc<Topic>,
        name: &str,
        start: Option<StartAt>,
    ) -> Result<Arc<Group>, Error> {
        if let Some(g) = lock(&t.groups).get(name) {
            return Ok(g.clone());
        }
        let _serial = t.group_create.lock().await;
        if let Some(g) = lock(&t.groups).get(name) {
            return Ok(g.clone());
        }
        let cfg = &self.inner.config;
        if self.inner.groups.load(Ordering::SeqCst) >= cfg.max_groups {
            return Err(overloaded(
                format!(
                    "the broker has {} groups, its limit (max_groups)",
                    cfg.max_groups
                ),
                false,
            ));
        }
        let stored = t.offsets.group(name);
        let bounds = t.bounds();
        let (positions, fresh) = if stored.is_empty() {
            let Some(start) = start else {
                return Err(not_found(format!(
                    "group {name} has no position on topic {}",
                    t.spec.name
                )));
            };
            (resolve(t, start).await?, true)
        } else {
            // A log cut back by recovery can end below a stored position: continue
            // at its end, or new messages there would be skipped.
            let positions = bounds
                .iter()
                .enumerate()
                .map(|(p, b)| {
                    stored
                        .get(&(p as u32))
                        .copied()
                        .unwrap_or(b.first)
                        .clamp(b.first, b.next)
                })
                .collect();
            (positions, false)
        };
        if fresh {
            let commits: Vec<(u32, u64)> = positions
                .iter()
                .enumerate()
                .map(|(p, o)| (p as u32, *o))
                .collect();
            committed(t.offsets.submit(name, &commits)).await?;
        }
        let limits = GroupLimits {
            max_members: cfg.max_members_per_group,
            max_in_flight_per_member: cfg.max_in_flight_per_member,
            max_unacked_span: cfg.max_unacked_span,
        };
        let (changed, _) = watch::channel(0);
        let g = Arc::new(Group {
            name: name.to_owned(),
            topic: t.clone(),
            state: Mutex::new(GroupState::new(&positions, limits)),
            changed,
            metrics: self.inner.metrics.group(&t.spec.name, name),
        });
        lock(&t.groups).insert(name.to_owned(), g.clone());
        self.inner.groups.fetch_add(1, Ordering::SeqCst);
        Ok(g)
    }

    /// Carries out what a state change asks for. Returns the wait for offsets it
    /// submitted, for answers that must be durable, and the dead-letter tasks it
    /// started.
    fn apply(&self, g: &Arc<Group>, fx: Effects) -> Applied {
        if fx.changed {
            g.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        if fx.acked > 0 {
            self.inner.metrics.acked.inc_by(fx.acked);
        }
        if !fx.gone.is_empty() {
            let mut members = lock(&self.inner.members);
            for id in &fx.gone {
                members.remove(id);
            }
        }
        let dead = fx
            .dead
            .into_iter()
            .map(|d| tokio::spawn(dead_letter(self.clone(), g.clone(), d)))
            .collect();
        Applied {
            commit: (!fx.commits.is_empty()).then(|| g.topic.offsets.submit(&g.name, &fx.commits)),
            dead,
        }
    }

    /// One attempt to store a dead letter. `Ok` also when retention already
    /// deleted the message.
    async fn try_dead_letter(&self, g: &Group, d: &DeadLetter) -> Result<(), Error> {
        let source = &g.topic;
        let log = source.parts[d.partition as usize].log.clone();
        let offset = d.offset;
        let read = tokio::task::spawn_blocking(move || log.read_blocking(offset, 1, 1))
            .await
            .map_err(|e| Error::internal("reading a dead letter").with_source(e))?;
        let record = match read {
            Ok(mut r) if !r.is_empty() => r.remove(0),
            Ok(_) => {
                return Err(Error::internal(
                    "a dead letter's message is not readable yet",
                ))
            }
            Err(shoal_log::Error::OffsetOutOfRange { first, .. }) if offset < first => {
                warn!(topic = %source.spec.name, offset, "message expired before it could be dead-lettered");
                return Ok(());
            }
            Err(e) => return Err(from_log(e)),
        };
        let name = SubscribeOptions {
            dead_letter_topic: d.topic.clone(),
            ..SubscribeOptions::default()
        }
        .dead_letter_topic_for(&source.spec.name);
        let dl = match self.topic(&name) {
            Ok(t) => t,
            Err(_) => {
                self.create_topic(&TopicSpec::new(name.clone(), 1)).await?;
                self.topic(&name)?
            }
        };
        let mut record = record.into_record();
        let key = record.key.as_deref().map(String::from_utf8_lossy);
        let p = partition_for(key.as_deref(), dl.spec.partitions);
        for (k, v) in [
            (headers::DEAD_TOPIC, source.spec.name.clone()),
            (
                headers::DEAD_POSITION,
                format!("{}/{}", d.partition, d.offset),
            ),
            (headers::DEAD_ATTEMPTS, d.attempts.to_string()),
            (headers::DEAD_GROUP, g.name.clone()),
        ] {
            record.headers.push((k.to_owned(), v.into_bytes()));
        }
        dl.append(p, vec![record])
            .await?
            .wait()
            .await
            .map_err(from_log)?;
        dl.metrics.published.inc();
        Ok(())
    }
}

/// What [`Broker::apply`] started.
struct Applied {
    commit: Option<CommitWait>,
    dead: Vec<JoinHandle<()>>,
}

impl Applied {
    /// Waits for the offsets to be on disk.
    async fn durable(self) -> Result<(), Error> {
        match self.commit {
            Some(w) => committed(w).await,
            None => Ok(()),
        }
    }
}

async fn committed(wait: CommitWait) -> Result<(), Error> {
    wait.await.unwrap_or_else(|_| Err(closing()))
}

/// Appends a dead letter, retrying with backoff (the message stays unacked
/// meanwhile), then marks it acked.
async fn dead_letter(broker: Broker, g: Arc<Group>, d: DeadLetter) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if broker.check_open().is_err() {
            return;
        }
        match broker.try_dead_letter(&g, &d).await {
            Ok(()) => break,
            Err(e) => {
                warn!(topic = %g.topic.spec.name, group = %g.name, offset = d.offset, error = %e, "cannot store a dead letter; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    g.metrics.dead_letters.inc();
    let mut fx = Effects::default();
    lock(&g.state).dead_lettered(d.partition, d.offset, &mut fx);
    broker.apply(&g, fx);
}

impl Topic {
    fn bounds(&self) -> Vec<Bounds> {
        self.parts
            .iter()
            .map(|p| {
                // The high-water mark first: retention can only raise `first`.
                let next = p.log.next_offset();
                Bounds {
                    first: p.log.first_offset().min(next),
                    next,
                }
            })
            .collect()
    }

    /// Queues records for partition `p` in its log's writer queue.
    async fn append(&self, p: u32, records: Vec<Record>) -> Result<shoal_log::AppendWait, Error> {
        match self.parts[p as usize].log.submit(records).await {
            Ok(wait) => Ok(wait),
            Err(shoal_log::Error::Closed) => Err(closing()),
            Err(e) => Err(from_log(e)),
        }
    }
}

/// What [`read_runs`] read and what it gave back.
struct Read {
    got: Vec<Fetched>,
    unread: Vec<Reserved>,
    /// `(partition, first offset)` where retention got there first.
    skipped: Vec<(u32, u64)>,
    error: Option<shoal_log::Error>,
}

/// Reads reserved offsets in runs of consecutive offsets, stopping at `budget`
/// bytes (always at least one message). Blocking.
fn read_runs(t: &Topic, reserved: Vec<Reserved>, budget: usize) -> Read {
    let mut out = Read {
        got: Vec::with_capacity(reserved.len()),
        unread: Vec::new(),
        skipped: Vec::new(),
        error: None,
    };
    let mut used = 0usize;
    let mut i = 0;
    while i < reserved.len() {
        let start = reserved[i];
        let mut j = i + 1;
        while j < reserved.len()
            && reserved[j].partition == start.partition
            && reserved[j].offset == reserved[j - 1].offset + 1
        {
            j += 1;
        }
        let run = &reserved[i..j];
        i = j;
        if (used >= budget && !out.got.is_empty()) || out.error.is_some() {
            out.unread.extend_from_slice(run);
            continue;
        }
        let log = &t.parts[start.partition as usize].log;
        let room = budget.saturating_sub(used).max(1);
        match log.read_blocking(start.offset, run.len(), room) {
            Ok(records) => {
                let mut records = records.into_iter();
                for r in run {
                    let Some(rec) = records.next() else {
                        out.unread.push(*r);
                        continue;
                    };
                    let size = rec.encoded_len() + DELIVERY_OVERHEAD;
                    if rec.offset != r.offset || (!out.got.is_empty() && used + size > budget) {
                        out.unread.push(*r);
                        continue;
                    }
                    used += size;
                    out.got.push(Fetched {
                        reserved: *r,
                        record: rec,
                    });
                }
            }
            Err(shoal_log::Error::OffsetOutOfRange { first, .. }) if start.offset < first => {
                out.skipped.push((start.partition, first));
                out.unread.extend_from_slice(run);
            }
            Err(e) => {
                out.error = Some(e);
                out.unread.extend_from_slice(run);
            }
        }
    }
    out
}

/// Offsets `to` means in each partition.
async fn resolve(t: &Arc<Topic>, to: StartAt) -> Result<Vec<u64>, Error> {
    let bounds = t.bounds();
    match to {
        StartAt::Earliest => Ok(bounds.iter().map(|b| b.first).collect()),
        StartAt::Latest => Ok(bounds.iter().map(|b| b.next).collect()),
        StartAt::Offset(o) => Ok(bounds.iter().map(|b| o.clamp(b.first, b.next)).collect()),
        StartAt::TimeMs(ms) => {
            let t = t.clone();
            tokio::task::spawn_blocking(move || {
                t.parts
                    .iter()
                    .map(|p| p.log.offset_for_time(ms).map_err(from_log))
                    .collect::<Result<Vec<u64>, Error>>()
            })
            .await
            .map_err(|e| Error::internal("finding offsets by time").with_source(e))?
        }
    }
}

/// Expires leases and ack timeouts nobody is waiting on; refreshes lag gauges.
async fn sweeper(broker: Weak<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(inner) = broker.upgrade() else {
            return;
        };
        let b = Broker { inner };
        n += 1;
        let now = Instant::now();
        for t in b.topics() {
            let groups: Vec<Arc<Group>> = lock(&t.groups).values().cloned().collect();
            let bounds = n.is_multiple_of(LAG_EVERY_SWEEPS).then(|| t.bounds());
            for g in groups {
                let mut fx = Effects::default();
                let lag = {
                    let mut st = lock(&g.state);
                    if st.next_wakeup(None).is_some_and(|w| w <= now) {
                        st.expire(now, &mut fx);
                    }
                    bounds.as_ref().map(|b| st.lag(b))
                };
                if let Some(lag) = lag {
                    g.metrics.lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
                }
                b.apply(&g, fx);
            }
        }
    }
}

/// Deletes expired segments every `every`.
async fn retention(broker: Weak<Inner>, mut stop: watch::Receiver<bool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let Some(inner) = broker.upgrade() else {
            return;
        };
        let logs: Vec<(String, Arc<Log>)> = Broker { inner }
            .topics()
            .iter()
            .flat_map(|t| t.parts.iter().map(|p| (t.spec.name.clone(), p.log.clone())))
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            let now = now_ms();
            for (topic, log) in logs {
                if let Err(e) = log.enforce_retention(now) {
                    warn!(%topic, error = %e, "retention failed");
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
impl Topic {
    pub(crate) fn next_offsets(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.log.next_offset()).collect()
    }

    pub(crate) fn first_offsets(&self) -> Vec<u64> {
        self.parts.iter().map(|p| p.log.first_offset()).collect()
    }
}

#[cfg(test)]
impl Broker {
    /// The group's committed offsets in memory.
    pub(crate) fn committed(&self, topic: &str, group: &str) -> Option<Vec<u64>> {
        let t = self.topic(topic).ok()?;
        let g = lock(&t.groups).get(group).cloned()?;
        let c = lock(&g.state).committed();
        Some(c)
    }

    /// Runs retention on every partition now.
    pub(crate) fn enforce_retention_now(&self, now: u64) {
        for t in self.topics() {
            for p in &t.parts {
                let _ = p.log.enforce_retention(now);
            }
        }
    }
}

//! `EmbeddedBus`: the `shoal_bus::Bus` client of the embedded broker.
//!
//! One multiplexed TCP connection carries every call: each request gets an id, a
//! reader task hands each answer to the call waiting for its id, a writer task
//! sends queued requests in batches. Calls never wait for each other, so many
//! publishes from many tasks are in flight at once and share the broker's fsyncs.
//! When the connection drops, every call in flight fails with a retryable
//! `Unavailable` (its outcome is unknown) and the next call connects again.

use crate::message::decode_delivery;
use crate::protocol::{
    encode_publish, encode_request, is_unknown_member, kind, read_frame, AckItem, Code, Dec,
    DecodeError, Frame, FrameError, Request, VERSION,
};
use crate::util::lock;
use shoal_bus::{
    validate_batch, BoxFuture, Bus, Consumer, Delivery, OutgoingMessage, Published, StartAt,
    SubscribeOptions, TopicSpec,
};
use shoal_core::{Error, ErrorKind, Origin};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::BufReader;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tracing::debug;

/// Largest answer accepted: the most a broker may be configured to send.
const MAX_ANSWER_BYTES: u32 = 256 << 20;
/// Requests queued for the writer task.
const WRITE_QUEUE: usize = 1024;

/// Client settings; the defaults suit services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Longest a connection attempt may take.
    pub connect_timeout_ms: u64,
    /// Longest a call may wait for its answer (a fetch waits this on top of its
    /// own long poll).
    pub request_timeout_ms: u64,
    /// A consumer's lease: the broker gives its partitions to others when it has
    /// heard nothing from it for this long. Heartbeats go every third of it.
    pub lease_ms: u64,
    /// How long one fetch waits for messages before asking again.
    pub fetch_wait_ms: u32,
    /// Most deliveries a consumer fetches at once (also capped by its
    /// `max_in_flight`).
    pub fetch_max_messages: u32,
    /// Calls waiting for an answer at most; more wait for a slot.
    pub max_pending_requests: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 5_000,
            request_timeout_ms: 30_000,
            lease_ms: 10_000,
            fetch_wait_ms: 5_000,
            fetch_max_messages: 256,
            max_pending_requests: 4096,
        }
    }
}

/// The embedded broker's client, a [`Bus`]. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct EmbeddedBus {
    client: Arc<Client>,
}

struct Client {
    addr: SocketAddr,
    options: ClientOptions,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
}

type Waiter = oneshot::Sender<Result<Frame, Error>>;

struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u64, Waiter>>,
    alive: AtomicBool,
    slots: Arc<Semaphore>,
    max_frame: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    addr: SocketAddr,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

fn lost(addr: SocketAddr) -> Error {
    Error::unavailable(format!(
        "the connection to the broker at {addr} was lost; the request may or may not have been carried out"
    ))
}

impl Conn {
    fn fail_all(&self, err: impl Fn() -> Error) {
        self.alive.store(false, Ordering::SeqCst);
        let waiters: Vec<Waiter> = lock(&self.pending).drain().map(|(_, w)| w).collect();
        for w in waiters {
            let _ = w.send(Err(err()));
        }
    }
}

async fn read_loop(conn: Weak<Conn>, rd: tokio::net::tcp::OwnedReadHalf) {
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    loop {
        let frame = read_frame(&mut rd, MAX_ANSWER_BYTES).await;
        let Some(conn) = conn.upgrade() else {
            return;
        };
        match frame {
            Ok(f) if f.id == 0 && f.kind == kind::ERROR => {
                // An error about the connection itself (refused, or a frame whose
                // id the broker could not read): it closes next.
                let e = answer_error(f.body);
                debug!(error = %e, "broker closed the connection");
                let msg = e.to_string();
                let retry = e.is_retryable();
                let kind = e.kind();
                conn.fail_all(|| {
                    Error::new(kind, Origin::Upstream, msg.clone()).with_retryable(retry)
                });
                return;
            }
            Ok(f) => {
                let w = lock(&conn.pending).remove(&f.id);
                if let Some(w) = w {
                    let _ = w.send(Ok(f));
                }
            }
            Err(e) => {
                if !matches!(e, FrameError::Closed) {
                    debug!(error = ?e, "broker connection read failed");
                }
                let addr = conn.addr;
                conn.fail_all(|| lost(addr));
                return;
            }
        }
    }
}

async fn write_loop(conn: Weak<Conn>, mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) {
    if let Err(e) = crate::protocol::write_frames(&mut wr, &mut rx).await {
        debug!(error = %e, "broker connection write failed");
        if let Some(conn) = conn.upgrade() {
            let addr = conn.addr;
            conn.fail_all(|| lost(addr));
        }
    }
}

/// The error an error answer carries.
fn answer_error(body: bytes::Bytes) -> Error {
    let mut d = Dec::new(body);
    let parsed = (|| {
        let code = d.u16("code")?;
        let retryable = d.u8("retryable")? != 0;
        let message = d.str("message")?;
        Ok::<_, DecodeError>((code, retryable, message))
    })();
    match parsed {
        Ok((code, retryable, message)) => Code::from_u16(code).into_error(retryable, message),
        Err(e) => bad_answer(e),
    }
}

fn bad_answer(e: DecodeError) -> Error {
    Error::new(
        ErrorKind::Protocol,
        Origin::Upstream,
        format!("the broker sent an answer this client cannot read: {e}"),
    )
}

/// Removes a waiter when its call gives up (timeout or a dropped future).
struct PendingGuard<'a> {
    conn: &'a Conn,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.conn.pending).remove(&self.id);
    }
}

impl Client {
    async fn conn(&self) -> Result<Arc<Conn>, Error> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.alive.load(Ordering::SeqCst) {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let c = self.connect().await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn connect(&self) -> Result<Arc<Conn>, Error> {
        let addr = self.addr;
        let timeout = Duration::from_millis(self.options.connect_timeout_ms);
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(
                    Error::unavailable(format!("cannot connect to the broker at {addr}"))
                        .with_source(e),
                )
            }
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "connecting to the broker at {addr} took over {} ms",
                    timeout.as_millis()
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let conn = Arc::new(Conn {
            tx,
            pending: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            slots: Arc::new(Semaphore::new(self.options.max_pending_requests.max(1))),
            max_frame: AtomicU64::new(u64::from(crate::config::MIN_FRAME_BYTES)),
            tasks: Mutex::new(Vec::new()),
            addr,
        });
        // The tasks hold the connection weakly: when the client lets go of it,
        // its Drop aborts them and the socket closes.
        let reader = tokio::spawn(read_loop(Arc::downgrade(&conn), rd));
        let writer = tokio::spawn(write_loop(Arc::downgrade(&conn), wr, rx));
        lock(&conn.tasks).extend([reader, writer]);
        let hello = Request::Hello {
            version: VERSION,
            client: format!("shoal-broker/{}", env!("CARGO_PKG_VERSION")),
        };
        let mut d = self
            .call_on(
                &conn,
                kind::HELLO,
                |id| encode_request(id, &hello),
                Duration::ZERO,
            )
            .await?;
        let read = (|| {
            let version = d.u16("version")?;
            let max_frame = d.u32("max_frame_bytes")?;
            Ok::<_, DecodeError>((version, max_frame))
        })();
        let (version, max_frame) = read.map_err(bad_answer)?;
        if version != VERSION {
            return Err(Error::new(
                ErrorKind::Protocol,
                Origin::Upstream,
                format!(
                    "the broker at {addr} speaks protocol version {version}, this client {VERSION}"
                ),
            ));
        }
        conn.max_frame.store(u64::from(max_frame), Ordering::SeqCst);
        Ok(conn)
    }

    /// Sends a request and waits for its answer's body. `extra` is how long the
    /// broker itself may hold the request (a fetch's long poll).
    async fn call(
        &self,
        request_kind: u8,
        encode: impl FnOnce(u64) -> Vec<u8>,
        extra: Duration,
    ) -> Result<Dec, Error> {
        let conn = self.conn().await?;
        self.call_on(&conn, request_kind, encode, extra).await
    }

    async fn call_on(
        &self,
        conn: &Conn,
        request_kind: u8,
        encode: impl FnOnce(u64) -> Vec<u8>,
        extra: Duration,
    ) -> Result<Dec, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(id);
        let max = conn.max_frame.load(Ordering::SeqCst);
        if (frame.len() - 4) as u64 > max {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                Origin::Downstream,
                format!(
                    "the request is {} bytes encoded, over the broker's frame limit of {max}",
                    frame.len() - 4
                ),
            ));
        }
        let _slot = conn
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| lost(conn.addr))?;
        let (tx, rx) = oneshot::channel();
        lock(&conn.pending).insert(id, tx);
        let _guard = PendingGuard { conn, id };
        if !conn.alive.load(Ordering::SeqCst) || conn.tx.send(frame).await.is_err() {
            return Err(lost(conn.addr));
        }
        let limit = Duration::from_millis(self.options.request_timeout_ms) + extra;
        let frame = match tokio::time::timeout(limit, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(lost(conn.addr)),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    Origin::Upstream,
                    format!(
                        "the broker at {} did not answer within {} ms",
                        conn.addr,
                        limit.as_millis()
                    ),
                ))
            }
        };
        if frame.kind == kind::ERROR {
            return Err(answer_error(frame.body));
        }
        if frame.kind != request_kind | kind::ANSWER {
            return Err(bad_answer(DecodeError::Malformed(format!(
                "answer kind 0x{:02x} to a request of kind 0x{request_kind:02x}",
                frame.kind
            ))));
        }
        Ok(Dec::new(frame.body))
    }

    /// Sends a request without waiting for its answer, which the reader then
    /// drops: returns once the request is queued on the connection.
    async fn send_only(&self, request: &Request) -> Result<(), Error> {
        let conn = self.conn().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_request(id, request);
        if !conn.alive.load(Ordering::SeqCst) || conn.tx.send(frame).await.is_err() {
            return Err(lost(conn.addr));
        }
        Ok(())
    }

    async fn empty_call(&self, request: Request, request_kind: u8) -> Result<(), Error> {
        let d = self
            .call(
                request_kind,
                |id| encode_request(id, &request),
                Duration::ZERO,
            )
            .await?;
        d.end().map_err(bad_answer)
    }

    async fn fetch(
        &self,
        topic: &str,
        member: u64,
        max_messages: u32,
    ) -> Result<Vec<Delivery>, Error> {
        let wait_ms = self.options.fetch_wait_ms;
        let req = Request::Fetch {
            member,
            max_messages,
            max_wait_ms: wait_ms,
        };
        let mut d = self
            .call(
                kind::FETCH,
                |id| encode_request(id, &req),
                Duration::from_millis(u64::from(wait_ms)),
            )
            .await?;
        let read = (|| {
            let n = d.count("delivery count", 48)?;
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(decode_delivery(&mut d, topic)?);
            }
            d.end()?;
            Ok::<_, DecodeError>(out)
        })();
        read.map_err(bad_answer)
    }

    async fn join(
        &self,
        topic: &str,
        group: &str,
        options: &SubscribeOptions,
    ) -> Result<u64, Error> {
        let req = Request::Join {
            topic: topic.to_owned(),
            group: group.to_owned(),
            lease_ms: self.options.lease_ms,
            options: options.clone(),
        };
        let mut d = self
            .call(kind::JOIN, |id| encode_request(id, &req), Duration::ZERO)
            .await?;
        d.u64("member").map_err(bad_answer)
    }
}

impl EmbeddedBus {
    /// Connects to the broker at `addr` with default [`ClientOptions`].
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> Result<Self, Error> {
        Self::connect_with(addr, ClientOptions::default()).await
    }

    /// Connects to the broker at `addr`. Fails with `Unavailable` when it does not
    /// answer.
    pub async fn connect_with(
        addr: impl tokio::net::ToSocketAddrs,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        let addr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| Error::config("cannot resolve the broker's address").with_source(e))?
            .next()
            .ok_or_else(|| Error::config("the broker's address resolves to nothing"))?;
        let client = Arc::new(Client {
            addr,
            options,
            conn: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
        });
        client.conn().await?;
        Ok(Self { client })
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        self.client.addr
    }
}

impl Bus for EmbeddedBus {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn create_topic<'a>(&'a self, spec: &'a TopicSpec) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let req = Request::CreateTopic(spec.clone());
            let mut d = self
                .client
                .call(
                    kind::CREATE_TOPIC,
                    |id| encode_request(id, &req),
                    Duration::ZERO,
                )
                .await?;
            d.u8("created").map_err(bad_answer)?;
            Ok(())
        })
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        batch: Vec<OutgoingMessage>,
    ) -> BoxFuture<'a, Result<Vec<Published>, Error>> {
        Box::pin(async move {
            // Refused here already, so a bad batch costs no round trip.
            validate_batch(topic, &batch)?;
            let mut d = self
                .client
                .call(
                    kind::PUBLISH,
                    |id| encode_publish(id, topic, &batch),
                    Duration::ZERO,
                )
                .await?;
            let read = (|| {
                let n = d.count("position count", 12)?;
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(Published {
                        partition: d.u32("partition")?,
                        offset: d.u64("offset")?,
                    });
                }
                d.end()?;
                Ok::<_, DecodeError>(out)
            })();
            let out = read.map_err(bad_answer)?;
            if out.len() != batch.len() {
                return Err(bad_answer(DecodeError::Malformed(format!(
                    "{} positions for {} messages",
                    out.len(),
                    batch.len()
                ))));
            }
            Ok(out)
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: SubscribeOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Consumer>, Error>> {
        Box::pin(async move {
            options.validate()?;
            let member = self.client.join(topic, group, &options).await?;
            let member = Arc::new(AtomicU64::new(member));
            let heartbeat = tokio::spawn(heartbeats(
                Arc::downgrade(&self.client),
                member.clone(),
                Duration::from_millis((self.client.options.lease_ms / 3).max(1)),
            ));
            let fetch_max = self
                .client
                .options
                .fetch_max_messages
                .min(options.max_in_flight.saturating_mul(4))
                .max(1);
            Ok(Box::new(EmbeddedConsumer {
                client: self.client.clone(),
                topic: topic.to_owned(),
                group: group.to_owned(),
                options,
                member,
                buffer: VecDeque::new(),
                fetch_max,
                heartbeat: Some(heartbeat),
                fetching: None,
            }) as Box<dyn Consumer>)
        })
    }

    fn seek<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        to: StartAt,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let req = Request::Seek {
                topic: topic.to_owned(),
                group: group.to_owned(),
                to,
            };
            self.client.empty_call(req, kind::SEEK).await
        })
    }

    fn lag<'a>(&'a self, topic: &'a str, group: &'a str) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(async move {
            let req = Request::Lag {
                topic: topic.to_owned(),
                group: group.to_owned(),
            };
            let mut d = self
                .client
                .call(kind::LAG, |id| encode_request(id, &req), Duration::ZERO)
                .await?;
            d.u64("lag").map_err(bad_answer)
        })
    }
}

/// Renews the member's lease until the consumer is gone. Failures are left to
/// the consumer's next fetch, which joins again if the broker forgot it.
async fn heartbeats(client: Weak<Client>, member: Arc<AtomicU64>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(client) = client.upgrade() else {
            return;
        };
        let req = Request::Heartbeat {
            member: member.load(Ordering::SeqCst),
        };
        if let Err(e) = client.empty_call(req, kind::HEARTBEAT).await {
            debug!(error = %e, "broker heartbeat failed");
        }
    }
}

/// A group member on the embedded broker.
struct EmbeddedConsumer {
    client: Arc<Client>,
    topic: String,
    group: String,
    options: SubscribeOptions,
    /// The current member id (0 once closed); a rejoin replaces it.
    member: Arc<AtomicU64>,
    buffer: VecDeque<Delivery>,
    fetch_max: u32,
    heartbeat: Option<JoinHandle<()>>,
    /// The fetch under way. It runs in a task of its own so a `next()` dropped
    /// half-way (a timeout around it) loses nothing: the next call picks it up.
    fetching: Option<JoinHandle<Result<Vec<Delivery>, Error>>>,
}

impl EmbeddedConsumer {
    fn item(d: &Delivery) -> AckItem {
        AckItem {
            partition: d.message.partition,
            offset: d.message.offset,
            token: d.token,
        }
    }

    fn stop_tasks(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if let Some(h) = self.fetching.take() {
            h.abort();
        }
    }

    fn start_fetch(&self) -> JoinHandle<Result<Vec<Delivery>, Error>> {
        let client = self.client.clone();
        let topic = self.topic.clone();
        let group = self.group.clone();
        let options = self.options.clone();
        let member = self.member.clone();
        let max = self.fetch_max;
        tokio::spawn(async move {
            loop {
                let id = member.load(Ordering::SeqCst);
                match client.fetch(&topic, id, max).await {
                    // The broker forgot us (restart, or a lease that ran out while
                    // it was unreachable): join again; what we held is redelivered.
                    Err(e) if is_unknown_member(&e) => {
                        let new = client.join(&topic, &group, &options).await?;
                        if member
                            .compare_exchange(id, new, Ordering::SeqCst, Ordering::SeqCst)
                            .is_err()
                        {
                            // Closed meanwhile.
                            let _ = client
                                .empty_call(Request::Leave { member: new }, kind::LEAVE)
                                .await;
                            return Ok(Vec::new());
                        }
                    }
                    other => return other,
                }
            }
        })
    }
}

impl Consumer for EmbeddedConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, Error>> {
        Box::pin(async move {
            loop {
                if let Some(d) = self.buffer.pop_front() {
                    // The next fetch goes out now, while this delivery is handled,
                    // so the broker already holds it when the next message arrives
                    // (it reserves nothing past the member's in-flight limit).
                    if self.buffer.is_empty() && self.fetching.is_none() {
                        self.fetching = Some(self.start_fetch());
                    }
                    return Ok(d);
                }
                if self.member.load(Ordering::SeqCst) == 0 {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        Origin::Downstream,
                        "the consumer has left its group",
                    ));
                }
                let fetch = match &mut self.fetching {
                    Some(f) => f,
                    None => self.fetching.insert(self.start_fetch()),
                };
                let result = fetch.await;
                self.fetching = None;
                match result {
                    Ok(Ok(got)) => self.buffer.extend(got),
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(Error::internal("the fetch task failed").with_source(e)),
                }
            }
        })
    }

    fn ack<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            // Not waited for, as JetStream's acks are not: an ack lost with the
            // connection, or refused because the broker forgot this member, only
            // means the delivery comes again (at least once). Waiting for each
            // answer bounded a consumer to one message per round trip. The broker
            // carries acks out in the order they are sent, before what follows.
            let req = Request::Ack {
                member: self.member.load(Ordering::SeqCst),
                items: vec![Self::item(delivery)],
            };
            self.client.send_only(&req).await
        })
    }

    fn nack<'a>(
        &'a self,
        delivery: &'a Delivery,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let req = Request::Nack {
                member: self.member.load(Ordering::SeqCst),
                item: Self::item(delivery),
                delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1)),
            };
            self.client.empty_call(req, kind::NACK).await
        })
    }

    fn close(mut self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        self.stop_tasks();
        let client = self.client.clone();
        let member = self.member.swap(0, Ordering::SeqCst);
        Box::pin(async move {
            if member == 0 {
                return Ok(());
            }
            client
                .empty_call(Request::Leave { member }, kind::LEAVE)
                .await
        })
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        self.stop_tasks();
        let member = self.member.swap(0, Ordering::SeqCst);
        if member == 0 {
            return;
        }
        // Best effort: without a runtime the lease runs out instead.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            rt.spawn(async move {
                let _ = client
                    .empty_call(Request::Leave { member }, kind::LEAVE)
                    .await;
            });
        }
    }
}

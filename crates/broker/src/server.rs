//! The TCP server: connections, frames, pipelining.
//!
//! Each connection has a reader (this task) and a writer task. The reader decodes
//! a frame, takes a slot of the connection's request and byte budgets (waiting
//! when they are used up, which stops reading: back-pressure), and hands the
//! request to a task of its own, so answers go out in whatever order they are
//! ready. A publish is queued by the reader itself before it reads the next frame,
//! so pipelined publishes are stored in the order they were sent and all of them
//! can share one fsync. The writer sends whatever answers are ready in one write.
//! An ack is carried out by the reader too, in order. A publish's answer is waited
//! for by the writer itself, not by a task of its own:
//! the log's writer thread then wakes the task that writes the answer, one thread
//! hop less between an fsync and the publisher hearing of it.

use crate::broker::Broker;
use crate::message::encode_delivery;
use crate::protocol::{
    decode_request, encode_empty, encode_error, encode_error_for, encode_published, kind,
    read_frame, Code, Enc, FrameError, Request, VERSION, WRITE_BATCH_BYTES,
};
use futures_util::stream::{FuturesUnordered, StreamExt};
use shoal_bus::limits;
use shoal_core::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// Answers waiting for the writer, per connection.
const WRITE_QUEUE: usize = 1024;
/// Read buffer per connection.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Granularity of the per-connection byte budget.
const BUDGET_UNIT: usize = 1024;
/// After shutdown, how long connections get to finish before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// An answer still being made.
type Answer = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// What the reader and request tasks hand the connection's writer.
enum Outgoing {
    /// An encoded answer, ready.
    Frame(Vec<u8>),
    /// An answer still being made (a publish waiting for its fsync).
    Later(Answer),
    /// The connection is closing on an error: answers not yet made are dropped.
    Cut,
}

/// Serves `broker` on `listener` until `shutdown` resolves, then closes every
/// connection (requests in flight are cut; publishes already queued still
/// complete in the broker). The caller closes the broker afterwards.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let cfg = broker.config().clone();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        debug!(%addr, "broker listening");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    match slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            debug!(%peer, "broker connection");
                            conns.spawn(connection(stream, broker.clone(), stop_rx.clone(), slot));
                        }
                        Err(_) => {
                            warn!(%peer, max = cfg.max_connections, "broker connection refused: too many connections");
                            conns.spawn(refuse(stream, cfg.max_connections));
                        }
                    }
                }
                // Out of file descriptors and the like: pause instead of spinning.
                Err(e) => {
                    warn!(error = %e, "broker accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    Ok(())
}

async fn refuse(mut stream: TcpStream, max: usize) {
    let frame = encode_error(
        0,
        Code::Overloaded,
        true,
        &format!("the broker has {max} connections, its limit; try again later"),
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&frame).await;
        let _ = stream.shutdown().await;
        drain(&mut stream).await;
    })
    .await;
}

/// Reads and drops what the peer still sends (at most 1 MiB) until it closes:
/// closing a socket with unread data would reset the connection and could
/// destroy the error answer before the peer reads it. The caller bounds the time.
async fn drain<R: tokio::io::AsyncRead + Unpin>(r: &mut R) {
    let mut buf = [0u8; 8192];
    let mut total = 0usize;
    while total < 1 << 20 {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// The budgets that bound what one connection has in flight.
struct Budget {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_units: u32,
}

/// Held by a request until its answer is queued.
struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

impl Budget {
    async fn take(&self, frame_len: usize) -> Option<Permits> {
        let units = ((frame_len / BUDGET_UNIT) as u32 + 1).min(self.max_units);
        let request = self.requests.clone().acquire_owned().await.ok()?;
        let bytes = self.bytes.clone().acquire_many_owned(units).await.ok()?;
        Some(Permits {
            _request: request,
            _bytes: bytes,
        })
    }
}

async fn connection(
    stream: TcpStream,
    broker: Broker,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let cfg = broker.config().clone();
    broker.metrics_connections(1);
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Outgoing>(WRITE_QUEUE);
    let writer = tokio::spawn(write_loop(wr, rx));
    let units = (cfg.max_connection_buffer_bytes / BUDGET_UNIT).max(1);
    let max_units = u32::try_from(units).unwrap_or(u32::MAX);
    let budget = Budget {
        requests: Arc::new(Semaphore::new(cfg.max_requests_per_connection)),
        bytes: Arc::new(Semaphore::new(max_units as usize)),
        max_units,
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let mut tasks = JoinSet::new();
    // Set when the connection must close: the last answer to send, if any.
    let mut fatal: Option<Vec<u8>> = None;
    let mut stopped = false;
    let mut closing_on_error = false;
    loop {
        // Reap finished requests; never race a join against a half-read frame.
        while tasks.try_join_next().is_some() {}
        let frame = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => { stopped = true; break }
            f = read_frame(&mut reader, cfg.max_frame_bytes) => f,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(FrameError::Closed) => break,
            Err(FrameError::Io(e)) => {
                debug!(error = %e, "broker connection read failed");
                stopped = true;
                break;
            }
            Err(FrameError::TooShort(len)) => {
                fatal = Some(encode_error(
                    0,
                    Code::Malformed,
                    false,
                    &format!("frame length {len} is below the 9-byte header"),
                ));
                break;
            }
            Err(FrameError::TooLarge { len, id }) => {
                fatal = Some(encode_error(
                    id.unwrap_or(0),
                    Code::FrameTooLarge,
                    false,
                    &format!(
                        "frame of {len} bytes is over the limit of {} (max_frame_bytes)",
                        cfg.max_frame_bytes
                    ),
                ));
                break;
            }
        };
        let id = frame.id;
        let frame_len = frame.body.len() + 13;
        let request = match decode_request(frame.kind, frame.body) {
            Ok(r) => r,
            Err(e) => {
                fatal = Some(encode_error(id, e.code(), false, &e.to_string()));
                break;
            }
        };
        let Some(permits) = budget.take(frame_len).await else {
            break;
        };
        dispatch(&broker, &tx, &mut tasks, id, request, permits).await;
    }
    if stopped {
        tasks.abort_all();
        // Publishes already queued are still stored; their answers are cut.
        let _ = tx.send(Outgoing::Cut).await;
    } else if let Some(last) = fatal.take() {
        closing_on_error = true;
        // A client that sends garbage gets no more answers: its other requests are
        // cut (a publish already queued is still stored).
        tasks.abort_all();
        let _ = tx.send(Outgoing::Cut).await;
        let _ = tx.send(Outgoing::Frame(last)).await;
    } else {
        // The client closed its side: finish what it asked for, unless told to stop.
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => { tasks.abort_all(); break }
                r = tasks.join_next() => if r.is_none() { break },
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
    if closing_on_error {
        let _ = tokio::time::timeout(Duration::from_secs(1), drain(&mut reader)).await;
    }
    broker.metrics_connections(-1);
}

async fn write_loop(mut wr: OwnedWriteHalf, rx: mpsc::Receiver<Outgoing>) {
    if let Err(e) = write_answers(&mut wr, rx).await {
        debug!(error = %e, "broker connection write failed");
        return;
    }
    let _ = wr.shutdown().await;
}

/// Writes answers as they become ready, gathering what is ready at once into one
/// write. Ends when every sender is gone and every pending answer is written.
async fn write_answers(
    wr: &mut OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut later: FuturesUnordered<Answer> = FuturesUnordered::new();
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES);
    let mut open = true;
    loop {
        if !open && later.is_empty() {
            return Ok(());
        }
        buf.clear();
        tokio::select! {
            Some(frame) = later.next(), if !later.is_empty() => buf.extend_from_slice(frame.as_slice()),
            out = rx.recv(), if open => match out {
                Some(Outgoing::Frame(f)) => buf.extend_from_slice(&f),
                Some(Outgoing::Later(f)) => later.push(f),
                Some(Outgoing::Cut) => later.clear(),
                None => open = false,
            },
        }
        // Whatever else is ready goes in the same write.
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(Outgoing::Frame(f)) => buf.extend_from_slice(&f),
                Ok(Outgoing::Later(f)) => later.push(f),
                Ok(Outgoing::Cut) => later.clear(),
                Err(_) => break,
            }
        }
        while buf.len() < WRITE_BATCH_BYTES && !later.is_empty() {
            let ready = std::future::poll_fn(|cx| {
                Poll::Ready(match later.poll_next_unpin(cx) {
                    Poll::Ready(Some(f)) => Some(f),
                    _ => None,
                })
            })
            .await;
            match ready {
                Some(f) => buf.extend_from_slice(&f),
                None => break,
            }
        }
        if !buf.is_empty() {
            wr.write_all(&buf).await?;
        }
    }
}

async fn dispatch(
    broker: &Broker,
    tx: &mpsc::Sender<Outgoing>,
    tasks: &mut JoinSet<()>,
    id: u64,
    request: Request,
    permits: Permits,
) {
    // Queued here, in read order; only the wait for the fsync runs apart.
    if let Request::Publish { topic, messages } = request {
        match broker.publish(&topic, messages).await {
            Ok(ticket) => {
                let answer = async move {
                    let answer = match ticket.wait().await {
                        Ok(published) => encode_published(id, &published),
                        Err(e) => encode_error_for(id, &e),
                    };
                    drop(permits);
                    answer
                };
                let _ = tx.send(Outgoing::Later(Box::pin(answer))).await;
            }
            Err(e) => {
                let _ = tx.send(Outgoing::Frame(encode_error_for(id, &e))).await;
            }
        }
        return;
    }
    // Acks too are carried out in read order, before the next frame: a client
    // sends them without waiting for their answers, and whatever it sends after
    // an ack (a lag query, a leave) must find it done. They never wait.
    if let Request::Ack { member, items } = request {
        let answer = match broker.ack(member, &items).await {
            Ok(()) => encode_empty(kind::ACK, id),
            Err(e) => encode_error_for(id, &e),
        };
        let _ = tx.send(Outgoing::Frame(answer)).await;
        drop(permits);
        return;
    }
    let broker = broker.clone();
    let tx = tx.clone();
    tasks.spawn(async move {
        let answer = match handle(&broker, id, request).await {
            Ok(a) => a,
            Err(e) => encode_error_for(id, &e),
        };
        let _ = tx.send(Outgoing::Frame(answer)).await;
        drop(permits);
    });
}

async fn handle(broker: &Broker, id: u64, request: Request) -> Result<Vec<u8>, Error> {
    let cfg = broker.config();
    match request {
        Request::Hello { version, .. } => {
            if version != VERSION {
                return Err(crate::util::invalid(format!(
                    "protocol version {version} is not spoken here; this broker speaks {VERSION}"
                )));
            }
            let mut e = Enc::new(kind::HELLO | kind::ANSWER, id);
            e.u16(VERSION)
                .u32(cfg.max_frame_bytes)
                .u32(limits::MAX_BATCH as u32)
                .u32(limits::MAX_MESSAGE_BYTES as u32)
                .u32(cfg.max_fetch_messages)
                .u32(u32::try_from(cfg.max_fetch_wait_ms).unwrap_or(u32::MAX));
            Ok(e.finish())
        }
        Request::CreateTopic(spec) => {
            let created = broker.create_topic(&spec).await?;
            let mut e = Enc::new(kind::CREATE_TOPIC | kind::ANSWER, id);
            e.u8(u8::from(created));
            Ok(e.finish())
        }
        Request::Publish { topic, messages } => {
            let published = broker.publish(&topic, messages).await?.wait().await?;
            Ok(encode_published(id, &published))
        }
        Request::Join {
            topic,
            group,
            lease_ms,
            options,
        } => {
            let j = broker.join(&topic, &group, options, lease_ms).await?;
            let mut e = Enc::new(kind::JOIN | kind::ANSWER, id);
            e.u64(j.member).u64(j.lease_ms).u32(j.partitions);
            Ok(e.finish())
        }
        Request::Fetch {
            member,
            max_messages,
            max_wait_ms,
        } => {
            let got = broker
                .fetch(
                    member,
                    max_messages,
                    Duration::from_millis(u64::from(max_wait_ms)),
                )
                .await?;
            let size: usize = got.iter().map(|f| f.record.encoded_len() + 48).sum();
            let mut e = Enc::with_capacity(kind::FETCH | kind::ANSWER, id, size + 4);
            e.u32(got.len() as u32);
            for f in &got {
                encode_delivery(
                    &mut e,
                    f.reserved.partition,
                    f.reserved.token,
                    f.reserved.attempt,
                    &f.record,
                );
            }
            Ok(e.finish())
        }
        Request::Ack { member, items } => {
            broker.ack(member, &items).await?;
            Ok(encode_empty(kind::ACK, id))
        }
        Request::Nack {
            member,
            item,
            delay_ms,
        } => {
            broker
                .nack(member, item, delay_ms.map(Duration::from_millis))
                .await?;
            Ok(encode_empty(kind::NACK, id))
        }
        Request::Heartbeat { member } => {
            broker.heartbeat(member)?;
            Ok(encode_empty(kind::HEARTBEAT, id))
        }
        Request::Leave { member } => {
            broker.leave(member);
            Ok(encode_empty(kind::LEAVE, id))
        }
        Request::Seek { topic, group, to } => {
            broker.seek(&topic, &group, to).await?;
            Ok(encode_empty(kind::SEEK, id))
        }
        Request::Lag { topic, group } => {
            let lag = broker.lag(&topic, &group).await?;
            let mut e = Enc::new(kind::LAG | kind::ANSWER, id);
            e.u64(lag);
            Ok(e.finish())
        }
    }
}

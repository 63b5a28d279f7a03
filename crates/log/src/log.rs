//! The `Log`: opening and recovery, appends, reads, time lookup, retention.

use std::collections::BTreeSet;
use std::fs::{self, File, TryLockError};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::config::LogConfig;
use crate::error::{io_err, Error, Limit, Result};
use crate::index::{self, IndexEntry};
use crate::record::{encode_unsealed, Frame, Record, StoredRecord, MAX_FRAME_BYTES};
use crate::segment::{
    find_frame_after, frame_at, index_path, parse_name, scan, segment_path, Cursor, ScanStop,
    Segment, Step, INDEX_SUFFIX, SEGMENT_SUFFIX,
};
use crate::util::{lock, read_lock, sync_dir, write_lock};
use crate::writer::{AppendRequest, Writer};

/// Name of the lock file that keeps two `Log`s off one directory.
const LOCK_FILE: &str = "LOCK";

/// See [`Log::on_durable`].
pub(crate) type DurableHook = Box<dyn Fn(u64) + Send + Sync>;

/// State shared by the `Log` handle, readers and the writer thread.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) config: LogConfig,
    /// Oldest first; the last one is active. Copy-on-write so a reader takes
    /// a snapshot with one `Arc` clone and never holds the lock during I/O.
    pub(crate) segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    /// Durable high-water mark: the offset after the last fsynced record.
    pub(crate) hwm: watch::Sender<u64>,
    pub(crate) stats: Counters,
    /// Called by the writer thread after each commit, see [`Log::on_durable`].
    pub(crate) on_durable: std::sync::OnceLock<DurableHook>,
    /// Lets a test hold the writer between receiving the first request of a
    /// group and gathering the rest, to make group commit deterministic.
    #[cfg(test)]
    pub(crate) test_gate: Mutex<()>,
    /// The active segment's zeros, for tests to wait on the zeroing thread.
    #[cfg(test)]
    pub(crate) ahead: Mutex<Option<Arc<crate::ahead::Ahead>>>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) fsyncs: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) rolls: AtomicU64,
    pub(crate) zeroed_inline: AtomicU64,
}

/// Counters since the log was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// `fdatasync` calls on segment files (one per group commit, plus one when sealing a segment).
    pub fsyncs: u64,
    /// Group commits: one write and one fsync answering every batch in the group.
    pub commits: u64,
    /// Append batches made durable.
    pub batches: u64,
    /// Records made durable.
    pub records: u64,
    /// New segments started.
    pub rolls: u64,
    /// Extensions of the active segment the writer wrote itself, holding up the
    /// appends behind it, because the zeroing thread had not got there (the first
    /// of each segment, a batch larger than what is left, a full queue).
    pub zeroed_inline: u64,
}

/// What [`Log::open`] found and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files in the log.
    pub segments: usize,
    /// The offset the next append will get.
    pub next_offset: u64,
    /// Set when a torn tail was cut off the last segment.
    pub truncation: Option<Truncation>,
    /// Index files that were missing or wrong and were rebuilt from their segment.
    pub rebuilt_indexes: Vec<PathBuf>,
}

impl Recovery {
    /// Bytes removed from the tail (0 when the log was closed cleanly).
    pub fn truncated_bytes(&self) -> u64 {
        self.truncation.as_ref().map_or(0, |t| t.bytes)
    }
}

/// A torn tail that recovery removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The segment file.
    pub segment: PathBuf,
    /// Its new length: the end of the last complete batch.
    pub position: u64,
    /// How many bytes were cut.
    pub bytes: u64,
    /// The offset appends resume at.
    pub resumed_at: u64,
    /// What was wrong with the first cut byte.
    pub reason: &'static str,
}

/// What one [`Log::enforce_retention`] call deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Segments deleted.
    pub deleted_segments: usize,
    /// Bytes they held.
    pub deleted_bytes: u64,
    /// The first offset still in the log afterwards.
    pub first_offset: u64,
}

/// A batch queued by [`Log::submit`], waiting to become durable.
#[derive(Debug)]
#[must_use = "the batch is queued either way; wait to learn its offsets"]
pub struct AppendWait(oneshot::Receiver<Result<Range<u64>>>);

impl AppendWait {
    /// The batch's offsets, once it is written and fsynced.
    pub async fn wait(self) -> Result<Range<u64>> {
        self.0.await.map_err(|_| Error::Closed)?
    }
}

/// One partition: an append-only log of records in segment files.
///
/// `Log` is `Send + Sync`; share it with `Arc`. Appends go through one writer
/// thread that commits queued batches together; reads run on the caller's
/// thread (or the blocking pool with [`Log::read`]) and see only durable records.
pub struct Log {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    done: Mutex<Option<oneshot::Receiver<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    recovery: Recovery,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.shared.dir)
            .field("first_offset", &self.first_offset())
            .field("next_offset", &self.next_offset())
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (creating if needed) the log in `dir`, recovers its tail and
    /// starts the writer thread. Blocking; needs no async runtime.
    ///
    /// Fails with [`Error::Corrupt`] if the last segment is damaged anywhere
    /// but its tail, and with [`Error::AlreadyOpen`] if another `Log` holds it.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(Error::AlreadyOpen { dir }),
            Err(TryLockError::Error(e)) => return Err(Error::io("lock", &lock_path, e)),
        }

        let (mut bases, index_bases) = list_dir(&dir)?;
        for orphan in index_bases.difference(&bases.iter().copied().collect()) {
            // Left behind when retention deleted a segment and stopped before its index.
            let p = index_path(&dir, *orphan);
            if let Err(e) = fs::remove_file(&p) {
                warn!(path = %p.display(), error = %e, "cannot remove orphan index file");
            }
        }
        if bases.is_empty() {
            let path = segment_path(&dir, 0);
            File::options()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err("create segment", &path))?;
            sync_dir(&dir)?;
            bases.push(0);
        }

        let interval = config.index_interval_bytes;
        let mut rebuilt = Vec::new();
        let mut segments = Vec::with_capacity(bases.len());
        for w in bases.windows(2) {
            segments.push(Arc::new(open_sealed(
                &dir,
                w[0],
                w[1],
                interval,
                &mut rebuilt,
            )?));
        }
        let last_base = bases[bases.len() - 1];
        let active = recover_active(&dir, last_base, interval, &mut rebuilt)?;
        let last_ts = match active.last_ts {
            Some(ts) => ts,
            None => segments
                .last()
                .and_then(|s| newest_timestamp(&s.file, &read_lock(&s.index), s.size()))
                .unwrap_or(0),
        };
        let segment = Arc::new(active.segment);
        segments.push(segment.clone());

        let recovery = Recovery {
            segments: segments.len(),
            next_offset: active.next_offset,
            truncation: active.truncation,
            rebuilt_indexes: rebuilt,
        };
        let (hwm, _) = watch::channel(active.next_offset);
        let shared = Arc::new(Shared {
            dir,
            config,
            segments: RwLock::new(Arc::new(segments)),
            hwm,
            stats: Counters::default(),
            on_durable: std::sync::OnceLock::new(),
            #[cfg(test)]
            test_gate: Mutex::new(()),
            #[cfg(test)]
            ahead: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel(shared.config.write_queue);
        let (done_tx, done_rx) = oneshot::channel();
        let ahead = crate::ahead::Ahead::new(
            segment.clone(),
            active.allocated,
            shared.config.preallocate_bytes,
            shared.config.segment_bytes,
        );
        #[cfg(test)]
        {
            *crate::util::lock(&shared.ahead) = Some(ahead.clone());
        }
        let writer = Writer {
            shared: shared.clone(),
            rx,
            active: segment.clone(),
            index_file: active.index_file,
            position: active.position,
            ahead,
            next_offset: active.next_offset,
            last_ts,
            last_indexed: active.last_indexed,
            _lock: lock_file,
            pending_index: Vec::new(),
            buf: Vec::new(),
            failed: None,
        };
        let thread = std::thread::Builder::new()
            .name("shoal-log-writer".into())
            .spawn(move || writer.run(done_tx))
            .map_err(|e| Error::io("spawn writer thread for", &shared.dir, e))?;
        info!(dir = %shared.dir.display(), first = shared.first_offset(), next = recovery.next_offset, "log opened");
        Ok(Log {
            shared,
            tx: Mutex::new(Some(tx)),
            done: Mutex::new(Some(done_rx)),
            thread: Mutex::new(Some(thread)),
            recovery,
        })
    }

    /// What recovery found when this log was opened.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The configuration in force.
    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// Appends a batch and returns its offsets once the batch is written and
    /// fsynced. The batch is atomic across crashes: after a reopen either all
    /// of it is there or none.
    ///
    /// Limits are checked before anything is queued; a refused batch leaves
    /// the log unchanged. Dropping the future after the batch was queued does
    /// not withdraw it. An `Io` error means the outcome is unknown and the log
    /// refuses further appends ([`Error::WriterFailed`]) until reopened.
    pub async fn append(&self, records: Vec<Record>) -> Result<Range<u64>> {
        self.submit(records).await?.wait().await
    }

    /// Queues a batch for the writer and returns as soon as it is queued (waiting
    /// only while the queue is full), so a caller can queue several batches in
    /// order and wait for them afterwards. Batches queued by one caller one after
    /// another get increasing offsets. The same checks and guarantees as
    /// [`Log::append`]; the batch is durable when [`AppendWait::wait`] answers.
    pub async fn submit(&self, records: Vec<Record>) -> Result<AppendWait> {
        let cfg = &self.shared.config;
        if records.is_empty() {
            return Err(Error::EmptyBatch);
        }
        if records.len() > cfg.max_batch_records {
            return Err(Error::TooLarge {
                what: Limit::BatchRecords,
                size: records.len() as u64,
                limit: cfg.max_batch_records as u64,
            });
        }
        let mut total = 0usize;
        for (index, r) in records.iter().enumerate() {
            let n = r.encoded_len();
            if n > cfg.max_record_bytes || n > MAX_FRAME_BYTES {
                return Err(Error::TooLarge {
                    what: Limit::RecordBytes { index },
                    size: n as u64,
                    limit: cfg.max_record_bytes as u64,
                });
            }
            total = total.saturating_add(n);
        }
        if total > cfg.max_batch_bytes {
            return Err(Error::TooLarge {
                what: Limit::BatchBytes,
                size: total as u64,
                limit: cfg.max_batch_bytes as u64,
            });
        }
        // Encoding here spreads the copying over the appending tasks; the
        // writer thread only stamps offsets and checksums.
        let mut frames = Vec::with_capacity(total);
        let last = records.len() - 1;
        for (i, r) in records.iter().enumerate() {
            encode_unsealed(&mut frames, r, i == last);
        }
        let tx = lock(&self.tx).clone().ok_or(Error::Closed)?;
        let (reply, answer) = oneshot::channel();
        tx.send(AppendRequest { frames, reply })
            .await
            .map_err(|_| Error::Closed)?;
        Ok(AppendWait(answer))
    }

    /// Reads up to `max_records` durable records starting at `from`, stopping
    /// before `max_bytes` of encoded frames (but always returning at least one
    /// record if any is available, so a consumer cannot stall on a big record).
    ///
    /// Returns an empty vector at the high-water mark; [`Log::subscribe`] tells
    /// when more arrives. Offsets below [`Log::first_offset`] or above
    /// [`Log::next_offset`] give [`Error::OffsetOutOfRange`]; damaged data gives
    /// [`Error::Corrupt`]. Runs on the blocking pool.
    pub async fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>> {
        let shared = self.shared.clone();
        match tokio::task::spawn_blocking(move || shared.read(from, max_records, max_bytes)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Error::Closed),
        }
    }

    /// [`Log::read`] on the calling thread (blocking file I/O).
    pub fn read_blocking(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>> {
        self.shared.read(from, max_records, max_bytes)
    }

    /// The first offset still retained.
    pub fn first_offset(&self) -> u64 {
        self.shared.first_offset()
    }

    /// The offset after the last durable record (the high-water mark).
    pub fn next_offset(&self) -> u64 {
        *self.shared.hwm.borrow()
    }

    /// A receiver of the high-water mark, for long-polling consumers:
    /// `rx.wait_for(|&next| next > my_offset).await`.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.hwm.subscribe()
    }

    /// Has the writer thread call `hook` right after each commit, with the number
    /// of fsyncs the log has made since it was opened (as in [`Log::stats`]), so a
    /// caller can wake its own waiters without a task of its own watching
    /// [`Log::subscribe`] (one thread hop less between an fsync and a consumer).
    /// The hook runs on the writer thread: it must be quick and must not block.
    /// Only the first hook set is kept; returns whether this one was.
    pub fn on_durable(&self, hook: impl Fn(u64) + Send + Sync + 'static) -> bool {
        self.shared.on_durable.set(Box::new(hook)).is_ok()
    }

    /// The first durable offset whose timestamp is `>= unix_ms`, or
    /// [`Log::next_offset`] if every record is older. Blocking file I/O, a
    /// few small reads.
    pub fn offset_for_time(&self, unix_ms: u64) -> Result<u64> {
        self.shared.offset_for_time(unix_ms)
    }

    /// Deletes whole sealed segments, oldest first, while the log is larger
    /// than `retention_bytes` or while every record of the oldest segment is
    /// older than `now_ms - retention_ms`. Never deletes the active segment.
    ///
    /// A segment's newest timestamp is taken to be the first timestamp of the
    /// segment after it (an upper bound, because timestamps never decrease),
    /// which costs no I/O and can only keep data longer, never shorter.
    pub fn enforce_retention(&self, now_ms: u64) -> Result<RetentionOutcome> {
        self.shared.enforce_retention(now_ms)
    }

    /// Counters since open.
    pub fn stats(&self) -> LogStats {
        let c = &self.shared.stats;
        LogStats {
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            rolls: c.rolls.load(Ordering::Relaxed),
            zeroed_inline: c.zeroed_inline.load(Ordering::Relaxed),
        }
    }

    /// Durable bytes in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.shared.snapshot().iter().map(|s| s.size()).sum()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.shared.snapshot().len()
    }

    /// Stops accepting appends, lets queued ones finish, and waits for the
    /// writer thread to release the directory. Reads keep working.
    pub async fn close(&self) -> Result<()> {
        drop(lock(&self.tx).take());
        let done = lock(&self.done).take();
        if let Some(done) = done {
            done.await.map_err(|_| Error::WriterFailed {
                cause: "writer thread panicked".into(),
            })?;
        }
        // The thread has already finished its work and is only unwinding.
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Appends waiting in the writer queue.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        lock(&self.tx)
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }
}

/// How a walk over frames ended.
enum Walk {
    /// The visitor asked to stop.
    Stopped,
    /// Reached the end offset.
    Reached,
    /// The index pointed at something that is not the expected record.
    IndexMismatch,
}

impl Shared {
    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Segment>>> {
        read_lock(&self.segments).clone()
    }

    fn first_offset(&self) -> u64 {
        let segs = self.snapshot();
        segs.first().map_or(0, |s| s.base)
    }

    fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>> {
        // The high-water mark first: every segment and byte it covers is
        // already in the snapshot taken after it.
        let hwm = *self.hwm.borrow();
        let segs = self.snapshot();
        let first = segs.first().map_or(hwm, |s| s.base);
        if from < first || from > hwm {
            return Err(Error::OffsetOutOfRange {
                requested: from,
                first,
                next: hwm,
            });
        }
        let mut out = Vec::new();
        if from == hwm || max_records == 0 {
            return Ok(out);
        }
        let mut bytes = 0usize;
        let chunk = max_bytes.clamp(4096, 256 << 10);
        let mut i = segs.partition_point(|s| s.base <= from).saturating_sub(1);
        while let Some(seg) = segs.get(i) {
            let end = segs.get(i + 1).map_or(hwm, |n| n.base.min(hwm));
            let mut full = false;
            walk(seg, seg.start_for(from), end, chunk, &mut |f| {
                if f.offset < from {
                    return true;
                }
                if !out.is_empty() && bytes + f.len > max_bytes {
                    full = true;
                    return false;
                }
                bytes += f.len;
                out.push(f.to_record());
                full = out.len() >= max_records || bytes >= max_bytes;
                !full
            })?;
            if full || end >= hwm {
                break;
            }
            i += 1;
        }
        Ok(out)
    }

    fn offset_for_time(&self, t: u64) -> Result<u64> {
        let hwm = *self.hwm.borrow();
        let segs = self.snapshot();
        // Timestamps never decrease, so the answer is in the last segment that
        // starts before `t`, or is the first record of the one after it.
        let found = segs
            .iter()
            .rposition(|s| s.base < hwm && s.first_timestamp().is_none_or(|ts| ts < t));
        let Some(i) = found else {
            return Ok(segs.first().map_or(hwm, |s| s.base));
        };
        let seg = &segs[i];
        let end = segs.get(i + 1).map_or(hwm, |n| n.base.min(hwm));
        let start = {
            let idx = read_lock(&seg.index);
            let k = idx.partition_point(|e| e.timestamp < t);
            k.checked_sub(1).map_or(
                IndexEntry {
                    offset: seg.base,
                    position: 0,
                    timestamp: 0,
                },
                |k| idx[k],
            )
        };
        let mut answer = end;
        walk(seg, start, end, 64 << 10, &mut |f| {
            if f.timestamp >= t {
                answer = f.offset;
                return false;
            }
            true
        })?;
        Ok(answer)
    }

    fn enforce_retention(&self, now_ms: u64) -> Result<RetentionOutcome> {
        let cfg = &self.config;
        let doomed: Vec<Arc<Segment>> = {
            let mut guard = write_lock(&self.segments);
            let segs = guard.clone();
            let mut remaining: u64 = segs.iter().map(|s| s.size()).sum();
            let mut n = 0;
            while n + 1 < segs.len() {
                let (seg, next) = (&segs[n], &segs[n + 1]);
                let too_big = cfg.retention_bytes.is_some_and(|max| remaining > max);
                let too_old = cfg.retention_ms.is_some_and(|ms| {
                    next.first_timestamp()
                        .is_some_and(|ts| ts.saturating_add(ms) < now_ms)
                });
                if !(too_big || too_old) {
                    break;
                }
                remaining -= seg.size();
                n += 1;
            }
            if n == 0 {
                return Ok(RetentionOutcome {
                    first_offset: segs.first().map_or(0, |s| s.base),
                    ..RetentionOutcome::default()
                });
            }
            *guard = Arc::new(segs[n..].to_vec());
            segs[..n].to_vec()
        };
        // Readers holding a snapshot keep their open descriptors; on unix the
        // data stays readable for them until they let go.
        let mut outcome = RetentionOutcome {
            deleted_segments: doomed.len(),
            deleted_bytes: doomed.iter().map(|s| s.size()).sum(),
            first_offset: self.first_offset(),
        };
        let mut first_err = None;
        for seg in &doomed {
            if let Err(e) = fs::remove_file(&seg.path) {
                error!(path = %seg.path.display(), error = %e, "cannot delete expired segment");
                first_err.get_or_insert(Error::io("delete", &seg.path, e));
                outcome.deleted_segments -= 1;
                continue;
            }
            if let Err(e) = fs::remove_file(&seg.index_path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %seg.index_path.display(), error = %e, "cannot delete index");
                }
            }
        }
        sync_dir(&self.dir)?;
        info!(
            deleted = outcome.deleted_segments,
            bytes = outcome.deleted_bytes,
            first_offset = outcome.first_offset,
            "retention"
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }
}

/// Visits the frames of `seg` from the batch start `start` until offset
/// `end` (exclusive). `visit` returns false to stop. Every frame is verified.
fn walk(
    seg: &Segment,
    start: IndexEntry,
    end: u64,
    chunk: usize,
    visit: &mut dyn FnMut(&Frame<'_>) -> bool,
) -> Result<()> {
    if let Walk::IndexMismatch = walk_from(seg, start, end, chunk, start.position != 0, visit)? {
        warn!(path = %seg.index_path.display(), offset = start.offset, "index entry does not match segment; scanning from its start");
        let from_start = IndexEntry {
            offset: seg.base,
            position: 0,
            timestamp: 0,
        };
        walk_from(seg, from_start, end, chunk, false, visit)?;
    }
    Ok(())
}

fn walk_from(
    seg: &Segment,
    start: IndexEntry,
    end: u64,
    chunk: usize,
    from_index: bool,
    visit: &mut dyn FnMut(&Frame<'_>) -> bool,
) -> Result<Walk> {
    let mut cursor = Cursor::new(&seg.file, start.position, seg.size(), chunk);
    let mut expected = start.offset;
    let corrupt = |position, offset, reason| Error::Corrupt {
        segment: seg.path.clone(),
        position,
        offset,
        reason,
    };
    while expected < end {
        let at_start = expected == start.offset;
        let at = cursor.position();
        let step = cursor.next().map_err(io_err("read", &seg.path))?;
        let (position, reason) = match step {
            Step::Frame(_, f) if f.offset == expected => {
                expected += 1;
                if !visit(&f) {
                    return Ok(Walk::Stopped);
                }
                continue;
            }
            Step::Frame(pos, _) => (pos, "record offset out of sequence"),
            Step::End => (at, "segment ends before its last record"),
            Step::Incomplete(pos) => (pos, "segment ends inside a record"),
            Step::Invalid(pos, r) | Step::Malformed(pos, r) => (pos, r),
        };
        if at_start && from_index {
            return Ok(Walk::IndexMismatch);
        }
        return Err(corrupt(position, expected, reason));
    }
    Ok(Walk::Reached)
}

/// Segment and index base offsets found in `dir`.
fn list_dir(dir: &Path) -> Result<(Vec<u64>, BTreeSet<u64>)> {
    let mut bases = Vec::new();
    let mut indexes = BTreeSet::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(b) = parse_name(name, SEGMENT_SUFFIX) {
            bases.push(b);
        } else if let Some(b) = parse_name(name, INDEX_SUFFIX) {
            indexes.insert(b);
        }
    }
    bases.sort_unstable();
    Ok((bases, indexes))
}

fn load_index(path: &Path) -> Option<Vec<IndexEntry>> {
    index::load(path).unwrap_or_else(|e| {
        warn!(path = %path.display(), error = %e, "cannot read index; rebuilding");
        None
    })
}

/// Whether the last entry points at the record it claims; catches an index
/// that is well-formed but belongs to other contents.
fn last_entry_matches(file: &File, path: &Path, entries: &[IndexEntry], len: u64) -> Result<bool> {
    let Some(last) = entries.last() else {
        return Ok(true);
    };
    let found = frame_at(file, last.position, len).map_err(io_err("read", path))?;
    Ok(matches!(found, Some((o, t, _)) if o == last.offset && t == last.timestamp))
}

fn store_index(path: &Path, entries: &[IndexEntry]) -> Option<File> {
    index::store(path, entries)
        .map_err(|e| warn!(path = %path.display(), error = %e, "cannot write index"))
        .ok()
}

/// Opens a sealed segment. Sealed data is trusted (reads verify it), so only
/// its index is checked here.
fn open_sealed(
    dir: &Path,
    base: u64,
    next_base: u64,
    interval: u64,
    rebuilt: &mut Vec<PathBuf>,
) -> Result<Segment> {
    let path = segment_path(dir, base);
    let ipath = index_path(dir, base);
    let file = File::open(&path).map_err(io_err("open segment", &path))?;
    let len = file.metadata().map_err(io_err("stat", &path))?.len();
    let entries = match load_index(&ipath) {
        Some(e)
            if index::well_formed(&e, base, len, next_base)
                && last_entry_matches(&file, &path, &e, len)? =>
        {
            e
        }
        _ => {
            let start = IndexEntry {
                offset: base,
                position: 0,
                timestamp: 0,
            };
            let s = scan(&file, start, len, interval, None).map_err(io_err("read", &path))?;
            if s.stop != ScanStop::Clean || s.expected != next_base {
                // Not fatal: reads that reach the damage will report it.
                warn!(path = %path.display(), stop = ?s.stop, "sealed segment has damaged or missing records");
            }
            warn!(path = %ipath.display(), "index missing or wrong; rebuilt");
            store_index(&ipath, &s.entries);
            rebuilt.push(ipath.clone());
            s.entries
        }
    };
    Ok(Segment {
        base,
        path,
        index_path: ipath,
        file,
        size: AtomicU64::new(len),
        index: RwLock::new(entries),
    })
}

/// Newest timestamp in the first `len` bytes of a segment, scanning from its
/// last index entry there, so timestamps keep increasing after a reopen that
/// lost the newest batch. Best effort: stops quietly at damage.
fn newest_timestamp(file: &File, entries: &[IndexEntry], len: u64) -> Option<u64> {
    let last = entries.iter().rev().find(|e| e.position < len).copied()?;
    let mut newest = last.timestamp;
    let mut cursor = Cursor::new(file, last.position, len, 1 << 16);
    while let Ok(Step::Frame(_, f)) = cursor.next() {
        newest = newest.max(f.timestamp);
    }
    Some(newest)
}

/// The recovered active segment and the writer's starting state.
struct Active {
    segment: Segment,
    index_file: Option<File>,
    position: u64,
    /// The file's length: `position` plus any preallocated zeros kept.
    allocated: u64,
    next_offset: u64,
    last_ts: Option<u64>,
    last_indexed: Option<u64>,
    truncation: Option<Truncation>,
}

/// Whether `file` holds only zero bytes in `[from, to)`.
fn zeros(file: &File, from: u64, to: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Verifies the last segment from its last index point and cuts off a torn tail.
fn recover_active(
    dir: &Path,
    base: u64,
    interval: u64,
    rebuilt: &mut Vec<PathBuf>,
) -> Result<Active> {
    let path = segment_path(dir, base);
    let ipath = index_path(dir, base);
    let file = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err("open segment", &path))?;
    let len = file.metadata().map_err(io_err("stat", &path))?.len();

    let mut entries = match load_index(&ipath) {
        Some(e)
            if index::well_formed(&e, base, len, u64::MAX)
                && last_entry_matches(&file, &path, &e, len)? =>
        {
            e
        }
        _ => {
            if len > 0 {
                warn!(path = %ipath.display(), "index missing or wrong; rebuilding");
                rebuilt.push(ipath.clone());
            }
            Vec::new()
        }
    };
    let start = entries.last().copied().unwrap_or(IndexEntry {
        offset: base,
        position: 0,
        timestamp: 0,
    });
    let s = scan(
        &file,
        start,
        len,
        interval,
        entries.last().map(|e| e.position),
    )
    .map_err(io_err("read", &path))?;
    let corrupt = |position, reason| Error::Corrupt {
        segment: path.clone(),
        position,
        offset: s.expected,
        reason,
    };
    let reason = match s.stop {
        ScanStop::Clean => "unfinished batch at the tail",
        ScanStop::Malformed(p, r) => return Err(corrupt(p, r)),
        ScanStop::WrongOffset(p) => return Err(corrupt(p, "record offset out of sequence")),
        // Zeros from the last complete batch to the end are the writer's
        // preallocation (a crash keeps them), not damage: nothing to cut. Zeros
        // that start inside a batch are a torn write like any other.
        ScanStop::Incomplete(p) | ScanStop::Invalid(p, _)
            if p == s.complete_len && zeros(&file, p, len).map_err(io_err("read", &path))? =>
        {
            ""
        }
        ScanStop::Incomplete(p) | ScanStop::Invalid(p, _) => {
            // A torn write only ever damages the end. Anything good after the
            // bad frame means acknowledged data would be lost by cutting here.
            let after =
                find_frame_after(&file, p + 1, len, s.expected).map_err(io_err("read", &path))?;
            if let Some(q) = after {
                error!(path = %path.display(), position = p, next_good = q, "damaged record followed by valid records");
                let reason = match s.stop {
                    ScanStop::Invalid(_, r) => r,
                    _ => "frame length runs past valid records",
                };
                return Err(corrupt(p, reason));
            }
            match s.stop {
                ScanStop::Invalid(_, r) => r,
                _ => "incomplete record at the tail",
            }
        }
    };

    let truncation = if s.complete_len < len && !reason.is_empty() {
        file.set_len(s.complete_len)
            .map_err(io_err("truncate", &path))?;
        file.sync_all().map_err(io_err("fsync", &path))?;
        let t = Truncation {
            segment: path.clone(),
            position: s.complete_len,
            bytes: len - s.complete_len,
            resumed_at: s.complete_next,
            reason,
        };
        warn!(
            segment = %path.display(),
            position = t.position,
            bytes = t.bytes,
            resumed_at = t.resumed_at,
            reason,
            "truncated torn tail of the log"
        );
        Some(t)
    } else {
        None
    };
    entries.extend(s.entries);
    entries.retain(|e| e.position < s.complete_len);
    let last_ts = s
        .complete_ts
        .or_else(|| newest_timestamp(&file, &entries, s.complete_len));
    let index_file = store_index(&ipath, &entries);
    let allocated = if truncation.is_some() {
        s.complete_len
    } else {
        len
    };
    Ok(Active {
        position: s.complete_len,
        allocated,
        next_offset: s.complete_next,
        last_indexed: entries.last().map(|e| e.position),
        segment: Segment {
            base,
            path,
            index_path: ipath,
            file,
            size: AtomicU64::new(s.complete_len),
            index: RwLock::new(entries),
        },
        index_file,
        last_ts,
        truncation,
    })
}

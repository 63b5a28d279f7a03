//! The single writer thread: group commit.

use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use crate::ahead::Ahead;
use crate::error::{io_err, Error, Result};
use crate::index::{self, IndexEntry};
use crate::log::Shared;
use crate::record::seal_batch;
use crate::segment::{index_path, segment_path, Segment};
use crate::util::{now_ms, sync_dir, write_lock};

/// One `append` call waiting for its records to become durable.
pub(crate) struct AppendRequest {
    /// Encoded frames with offsets, timestamps and checksums still zero.
    pub(crate) frames: Vec<u8>,
    pub(crate) reply: oneshot::Sender<Result<Range<u64>>>,
}

/// State owned by the writer thread alone.
pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) rx: mpsc::Receiver<AppendRequest>,
    pub(crate) active: Arc<Segment>,
    /// `None` if it could not be opened: the index is only a cache.
    pub(crate) index_file: Option<File>,
    /// Bytes written to the active segment (durable after each commit).
    pub(crate) position: u64,
    /// The zeros ahead of the active segment's records (see
    /// [`LogConfig::preallocate_bytes`](crate::LogConfig)).
    pub(crate) ahead: Arc<Ahead>,
    pub(crate) next_offset: u64,
    pub(crate) last_ts: u64,
    pub(crate) last_indexed: Option<u64>,
    /// Held for the writer's lifetime so a second `Log` cannot open the directory.
    pub(crate) _lock: File,
    pub(crate) pending_index: Vec<IndexEntry>,
    pub(crate) buf: Vec<u8>,
    pub(crate) failed: Option<String>,
}

impl Writer {
    /// Runs until every sender is gone, then drops the files and the
    /// directory lock before reporting completion.
    pub(crate) fn run(mut self, done: oneshot::Sender<()>) {
        let max_group = self.shared.config.max_group_bytes;
        while let Some(first) = self.rx.blocking_recv() {
            #[cfg(test)]
            let gate = crate::util::lock(&self.shared.test_gate);
            let mut bytes = first.frames.len();
            let mut group = vec![first];
            // Whatever queued up while the previous fsync ran shares the next one.
            while bytes < max_group {
                match self.rx.try_recv() {
                    Ok(req) => {
                        bytes += req.frames.len();
                        group.push(req);
                    }
                    Err(_) => break,
                }
            }
            #[cfg(test)]
            drop(gate);
            self.commit(group);
        }
        self.trim();
        drop(self);
        let _ = done.send(());
    }

    /// On a clean close, gives the zeros ahead of the data back, so a closed
    /// segment file is exactly its records. (A crash leaves them; recovery knows
    /// a zero tail at a batch boundary from a torn write.)
    fn trim(&mut self) {
        let allocated = self.ahead.close();
        if self.failed.is_some() || allocated <= self.position {
            return;
        }
        let file = &self.active.file;
        match file.set_len(self.position).and_then(|()| file.sync_data()) {
            Ok(()) => self.ahead.cut(self.position),
            Err(e) => {
                warn!(path = %self.active.path.display(), error = %e, "cannot trim the preallocated tail")
            }
        }
    }

    fn commit(&mut self, mut group: Vec<AppendRequest>) {
        if let Some(cause) = &self.failed {
            for req in group {
                let _ = req.reply.send(Err(Error::WriterFailed {
                    cause: cause.clone(),
                }));
            }
            return;
        }
        match self.write_group(&mut group) {
            Ok(ranges) => {
                for (req, range) in group.into_iter().zip(ranges) {
                    let _ = req.reply.send(Ok(range));
                }
            }
            Err(e) => {
                // Whether the bytes reached the disk is now unknown, and after
                // a failed fsync the page cache may even lie about it; only a
                // reopen (which re-verifies the tail) can continue safely.
                error!(error = %e, "log write failed; refusing further appends until reopen");
                self.failed = Some(e.to_string());
                for req in group {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn write_group(&mut self, group: &mut [AppendRequest]) -> Result<Vec<Range<u64>>> {
        let ts = now_ms().max(self.last_ts);
        let segment_bytes = self.shared.config.segment_bytes;
        let interval = self.shared.config.index_interval_bytes;
        let mut ranges = Vec::with_capacity(group.len());
        let mut records = 0;
        self.buf.clear();
        for req in group.iter_mut() {
            let end = self.position + self.buf.len() as u64;
            if end > 0 && end + req.frames.len() as u64 > segment_bytes {
                self.flush()?;
                self.roll()?;
            }
            let pos = self.position + self.buf.len() as u64;
            let first = self.next_offset;
            let n = seal_batch(&mut req.frames, first, ts);
            if self.last_indexed.is_none_or(|l| pos - l >= interval) {
                self.pending_index.push(IndexEntry {
                    offset: first,
                    position: pos,
                    timestamp: ts,
                });
                self.last_indexed = Some(pos);
            }
            self.buf.extend_from_slice(&req.frames);
            self.next_offset += n;
            records += n;
            ranges.push(first..self.next_offset);
        }
        self.flush()?;
        self.fsync()?;
        self.last_ts = ts;
        self.publish_index();
        self.active.size.store(self.position, Ordering::Release);
        let stats = &self.shared.stats;
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats
            .batches
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        stats.records.fetch_add(records, Ordering::Relaxed);
        // Last: this is what lets readers and waiters see the new records.
        self.shared.hwm.send_replace(self.next_offset);
        if let Some(hook) = self.shared.on_durable.get() {
            hook(stats.fsyncs.load(Ordering::Relaxed));
        }
        Ok(ranges)
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let end = self.position + self.buf.len() as u64;
        if self.ahead.ensure(self.position, end)? {
            self.shared
                .stats
                .zeroed_inline
                .fetch_add(1, Ordering::Relaxed);
        }
        self.active
            .file
            .write_all_at(&self.buf, self.position)
            .map_err(io_err("write", &self.active.path))?;
        self.position += self.buf.len() as u64;
        self.buf.clear();
        self.ahead.request(self.position);
        Ok(())
    }

    fn fsync(&self) -> Result<()> {
        self.active
            .file
            .sync_data()
            .map_err(io_err("fsync", &self.active.path))?;
        self.shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Hands index entries of now-durable data to readers and the index file.
    fn publish_index(&mut self) {
        if self.pending_index.is_empty() {
            return;
        }
        if let Some(f) = &mut self.index_file {
            let mut bytes = Vec::with_capacity(self.pending_index.len() * index::ENTRY_LEN);
            for e in &self.pending_index {
                e.encode(&mut bytes);
            }
            if let Err(e) = f.write_all(&bytes) {
                // A stale index is rebuilt at the next open; stop feeding this one
                // so it does not end up with a hole.
                warn!(path = %self.active.index_path.display(), error = %e, "index write failed; index will be rebuilt on reopen");
                self.index_file = None;
            }
        }
        write_lock(&self.active.index).extend(self.pending_index.drain(..));
    }

    /// Seals the active segment and starts a new one at `next_offset`.
    fn roll(&mut self) -> Result<()> {
        // A sealed segment is exactly its records: readers and recovery take a
        // sealed file's length as its end. Durable before the next file exists.
        if self.ahead.close() > self.position {
            self.active
                .file
                .set_len(self.position)
                .map_err(io_err("truncate", &self.active.path))?;
            self.ahead.cut(self.position);
        }
        self.fsync()?;
        self.publish_index();
        self.active.size.store(self.position, Ordering::Release);
        if let Some(f) = self.index_file.take() {
            // Saves a full rebuild scan of this segment at the next open.
            if let Err(e) = f.sync_data() {
                warn!(path = %self.active.index_path.display(), error = %e, "index fsync failed");
            }
        }
        let dir = &self.shared.dir;
        let base = self.next_offset;
        let path = segment_path(dir, base);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create segment", &path))?;
        let ipath = index_path(dir, base);
        self.index_file = match index::store(&ipath, &[]) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(path = %ipath.display(), error = %e, "cannot create index file");
                None
            }
        };
        // The new file name must survive a crash before any record in it is acknowledged.
        sync_dir(dir)?;
        let segment = Arc::new(Segment {
            base,
            path,
            index_path: ipath,
            file,
            size: AtomicU64::new(0),
            index: RwLock::new(Vec::new()),
        });
        {
            let mut segs = write_lock(&self.shared.segments);
            let mut next = Vec::with_capacity(segs.len() + 1);
            next.extend(segs.iter().cloned());
            next.push(segment.clone());
            *segs = Arc::new(next);
        }
        debug!(base, "rolled to a new segment");
        self.shared.stats.rolls.fetch_add(1, Ordering::Relaxed);
        self.ahead = Ahead::new(
            segment.clone(),
            0,
            self.shared.config.preallocate_bytes,
            self.shared.config.segment_bytes,
        );
        #[cfg(test)]
        {
            *crate::util::lock(&self.shared.ahead) = Some(self.ahead.clone());
        }
        self.active = segment;
        self.position = 0;
        self.last_indexed = None;
        Ok(())
    }
}

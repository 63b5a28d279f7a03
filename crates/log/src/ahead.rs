//! Zeros ahead of the active segment's records, written off the writer thread.
//!
//! A group's `fdatasync` is cheap only where it overwrites blocks the file
//! already owns (see [`LogConfig::preallocate_bytes`](crate::LogConfig)), so the
//! active segment is extended with written zeros ahead of its data. Writing them
//! on the writer thread held every append behind it: a 4 MiB extension and the
//! fsync that followed took about 17 ms on the development machines, a stall in
//! every group commit queued meanwhile, about every 14,000 small records. So the
//! writer asks one zeroing thread per process for the next extension once fewer
//! zeros are left than half of it, and writes zeros itself only for a segment's
//! first 64 KiB, a batch larger than what is left, or when that thread is behind
//! (or its queue is full).
//!
//! Zeros must never land where records are. The writer writes records only
//! below `allocated`; the zeroing thread writes only at or above it, in a range
//! it claims under the lock first, and the writer waits for a claimed range to
//! be finished before it writes into it or cuts the file's tail off.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use tracing::warn;

use crate::error::{io_err, Result};
use crate::segment::Segment;
use crate::util::lock;

/// Extensions waiting for the zeroing thread; when full, writers zero their own.
const QUEUE: usize = 256;
/// The zeroing thread writes its zeros back this often, so that a group commit's
/// `fdatasync` never finds more than this many of them still to write.
const SYNC_EVERY: u64 = 1 << 20;

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The zeros ahead of one segment's records, shared by its writer and the
/// zeroing thread.
pub(crate) struct Ahead {
    segment: Arc<Segment>,
    /// Largest step; 0 turns extension off.
    max_step: u64,
    segment_bytes: u64,
    state: Mutex<State>,
    /// Signalled when a claimed range is finished.
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// The file's length: records, then zeros.
    allocated: u64,
    /// The zeroing thread is writing zeros up to here (above `allocated`).
    claimed: Option<u64>,
    /// An extension is queued for the zeroing thread.
    queued: bool,
    /// The segment is being sealed or closed: no more zeros.
    closed: bool,
}

/// How far one extension reaches from `allocated`: the file's own length (at
/// least 64 KiB) up to `max_step`, never past the segment size.
fn next_target(allocated: u64, max_step: u64, segment_bytes: u64) -> u64 {
    let step = allocated
        .clamp(64 << 10, max_step.max(64 << 10))
        .min(max_step);
    (allocated + step).min(segment_bytes.max(allocated))
}

fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Writes `len` bytes from `from` back to the disk and waits for it, without the
/// cache flush an `fdatasync` adds: the zeros need not be durable (the writer's
/// next fsync makes the file's length so, and recovery takes a zero tail for what
/// it is), they only must not be left for a group commit's `fdatasync` to write.
/// A flush of its own here would compete with the writer's, one per group.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn write_back(file: &File, from: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (libc::off64_t::try_from(from), libc::off64_t::try_from(len)) else {
        return Ok(());
    };
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range reads no memory of ours; the descriptor is open for
    // as long as `file` is borrowed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), from, len, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere a full `fdatasync`: correct, only dearer.
#[cfg(not(target_os = "linux"))]
fn write_back(file: &File, _from: u64, _len: u64) -> std::io::Result<()> {
    file.sync_data()
}

impl Ahead {
    pub(crate) fn new(
        segment: Arc<Segment>,
        allocated: u64,
        max_step: u64,
        segment_bytes: u64,
    ) -> Arc<Self> {
        Arc::new(Ahead {
            segment,
            max_step,
            segment_bytes,
            state: Mutex::new(State {
                allocated,
                ..State::default()
            }),
            done: Condvar::new(),
        })
    }

    /// The state once no range is claimed.
    fn settled(&self) -> MutexGuard<'_, State> {
        let mut st = lock(&self.state);
        while st.claimed.is_some() {
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    /// Makes the file own `[position, end)`, writing zeros up to at least `end`
    /// itself if the zeroing thread has not got there. Returns whether it had to.
    pub(crate) fn ensure(&self, position: u64, end: u64) -> Result<bool> {
        if self.max_step == 0 {
            return Ok(false);
        }
        {
            let st = lock(&self.state);
            if end <= st.allocated {
                return Ok(false);
            }
        }
        let mut st = self.settled();
        if end <= st.allocated {
            return Ok(false);
        }
        let target = next_target(st.allocated, self.max_step, self.segment_bytes).max(end);
        write_zeros(&self.segment.file, st.allocated.max(position), target)
            .map_err(io_err("preallocate", &self.segment.path))?;
        st.allocated = target;
        Ok(true)
    }

    /// Called after records up to `position` are written: once fewer zeros are
    /// left than half of the next extension, queues it for the zeroing thread.
    pub(crate) fn request(self: &Arc<Self>, position: u64) {
        if self.max_step == 0 {
            return;
        }
        {
            let mut st = lock(&self.state);
            let half = next_target(st.allocated, self.max_step, self.segment_bytes)
                .saturating_sub(st.allocated)
                / 2;
            if st.queued
                || st.closed
                || st.allocated >= self.segment_bytes
                || position + half < st.allocated
            {
                return;
            }
            st.queued = true;
        }
        let sent = match zeroer() {
            Some(tx) => match tx.try_send(self.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if !sent {
            // The writer zeroes this one itself when it gets there.
            lock(&self.state).queued = false;
        }
    }

    /// The zeroing thread's part: one extension, written and written back.
    fn extend(&self) {
        let (from, to) = {
            let mut st = lock(&self.state);
            st.queued = false;
            if st.closed || st.claimed.is_some() || st.allocated >= self.segment_bytes {
                return;
            }
            let to = next_target(st.allocated, self.max_step, self.segment_bytes);
            st.claimed = Some(to);
            (st.allocated, to)
        };
        let file = &self.segment.file;
        let mut at = from;
        let mut result = Ok(());
        while at < to && result.is_ok() {
            let n = (to - at).min(SYNC_EVERY);
            result = write_zeros(file, at, at + n).and_then(|()| write_back(file, at, n));
            if result.is_ok() {
                at += n;
            }
        }
        if let Err(e) = result {
            // The writer zeroes what is missing itself, and reports the error if
            // the file system refuses it too.
            warn!(path = %self.segment.path.display(), error = %e, "cannot write zeros ahead of the log");
        }
        let mut st = lock(&self.state);
        st.allocated = st.allocated.max(at);
        st.claimed = None;
        drop(st);
        self.done.notify_all();
    }

    /// No more zeros: waits for a claimed range, then returns the file's length.
    /// The caller cuts the zeros off (sealing or a clean close).
    pub(crate) fn close(&self) -> u64 {
        let mut st = self.settled();
        st.closed = true;
        st.allocated
    }

    /// Waits until no extension is queued or being written.
    #[cfg(test)]
    pub(crate) fn settle(&self) {
        loop {
            let st = self.settled();
            if !st.queued {
                return;
            }
            drop(st);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Records that the caller cut the file to `len`.
    pub(crate) fn cut(&self, len: u64) {
        lock(&self.state).allocated = len;
    }
}

/// The zeroing thread: one per process, shared by every log, started on first
/// use. `None` if it could not be started (writers then zero their own).
fn zeroer() -> Option<&'static SyncSender<Arc<Ahead>>> {
    static TX: OnceLock<Option<SyncSender<Arc<Ahead>>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<Arc<Ahead>>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("shoal-log-zeroes".into())
            .spawn(move || {
                for ahead in rx {
                    ahead.extend();
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                warn!(error = %e, "cannot start the log's zeroing thread; writers zero their own files");
                None
            }
        }
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::next_target;

    #[test]
    fn extensions_double_from_64_kib_to_the_step_and_stop_at_the_segment_size() {
        let (step, seg) = (4 << 20, 128 << 20);
        assert_eq!(next_target(0, step, seg), 64 << 10);
        assert_eq!(next_target(64 << 10, step, seg), 128 << 10);
        assert_eq!(next_target(3 << 20, step, seg), 6 << 20);
        assert_eq!(next_target(8 << 20, step, seg), 12 << 20);
        assert_eq!(next_target(126 << 20, step, seg), 128 << 20);
        assert_eq!(next_target(130 << 20, step, seg), 130 << 20);
        assert_eq!(next_target(0, 16 << 10, seg), 16 << 10);
    }
}

use crate::error::{Error, Result};
use crate::record::{MAX_FRAME_BYTES, MIN_FRAME_BYTES};

/// Limits and tuning of one [`Log`](crate::Log).
///
/// All sizes count encoded bytes on disk (see the crate docs for the frame
/// layout), so `Record::encoded_len` tells a producer exactly what a record costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A new segment is started before a batch that would take the active
    /// segment past this size. A single batch larger than this still goes
    /// into one (fresh) segment, because batches never span segments.
    /// Default 128 MiB.
    pub segment_bytes: u64,
    /// Largest encoded record frame accepted. Default 1 MiB; at most 1 GiB.
    pub max_record_bytes: usize,
    /// Most records accepted in one `append`. Default 10 000.
    pub max_batch_records: usize,
    /// Largest encoded batch accepted in one `append`. Default 8 MiB.
    pub max_batch_bytes: usize,
    /// The writer thread stops gathering queued batches into one group
    /// (one write + one fsync) once it holds this many bytes. Default 16 MiB.
    pub max_group_bytes: usize,
    /// How many appends may wait in the writer's queue before `append`
    /// itself waits (back-pressure). Default 1024.
    pub write_queue: usize,
    /// Distance in bytes between sparse index entries. Default 4 KiB.
    pub index_interval_bytes: u64,
    /// The active segment is extended ahead of the data with written zeros, at
    /// most this many bytes at a time (starting at 64 KiB and doubling), so that a
    /// group's fsync overwrites blocks the file already owns: the file system then
    /// has no size or block allocation to journal, and an `fdatasync` is one data
    /// write and a cache flush. `0` turns it off. Default 4 MiB.
    pub preallocate_bytes: u64,
    /// Delete the oldest sealed segments while the log is larger than this.
    /// `None` keeps everything. Default `None`.
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments whose records are all older than this many
    /// milliseconds. `None` keeps everything. Default 7 days.
    pub retention_ms: Option<u64>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 128 << 20,
            max_record_bytes: 1 << 20,
            max_batch_records: 10_000,
            max_batch_bytes: 8 << 20,
            max_group_bytes: 16 << 20,
            write_queue: 1024,
            index_interval_bytes: 4096,
            preallocate_bytes: 4 << 20,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
        }
    }
}

impl LogConfig {
    /// Checks that the limits are consistent with each other and the format.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.max_record_bytes < MIN_FRAME_BYTES || self.max_record_bytes > MAX_FRAME_BYTES {
            return bad(format!(
                "max_record_bytes must be in [{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}], got {}",
                self.max_record_bytes
            ));
        }
        if self.max_batch_bytes < self.max_record_bytes {
            return bad("max_batch_bytes must be >= max_record_bytes".into());
        }
        if self.max_group_bytes < self.max_batch_bytes {
            return bad("max_group_bytes must be >= max_batch_bytes".into());
        }
        if self.max_batch_records == 0 {
            return bad("max_batch_records must be > 0".into());
        }
        if self.write_queue == 0 {
            return bad("write_queue must be > 0".into());
        }
        if self.segment_bytes == 0 {
            return bad("segment_bytes must be > 0".into());
        }
        if self.index_interval_bytes == 0 {
            return bad("index_interval_bytes must be > 0".into());
        }
        Ok(())
    }
}

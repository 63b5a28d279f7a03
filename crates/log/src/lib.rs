//! Storage engine of shoal's embedded message broker: one partition is a
//! [`Log`], an append-only sequence of records kept in segment files.
//!
//! The contract is **acknowledged means fsynced**: [`Log::append`] returns
//! only after the batch is written and `fdatasync`ed, and readers never see a
//! record before that. A dedicated writer thread drains the append queue,
//! writes everything queued in one go and fsyncs once for the whole group, so
//! many concurrent producers share one disk flush (group commit).
//!
//! Other pieces: [`LogConfig`] (limits and retention), [`Recovery`] (what
//! opening repaired), [`OffsetStore`] (consumer-group offsets), [`Error`].
//!
//! # Directory layout
//!
//! ```text
//! <dir>/LOCK                          advisory lock: one Log per directory
//! <dir>/00000000000000000000.log      segment, named by the offset of its first record (20 digits)
//! <dir>/00000000000000000000.index    sparse index of that segment (a cache)
//! <dir>/00000000000000004711.log      next segment, first record has offset 4711
//! ```
//!
//! Offsets are dense: segment *n* holds exactly the offsets from its base up
//! to the next segment's base. A batch never spans two segments. Only the
//! last segment (the *active* one) is ever written.
//!
//! # Record frame (format version 1)
//!
//! A segment is a plain concatenation of frames, with no file header. All
//! integers are **little-endian**.
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 4 | `body_len` u32 | length of everything after the checksum (frame = 8 + `body_len` bytes) |
//! | 4 | `crc` u32 | CRC-32C (Castagnoli) of the `body_len` bytes that follow |
//! | 1 | `version` u8 | `1` |
//! | 1 | `flags` u8 | bit 0: last record of its append batch; other bits must be 0 |
//! | 8 | `offset` u64 | the record's offset |
//! | 8 | `timestamp` u64 | unix milliseconds, assigned by the log, never decreasing |
//! | 4 | `key_len` u32 | `0xFFFF_FFFF` = no key, else the key length |
//! | k | `key` | key bytes (absent when no key) |
//! | 4 | `header_count` u32 | number of headers |
//! | … | headers | per header: u32 name length, UTF-8 name, u32 value length, value bytes |
//! | 4 | `payload_len` u32 | payload length |
//! | p | `payload` | payload bytes |
//!
//! The body must end exactly after the payload. The smallest frame is 38
//! bytes; no frame may exceed 1 GiB. All records of one append share one
//! timestamp.
//!
//! The batch-end flag makes batches atomic across crashes: recovery cuts the
//! log back to the end of the last frame that has the flag set.
//!
//! # Index file
//!
//! 8-byte magic `SHLIDX01`, then 28-byte entries: u64 offset, u64 byte
//! position in the segment, u64 timestamp, u32 CRC-32C of those 24 bytes.
//! Entries point only at the first record of a batch; the first batch of a
//! segment is always indexed, later ones when at least
//! `index_interval_bytes` lie since the previous entry. Offsets, positions
//! and timestamps strictly increase (timestamps: never decrease). The index
//! is not fsynced: a missing, torn, garbage or mismatching index is rebuilt
//! from its segment on open, and a read whose index entry points at the
//! wrong record falls back to scanning the segment from the start.
//!
//! # Recovery
//!
//! On open the last segment is verified from its last index entry (or its
//! start). Incomplete or checksum-failing bytes at the very end (a torn
//! write), and records of a batch that never got its batch-end frame, are
//! cut off with `set_len` + fsync and reported in [`Recovery`]. A bad frame
//! that is followed by any valid frame is damage, not a torn write: open
//! fails with [`Error::Corrupt`] naming the file, byte position and offset.
//! Sealed segments are not scanned; reads verify every frame's checksum and
//! return [`Error::Corrupt`] instead of skipping anything.
//!
//! The writer extends the active segment ahead of its data with written zeros
//! ([`LogConfig::preallocate_bytes`]), so that a group's `fdatasync` has no file
//! size or block allocation to journal (on ext4 it then takes about half as long).
//! One zeroing thread per process writes them, ahead of need, so that no group
//! commit waits for them.
//! Zeros that begin exactly after the last complete batch and run to the end of
//! the file are therefore the writer's, not damage: recovery keeps them and
//! reports nothing. A clean close and every roll to a new segment cut them off,
//! so a sealed segment is exactly its records.
//!
//! # Consumer offsets file
//!
//! See [`OffsetStore`]: two slots of equal size, each magic `SHOFFS02`, u64
//! sequence, u32 slot size, u32 body length, the body (u32 count, then entries of
//! u32 group length, group UTF-8, u32 partition, u64 offset), CRC-32C of all of
//! that, zeros to the slot's end. The valid slot with the higher sequence is
//! current; a change overwrites the other one. Files of the first format
//! (`SHOFFS01`, one copy replaced by rename) are read and rewritten on change.

mod ahead;
mod config;
mod error;
mod index;
mod log;
mod offsets;
mod record;
mod segment;
mod util;
mod writer;

#[cfg(test)]
mod tests;

pub use crate::config::LogConfig;
pub use crate::error::{Error, Limit, Result};
pub use crate::log::{AppendWait, Log, LogStats, Recovery, RetentionOutcome, Truncation};
pub use crate::offsets::OffsetStore;
pub use crate::record::{Record, StoredRecord, MAX_FRAME_BYTES, MIN_FRAME_BYTES};

/// Re-exported so callers can name the type [`Log::subscribe`] returns.
pub use tokio::sync::watch;

//! Segment files and sequential frame scanning.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use crate::index::IndexEntry;
use crate::record::{
    parse_frame, plausible_body_len, prefix, Frame, Parsed, FLAG_BATCH_END, FORMAT_VERSION,
    FRAME_HEADER, MIN_FRAME_BYTES, PREFIX_LEN,
};
use crate::util::read_lock;

pub(crate) const SEGMENT_SUFFIX: &str = ".log";
pub(crate) const INDEX_SUFFIX: &str = ".index";

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
}

pub(crate) fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}{INDEX_SUFFIX}"))
}

/// Base offset encoded in a file name with the given suffix (exactly 20 digits).
pub(crate) fn parse_name(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One segment file as shared between the writer and readers.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    pub(crate) index_path: PathBuf,
    /// Opened read-write for the active segment so the writer and readers
    /// share one descriptor; positional I/O means no shared cursor.
    pub(crate) file: File,
    /// Bytes that are durable; readers never look past this.
    pub(crate) size: AtomicU64,
    /// In-memory copy of the sparse index.
    pub(crate) index: RwLock<Vec<IndexEntry>>,
}

impl Segment {
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Timestamp of the first record, known once that record is durable.
    pub(crate) fn first_timestamp(&self) -> Option<u64> {
        read_lock(&self.index).first().map(|e| e.timestamp)
    }

    /// Where to start scanning for `offset`.
    pub(crate) fn start_for(&self, offset: u64) -> IndexEntry {
        crate::index::lookup(&read_lock(&self.index), offset).unwrap_or(IndexEntry {
            offset: self.base,
            position: 0,
            timestamp: 0,
        })
    }
}

/// What the cursor found at its position.
#[derive(Debug)]
pub(crate) enum Step<'a> {
    /// Exactly at the byte limit.
    End,
    Frame(u64, Frame<'a>),
    /// A frame starts but the limit comes before its end.
    Incomplete(u64),
    /// Bad length or checksum: could be a torn write.
    Invalid(u64, &'static str),
    /// Checksum fine, content breaks the format.
    Malformed(u64, &'static str),
}

/// Reads frames one after another with few large positional reads.
pub(crate) struct Cursor<'f> {
    file: &'f File,
    pos: u64,
    limit: u64,
    chunk: usize,
    buf: Vec<u8>,
    buf_start: u64,
}

impl<'f> Cursor<'f> {
    pub(crate) fn new(file: &'f File, pos: u64, limit: u64, chunk: usize) -> Self {
        Cursor {
            file,
            pos,
            limit,
            chunk: chunk.max(MIN_FRAME_BYTES),
            buf: Vec::new(),
            buf_start: pos,
        }
    }

    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    /// Makes `buf` hold `[pos, pos + need)`; the caller checked it is below `limit`.
    fn fill(&mut self, need: usize) -> io::Result<usize> {
        let rel = usize::try_from(self.pos - self.buf_start).unwrap_or(usize::MAX);
        if rel.saturating_add(need) <= self.buf.len() {
            return Ok(rel);
        }
        let avail = usize::try_from(self.limit - self.pos).unwrap_or(usize::MAX);
        let want = need.max(self.chunk).min(avail);
        self.buf.resize(want, 0);
        self.file.read_exact_at(&mut self.buf, self.pos)?;
        self.buf_start = self.pos;
        Ok(0)
    }

    pub(crate) fn next(&mut self) -> io::Result<Step<'_>> {
        let pos = self.pos;
        if pos >= self.limit {
            return Ok(Step::End);
        }
        let avail = self.limit - pos;
        if avail < FRAME_HEADER as u64 {
            return Ok(Step::Incomplete(pos));
        }
        let rel = self.fill(FRAME_HEADER)?;
        let mut len = [0u8; 4];
        len.copy_from_slice(&self.buf[rel..rel + 4]);
        let body_len = u32::from_le_bytes(len) as usize;
        if !plausible_body_len(body_len) {
            return Ok(Step::Invalid(pos, "frame length out of range"));
        }
        let total = FRAME_HEADER + body_len;
        if total as u64 > avail {
            return Ok(Step::Incomplete(pos));
        }
        let rel = self.fill(total)?;
        let buf = &self.buf[rel..rel + total];
        Ok(match parse_frame(buf) {
            Parsed::Frame(f) => {
                self.pos += total as u64;
                Step::Frame(pos, f)
            }
            Parsed::Incomplete => Step::Incomplete(pos),
            Parsed::Invalid(r) => Step::Invalid(pos, r),
            Parsed::Malformed(r) => Step::Malformed(pos, r),
        })
    }
}

/// How a full scan of a segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanStop {
    /// Reached the limit exactly at a frame boundary.
    Clean,
    Incomplete(u64),
    Invalid(u64, &'static str),
    Malformed(u64, &'static str),
    /// A good frame whose offset breaks the sequence.
    WrongOffset(u64),
}

/// Result of scanning a segment from some batch start to its end.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Index entries for batch starts found after the starting point.
    pub(crate) entries: Vec<IndexEntry>,
    /// Byte position just after the last frame that closed a batch.
    pub(crate) complete_len: u64,
    /// Offset after that frame.
    pub(crate) complete_next: u64,
    /// Timestamp of that frame, if any complete batch was seen.
    pub(crate) complete_ts: Option<u64>,
    /// Offset the frame at the stop position should have had.
    pub(crate) expected: u64,
    pub(crate) stop: ScanStop,
}

/// Scans frames from `start` (which must be a batch start) up to `limit`,
/// noting index entries every `interval` bytes at batch starts.
/// `last_indexed` is the position of the last index entry at or before
/// `start`; `None` makes the first frame an entry too (a rebuild).
pub(crate) fn scan(
    file: &File,
    start: IndexEntry,
    limit: u64,
    interval: u64,
    mut last_indexed: Option<u64>,
) -> io::Result<Scan> {
    let mut cursor = Cursor::new(file, start.position, limit, 1 << 20);
    let mut out = Scan {
        entries: Vec::new(),
        complete_len: start.position,
        complete_next: start.offset,
        complete_ts: None,
        expected: start.offset,
        stop: ScanStop::Clean,
    };
    let mut at_batch_start = true;
    loop {
        let step = cursor.next()?;
        out.stop = match step {
            Step::End => ScanStop::Clean,
            Step::Incomplete(p) => ScanStop::Incomplete(p),
            Step::Invalid(p, r) => ScanStop::Invalid(p, r),
            Step::Malformed(p, r) => ScanStop::Malformed(p, r),
            Step::Frame(pos, f) => {
                if f.offset != out.expected {
                    out.stop = ScanStop::WrongOffset(pos);
                    break;
                }
                if at_batch_start && last_indexed.is_none_or(|l| pos - l >= interval) {
                    out.entries.push(IndexEntry {
                        offset: f.offset,
                        position: pos,
                        timestamp: f.timestamp,
                    });
                    last_indexed = Some(pos);
                }
                at_batch_start = f.batch_end();
                out.expected += 1;
                if f.batch_end() {
                    out.complete_len = pos + f.len as u64;
                    out.complete_next = out.expected;
                    out.complete_ts = Some(f.timestamp);
                }
                continue;
            }
        };
        break;
    }
    Ok(out)
}

/// Looks for any well-formed frame starting after `from` whose offset could
/// follow `min_offset`. Finding one means the bad bytes at `from` are not a
/// torn tail but damage in the middle of data. The offset window keeps a
/// record that merely contains frame-like bytes in its payload from counting.
pub(crate) fn find_frame_after(
    file: &File,
    from: u64,
    file_len: u64,
    min_offset: u64,
) -> io::Result<Option<u64>> {
    const WINDOW: usize = 1 << 20;
    let max_offset =
        min_offset.saturating_add((file_len.saturating_sub(from)) / MIN_FRAME_BYTES as u64 + 1);
    let mut window = Vec::new();
    let mut start = from;
    while start + (MIN_FRAME_BYTES as u64) <= file_len {
        // Overlap by PREFIX_LEN so a prefix straddling windows is seen whole.
        let len = (file_len - start).min((WINDOW + PREFIX_LEN) as u64) as usize;
        window.resize(len, 0);
        file.read_exact_at(&mut window, start)?;
        for rel in 0..WINDOW.min(len) {
            let pos = start + rel as u64;
            let Some(p) = prefix(&window[rel..]) else {
                break;
            };
            if !plausible_body_len(p.body_len)
                || pos + (FRAME_HEADER + p.body_len) as u64 > file_len
                || p.version != FORMAT_VERSION
                || p.flags & !FLAG_BATCH_END != 0
                || p.offset < min_offset
                || p.offset > max_offset
            {
                continue;
            }
            let mut frame = vec![0u8; FRAME_HEADER + p.body_len];
            file.read_exact_at(&mut frame, pos)?;
            if matches!(parse_frame(&frame), Parsed::Frame(_)) {
                return Ok(Some(pos));
            }
        }
        start += WINDOW as u64;
    }
    Ok(None)
}

/// Reads the single frame at `position`, if it is a good one.
pub(crate) fn frame_at(
    file: &File,
    position: u64,
    limit: u64,
) -> io::Result<Option<(u64, u64, usize)>> {
    let mut cursor = Cursor::new(file, position, limit, 4096);
    Ok(match cursor.next()? {
        Step::Frame(_, f) => Some((f.offset, f.timestamp, f.len)),
        _ => None,
    })
}

//! Persisted consumer-group offsets.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Error, Result};
use crate::util::sync_dir;

/// The first format: the whole file is one copy, replaced by rename. Still read.
const MAGIC_V1: &[u8; 8] = b"SHOFFS01";
/// The current format: two slots, overwritten in place in turn.
const MAGIC: &[u8; 8] = b"SHOFFS02";
/// magic, u64 sequence, u32 slot size, u32 body length.
const SLOT_HEADER: usize = 8 + 8 + 4 + 4;
/// The smallest slot; slots grow by doubling when the offsets outgrow them.
const MIN_SLOT: usize = 4096;

/// Committed consumer offsets, `(group, partition) -> next offset to read`,
/// kept in one small file.
///
/// The file holds two slots, each a whole copy with a sequence number and a
/// CRC-32C. A change overwrites the older slot in place and `fdatasync`s it: no new
/// file, no rename, no change of size, so the file system journals nothing and the
/// sync is one data write (a rename and two fsyncs each time cost several journal
/// commits, which slowed every other fsync on the disk, the logs' included). A torn
/// write damages only the slot being written; open takes the valid slot with the
/// higher sequence, so after a crash the file holds either the old or the new
/// contents, never a mix. Only when the offsets outgrow a slot is the file replaced
/// (temp file, fsync, rename, fsync of the directory) with slots twice the size.
///
/// Every mutating call is durable when it returns. Calls block on disk I/O; from
/// async code use `spawn_blocking` or a dedicated task.
#[derive(Debug)]
pub struct OffsetStore {
    path: PathBuf,
    offsets: BTreeMap<(String, u32), u64>,
    /// Open read-write once the file is in the slot format.
    file: Option<File>,
    slot_size: usize,
    /// Sequence number of the newest slot; the next write goes to the other one.
    sequence: u64,
}

impl OffsetStore {
    /// Loads the store at `path` (a file; its directory must exist). A missing
    /// file is an empty store; an unreadable one is [`Error::CorruptFile`].
    pub fn open(path: impl AsRef<Path>) -> Result<OffsetStore> {
        let path = path.as_ref().to_path_buf();
        let tmp = tmp_path(&path);
        // A leftover temp file is a write that never got renamed: the old file is current.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &tmp, e)),
        }
        let mut store = OffsetStore {
            path: path.clone(),
            offsets: BTreeMap::new(),
            file: None,
            slot_size: MIN_SLOT,
            sequence: 0,
        };
        let mut file = match File::options().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(store),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_err("read", &path))?;
        let corrupt = |reason| Error::CorruptFile {
            path: path.clone(),
            reason,
        };
        if bytes.starts_with(MAGIC_V1) {
            // Rewritten in the slot format by the first change.
            store.offsets = decode_v1(&bytes).map_err(corrupt)?;
            return Ok(store);
        }
        let (slot_size, sequence, offsets) = decode_slots(&bytes).map_err(corrupt)?;
        store.offsets = offsets;
        store.slot_size = slot_size;
        store.sequence = sequence;
        store.file = Some(file);
        Ok(store)
    }

    /// The file backing the store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The committed offset of `group` on `partition`.
    pub fn get(&self, group: &str, partition: u32) -> Option<u64> {
        self.offsets.get(&(group.to_owned(), partition)).copied()
    }

    /// All committed offsets of `group`, by partition.
    pub fn group(&self, group: &str) -> BTreeMap<u32, u64> {
        self.offsets
            .iter()
            .filter(|((g, _), _)| g == group)
            .map(|((_, p), o)| (*p, *o))
            .collect()
    }

    /// Every `(group, partition, offset)`, ordered by group then partition.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32, u64)> + '_ {
        self.offsets.iter().map(|((g, p), o)| (g.as_str(), *p, *o))
    }

    /// Commits one offset durably.
    pub fn commit(&mut self, group: &str, partition: u32, offset: u64) -> Result<()> {
        self.commit_all([(group, partition, offset)])
    }

    /// Commits several offsets in one atomic write.
    pub fn commit_all<'a>(
        &mut self,
        updates: impl IntoIterator<Item = (&'a str, u32, u64)>,
    ) -> Result<()> {
        let mut next = self.offsets.clone();
        for (g, p, o) in updates {
            next.insert((g.to_owned(), p), o);
        }
        self.replace(next)
    }

    /// Forgets a group; returns whether it had any offsets.
    pub fn remove_group(&mut self, group: &str) -> Result<bool> {
        let mut next = self.offsets.clone();
        next.retain(|(g, _), _| g != group);
        if next.len() == self.offsets.len() {
            return Ok(false);
        }
        self.replace(next)?;
        Ok(true)
    }

    /// Makes `next` durable, and only then current, so a failed write leaves
    /// memory and disk agreeing on the old contents.
    fn replace(&mut self, next: BTreeMap<(String, u32), u64>) -> Result<()> {
        let body = encode_body(&next)?;
        let sequence = self.sequence + 1;
        let needed = SLOT_HEADER + body.len() + 4;
        match &self.file {
            Some(file) if needed <= self.slot_size => {
                let slot = slot(&body, sequence, self.slot_size);
                let at = (sequence % 2) * self.slot_size as u64;
                file.write_all_at(&slot, at)
                    .and_then(|()| file.sync_data())
                    .map_err(io_err("write", &self.path))?;
            }
            _ => {
                // No file yet, the old format, or too small: a new file, whole.
                let mut slot_size = self.slot_size.max(MIN_SLOT);
                while slot_size < needed {
                    slot_size *= 2;
                }
                let mut bytes = vec![0u8; 2 * slot_size];
                let at = (sequence % 2) as usize * slot_size;
                bytes[at..at + slot_size].copy_from_slice(&slot(&body, sequence, slot_size));
                let tmp = tmp_path(&self.path);
                let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
                f.write_all(&bytes).map_err(io_err("write", &tmp))?;
                f.sync_all().map_err(io_err("fsync", &tmp))?;
                drop(f);
                fs::rename(&tmp, &self.path).map_err(io_err("rename", &tmp))?;
                let dir = match self.path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                sync_dir(dir)?;
                let file = File::options()
                    .read(true)
                    .write(true)
                    .open(&self.path)
                    .map_err(io_err("open", &self.path))?;
                self.file = Some(file);
                self.slot_size = slot_size;
            }
        }
        self.sequence = sequence;
        self.offsets = next;
        Ok(())
    }
}

/// `(group, partition) -> offset`.
type Offsets = BTreeMap<(String, u32), u64>;

/// One slot: magic, u64 sequence, u32 slot size, u32 body length, the body,
/// CRC-32C of all of that, then zeros to the slot's size.
fn slot(body: &[u8], sequence: u64, slot_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(slot_size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&(slot_size as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.resize(slot_size, 0);
    out
}

/// The newest valid slot of a slot-format file: slot size, sequence, offsets.
fn decode_slots(bytes: &[u8]) -> Result<(usize, u64, Offsets), &'static str> {
    let half = bytes.len() / 2;
    if bytes.len() < 2 * MIN_SLOT || !bytes.len().is_multiple_of(2) {
        return Err("file too short or of odd length");
    }
    let mut best: Option<(u64, Offsets)> = None;
    let mut reason = "no valid slot";
    for s in [&bytes[..half], &bytes[half..]] {
        match decode_slot(s, half) {
            Ok((seq, map)) if best.as_ref().is_none_or(|(b, _)| seq > *b) => {
                best = Some((seq, map))
            }
            Ok(_) => {}
            // A slot never written yet is all zeros; anything else is a torn write
            // (or damage): the other slot holds the contents before it.
            Err(r) if s.iter().any(|&b| b != 0) => {
                tracing::warn!(
                    reason = r,
                    "an offsets slot is unreadable; using the other one"
                );
                reason = r;
            }
            Err(_) => {}
        }
    }
    let (seq, map) = best.ok_or(reason)?;
    Ok((half, seq, map))
}

fn decode_slot(s: &[u8], slot_size: usize) -> Result<(u64, Offsets), &'static str> {
    let mut r = Take(s);
    if r.bytes(8)? != MAGIC.as_slice() {
        return Err("bad magic");
    }
    let seq = r.u64()?;
    if r.u32()? as usize != slot_size {
        return Err("slot size does not match the file");
    }
    let len = r.u32()? as usize;
    if SLOT_HEADER + len + 4 > slot_size {
        return Err("body length out of range");
    }
    let body = r.bytes(len)?;
    let crc = r.u32()?;
    if crc32c::crc32c(&s[..SLOT_HEADER + len]) != crc {
        return Err("checksum mismatch");
    }
    Ok((seq, decode_body(body)?))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The offsets (little-endian): u32 entry count, then per entry u32 group length,
/// group UTF-8 bytes, u32 partition, u64 offset. (The first format was magic
/// `SHOFFS01`, this, then CRC-32C of everything before it.)
fn encode_body(map: &BTreeMap<(String, u32), u64>) -> Result<Vec<u8>> {
    let too_big = |_| Error::InvalidArgument("offset store entry or count exceeds u32".into());
    let mut out = Vec::new();
    let count = u32::try_from(map.len()).map_err(too_big)?;
    out.extend_from_slice(&count.to_le_bytes());
    for ((group, partition), offset) in map {
        let len = u32::try_from(group.len()).map_err(too_big)?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(group.as_bytes());
        out.extend_from_slice(&partition.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    Ok(out)
}

struct Take<'a>(&'a [u8]);

impl<'a> Take<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated entry");
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.bytes(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

fn decode_v1(bytes: &[u8]) -> Result<BTreeMap<(String, u32), u64>, &'static str> {
    let body_len = bytes.len().checked_sub(4).ok_or("file too short")?;
    let (body, crc) = bytes.split_at(body_len);
    let mut c = [0u8; 4];
    c.copy_from_slice(crc);
    if crc32c::crc32c(body) != u32::from_le_bytes(c) {
        return Err("checksum mismatch");
    }
    decode_body(body.strip_prefix(MAGIC_V1.as_slice()).ok_or("bad magic")?)
}

fn decode_body(body: &[u8]) -> Result<BTreeMap<(String, u32), u64>, &'static str> {
    let mut r = Take(body);
    let count = r.u32()?;
    let mut map = BTreeMap::new();
    for _ in 0..count {
        let len = r.u32()? as usize;
        let group = std::str::from_utf8(r.bytes(len)?).map_err(|_| "group name is not UTF-8")?;
        let partition = r.u32()?;
        map.insert((group.to_owned(), partition), r.u64()?);
    }
    if !r.0.is_empty() {
        return Err("trailing bytes");
    }
    Ok(map)
}

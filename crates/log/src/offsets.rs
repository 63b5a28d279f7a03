//! Persisted consumer-group offsets.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{io_err, Error, Result};
use crate::util::sync_dir;

const MAGIC: &[u8; 8] = b"SHOFFS01";

/// Committed consumer offsets, `(group, partition) -> next offset to read`,
/// kept in one small file that is replaced atomically on every change.
///
/// Every mutating call is durable when it returns (temp file, fsync, rename,
/// fsync of the directory), so after a crash the file holds either the old or
/// the new contents, never a mix. Calls block on disk I/O; from async code use
/// `spawn_blocking` or a dedicated task.
#[derive(Debug)]
pub struct OffsetStore {
    path: PathBuf,
    offsets: BTreeMap<(String, u32), u64>,
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
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(io_err("read", &path))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(OffsetStore {
                    path,
                    offsets: BTreeMap::new(),
                })
            }
            Err(e) => return Err(Error::io("open", &path, e)),
        }
        let offsets = decode(&bytes).map_err(|reason| Error::CorruptFile {
            path: path.clone(),
            reason,
        })?;
        Ok(OffsetStore { path, offsets })
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

    /// Commits several offsets in one atomic replace.
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
        let bytes = encode(&next)?;
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
        self.offsets = next;
        Ok(())
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Layout (little-endian): magic `SHOFFS01`, u32 entry count, then per entry
/// u32 group length, group UTF-8 bytes, u32 partition, u64 offset; finally
/// CRC-32C of everything before it.
fn encode(map: &BTreeMap<(String, u32), u64>) -> Result<Vec<u8>> {
    let too_big = |_| Error::InvalidArgument("offset store entry or count exceeds u32".into());
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    let count = u32::try_from(map.len()).map_err(too_big)?;
    out.extend_from_slice(&count.to_le_bytes());
    for ((group, partition), offset) in map {
        let len = u32::try_from(group.len()).map_err(too_big)?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(group.as_bytes());
        out.extend_from_slice(&partition.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
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

fn decode(bytes: &[u8]) -> Result<BTreeMap<(String, u32), u64>, &'static str> {
    let body_len = bytes.len().checked_sub(4).ok_or("file too short")?;
    let (body, crc) = bytes.split_at(body_len);
    let mut c = [0u8; 4];
    c.copy_from_slice(crc);
    if crc32c::crc32c(body) != u32::from_le_bytes(c) {
        return Err("checksum mismatch");
    }
    let mut r = Take(body.strip_prefix(MAGIC.as_slice()).ok_or("bad magic")?);
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

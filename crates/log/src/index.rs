//! Sparse offset index files. They are a cache: anything doubtful about one
//! makes the caller rebuild it from the segment.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

pub(crate) const MAGIC: &[u8; 8] = b"SHLIDX01";
pub(crate) const ENTRY_LEN: usize = 28;

/// Where the batch starting at `offset` sits in its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) offset: u64,
    pub(crate) position: u64,
    pub(crate) timestamp: u64,
}

impl IndexEntry {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
        out.extend_from_slice(&self.timestamp.to_le_bytes());
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<IndexEntry> {
        let field = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&b[24..28]);
        (crc32c::crc32c(&b[..24]) == u32::from_le_bytes(crc)).then(|| IndexEntry {
            offset: field(0),
            position: field(1),
            timestamp: field(2),
        })
    }
}

/// Reads an index file. `Ok(None)` means missing or unusable (bad magic, an
/// entry failing its checksum); a partial last entry is just a write that a
/// crash cut short and is ignored.
pub(crate) fn load(path: &Path) -> io::Result<Option<Vec<IndexEntry>>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut bytes)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(body) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Ok(None);
    };
    let mut entries = Vec::with_capacity(body.len() / ENTRY_LEN);
    for chunk in body.chunks_exact(ENTRY_LEN) {
        match IndexEntry::decode(chunk) {
            Some(e) => entries.push(e),
            None => return Ok(None),
        }
    }
    Ok(Some(entries))
}

/// Replaces an index file with `entries`. Not fsynced: a lost or torn index
/// is detected and rebuilt on open.
pub(crate) fn store(path: &Path, entries: &[IndexEntry]) -> io::Result<File> {
    let mut buf = Vec::with_capacity(MAGIC.len() + entries.len() * ENTRY_LEN);
    buf.extend_from_slice(MAGIC);
    for e in entries {
        e.encode(&mut buf);
    }
    let mut f = File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(&buf)?;
    Ok(f)
}

/// The last entry at or before `offset`.
pub(crate) fn lookup(entries: &[IndexEntry], offset: u64) -> Option<IndexEntry> {
    let n = entries.partition_point(|e| e.offset <= offset);
    n.checked_sub(1).map(|i| entries[i])
}

/// The structural rules every index of a segment must follow; a failure
/// means the file belongs to something else or was damaged.
pub(crate) fn well_formed(entries: &[IndexEntry], base: u64, len: u64, next_base: u64) -> bool {
    let Some(first) = entries.first() else {
        return len == 0;
    };
    first.offset == base
        && first.position == 0
        && entries.windows(2).all(|w| {
            w[0].offset < w[1].offset
                && w[0].position < w[1].position
                && w[0].timestamp <= w[1].timestamp
        })
        && entries
            .iter()
            .all(|e| e.position < len && e.offset < next_base)
}

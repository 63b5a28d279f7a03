//! Records and the frame codec (layout documented in the crate docs).

/// Bytes before the checksummed body: body length (u32) + CRC-32C (u32).
pub(crate) const FRAME_HEADER: usize = 8;
/// Version byte of the body layout written by this crate.
pub(crate) const FORMAT_VERSION: u8 = 1;
/// Flag bit: this record is the last of its append batch.
pub(crate) const FLAG_BATCH_END: u8 = 0x01;
/// version + flags + offset + timestamp + key length + header count + payload length.
pub(crate) const FIXED_BODY: usize = 1 + 1 + 8 + 8 + 4 + 4 + 4;
/// The smallest possible frame: no key, no headers, empty payload.
pub const MIN_FRAME_BYTES: usize = FRAME_HEADER + FIXED_BODY;
/// Hard format limit on one frame, independent of configuration, so a log
/// written with a larger `max_record_bytes` stays readable under a smaller one.
pub const MAX_FRAME_BYTES: usize = 1 << 30;
/// Key length value meaning "no key" (distinct from an empty key).
const NO_KEY: u32 = u32::MAX;

/// Byte offsets of the fields the writer patches in place.
const OFFSET_AT: usize = FRAME_HEADER + 2;
const TIMESTAMP_AT: usize = OFFSET_AT + 8;

/// A record handed to [`Log::append`](crate::Log::append). The log assigns
/// its offset and timestamp.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Optional key (`None` and an empty key are different).
    pub key: Option<Vec<u8>>,
    /// Application headers, in order; names may repeat.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The message body.
    pub payload: Vec<u8>,
}

impl Record {
    /// A record with only a payload.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Record {
            key: None,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Size of this record's frame on disk, which is what the limits count.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self.key.as_deref(), &self.headers, &self.payload)
    }
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Position in the partition, assigned at append, dense and increasing.
    pub offset: u64,
    /// Unix milliseconds assigned at append; never decreases along the log.
    pub timestamp_ms: u64,
    /// Optional key.
    pub key: Option<Vec<u8>>,
    /// Application headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The message body.
    pub payload: Vec<u8>,
}

impl StoredRecord {
    /// Size of this record's frame on disk.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self.key.as_deref(), &self.headers, &self.payload)
    }

    /// The record without its log-assigned fields, e.g. to re-append elsewhere.
    pub fn into_record(self) -> Record {
        Record {
            key: self.key,
            headers: self.headers,
            payload: self.payload,
        }
    }
}

fn encoded_len<N: AsRef<str>, V: AsRef<[u8]>>(
    key: Option<&[u8]>,
    headers: &[(N, V)],
    payload: &[u8],
) -> usize {
    let headers: usize = headers
        .iter()
        .map(|(n, v)| {
            8usize
                .saturating_add(n.as_ref().len())
                .saturating_add(v.as_ref().len())
        })
        .fold(0usize, usize::saturating_add);
    (FRAME_HEADER + FIXED_BODY)
        .saturating_add(key.map_or(0, <[u8]>::len))
        .saturating_add(headers)
        .saturating_add(payload.len())
}

/// Length prefixes are u32; callers only encode records already checked
/// against `MAX_FRAME_BYTES` (1 GiB), so every length fits.
fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

/// Appends one frame with offset, timestamp and checksum left as zero; the
/// writer thread fills them in with [`seal_batch`] once it assigns offsets.
/// The caller must have checked `record.encoded_len() <= MAX_FRAME_BYTES`.
pub(crate) fn encode_unsealed(out: &mut Vec<u8>, record: &Record, batch_end: bool) {
    let start = out.len();
    put_len(out, record.encoded_len() - FRAME_HEADER);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(FORMAT_VERSION);
    out.push(if batch_end { FLAG_BATCH_END } else { 0 });
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    match &record.key {
        Some(k) => {
            put_len(out, k.len());
            out.extend_from_slice(k);
        }
        None => out.extend_from_slice(&NO_KEY.to_le_bytes()),
    }
    put_len(out, record.headers.len());
    for (name, value) in &record.headers {
        put_len(out, name.len());
        out.extend_from_slice(name.as_bytes());
        put_len(out, value.len());
        out.extend_from_slice(value);
    }
    put_len(out, record.payload.len());
    out.extend_from_slice(&record.payload);
    debug_assert_eq!(out.len() - start, record.encoded_len());
}

/// Stamps consecutive offsets from `first_offset` and `timestamp` into a
/// buffer of frames built by [`encode_unsealed`] and computes their checksums.
/// Returns the number of frames.
pub(crate) fn seal_batch(frames: &mut [u8], first_offset: u64, timestamp: u64) -> u64 {
    let mut pos = 0;
    let mut offset = first_offset;
    while pos + FRAME_HEADER <= frames.len() {
        let body_len = read_u32(&frames[pos..]) as usize;
        let end = pos + FRAME_HEADER + body_len;
        let frame = &mut frames[pos..end];
        frame[OFFSET_AT..OFFSET_AT + 8].copy_from_slice(&offset.to_le_bytes());
        frame[TIMESTAMP_AT..TIMESTAMP_AT + 8].copy_from_slice(&timestamp.to_le_bytes());
        let crc = crc32c::crc32c(&frame[FRAME_HEADER..]);
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
        offset += 1;
        pos = end;
    }
    offset - first_offset
}

fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The fields a scan can check before paying for a checksum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prefix {
    pub(crate) body_len: usize,
    pub(crate) version: u8,
    pub(crate) flags: u8,
    pub(crate) offset: u64,
}

/// Bytes needed by [`prefix`].
pub(crate) const PREFIX_LEN: usize = OFFSET_AT + 8;

pub(crate) fn prefix(b: &[u8]) -> Option<Prefix> {
    if b.len() < PREFIX_LEN {
        return None;
    }
    Some(Prefix {
        body_len: read_u32(b) as usize,
        version: b[FRAME_HEADER],
        flags: b[FRAME_HEADER + 1],
        offset: read_u64(&b[OFFSET_AT..]),
    })
}

/// Whether a body length can belong to a frame at all.
pub(crate) fn plausible_body_len(body_len: usize) -> bool {
    (FIXED_BODY..=MAX_FRAME_BYTES - FRAME_HEADER).contains(&body_len)
}

/// A decoded frame borrowing the read buffer.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    /// Total frame length including the 8-byte header.
    pub(crate) len: usize,
    pub(crate) flags: u8,
    pub(crate) offset: u64,
    pub(crate) timestamp: u64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) headers: Vec<(&'a str, &'a [u8])>,
    pub(crate) payload: &'a [u8],
}

impl Frame<'_> {
    pub(crate) fn batch_end(&self) -> bool {
        self.flags & FLAG_BATCH_END != 0
    }

    pub(crate) fn to_record(&self) -> StoredRecord {
        StoredRecord {
            offset: self.offset,
            timestamp_ms: self.timestamp,
            key: self.key.map(<[u8]>::to_vec),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.to_vec()))
                .collect(),
            payload: self.payload.to_vec(),
        }
    }
}

/// Outcome of decoding bytes that should start with a frame.
#[derive(Debug)]
pub(crate) enum Parsed<'a> {
    /// The buffer ends before the frame does.
    Incomplete,
    /// Length out of range or checksum mismatch: what a torn write looks like.
    Invalid(&'static str),
    /// The checksum matches but the content breaks the format: never a torn
    /// write, so never silently dropped.
    Malformed(&'static str),
    /// A good frame.
    Frame(Frame<'a>),
}

/// Decodes the frame at the start of `buf` and verifies its checksum.
pub(crate) fn parse_frame(buf: &[u8]) -> Parsed<'_> {
    if buf.len() < FRAME_HEADER {
        return Parsed::Incomplete;
    }
    let body_len = read_u32(buf) as usize;
    if !plausible_body_len(body_len) {
        return Parsed::Invalid("frame length out of range");
    }
    let Some(frame) = buf.get(..FRAME_HEADER + body_len) else {
        return Parsed::Incomplete;
    };
    let body = &frame[FRAME_HEADER..];
    if crc32c::crc32c(body) != read_u32(&frame[4..]) {
        return Parsed::Invalid("checksum mismatch");
    }
    match decode_body(body) {
        Ok(mut f) => {
            f.len = frame.len();
            Parsed::Frame(f)
        }
        Err(reason) => Parsed::Malformed(reason),
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.b.len() < n {
            return Err("field runs past the end of the frame");
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        self.take(4).map(read_u32)
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        self.take(8).map(read_u64)
    }
    fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

fn decode_body(body: &[u8]) -> Result<Frame<'_>, &'static str> {
    let mut r = Reader { b: body };
    if r.u8()? != FORMAT_VERSION {
        return Err("unknown format version");
    }
    let flags = r.u8()?;
    if flags & !FLAG_BATCH_END != 0 {
        return Err("reserved flag bits set");
    }
    let offset = r.u64()?;
    let timestamp = r.u64()?;
    let key = match r.u32()? {
        NO_KEY => None,
        n => Some(r.take(n as usize)?),
    };
    let count = r.u32()? as usize;
    // Each header needs at least 8 bytes, which bounds the allocation by the
    // frame size rather than by a count field.
    if count > r.b.len() / 8 {
        return Err("header count larger than the frame");
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = std::str::from_utf8(r.bytes()?).map_err(|_| "header name is not UTF-8")?;
        headers.push((name, r.bytes()?));
    }
    let payload = r.bytes()?;
    if !r.b.is_empty() {
        return Err("trailing bytes after payload");
    }
    Ok(Frame {
        len: 0,
        flags,
        offset,
        timestamp,
        key,
        headers,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_layout() {
        let rec = Record::new(b"hello".to_vec())
            .with_key(b"k".to_vec())
            .with_header("h", b"v".to_vec());
        let mut buf = Vec::new();
        encode_unsealed(&mut buf, &rec, true);
        assert_eq!(buf.len(), rec.encoded_len());
        assert_eq!(seal_batch(&mut buf, 7, 1234), 1);
        // length field counts everything after the 8-byte header
        assert_eq!(read_u32(&buf) as usize, buf.len() - 8);
        assert_eq!(buf[8], FORMAT_VERSION);
        assert_eq!(read_u64(&buf[10..]), 7);
        assert_eq!(read_u64(&buf[18..]), 1234);
        let Parsed::Frame(f) = parse_frame(&buf) else {
            panic!("not a frame")
        };
        assert!(f.batch_end());
        let back = f.to_record();
        assert_eq!((back.offset, back.timestamp_ms), (7, 1234));
        assert_eq!(back.into_record(), rec);

        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(
                !matches!(parse_frame(&bad), Parsed::Frame(_)),
                "flip at {i} undetected"
            );
        }
        assert!(matches!(
            parse_frame(&buf[..buf.len() - 1]),
            Parsed::Incomplete
        ));
    }

    #[test]
    fn empty_key_differs_from_no_key() {
        for key in [None, Some(Vec::new())] {
            let rec = Record {
                key: key.clone(),
                ..Record::default()
            };
            let mut buf = Vec::new();
            encode_unsealed(&mut buf, &rec, true);
            seal_batch(&mut buf, 0, 0);
            let Parsed::Frame(f) = parse_frame(&buf) else {
                panic!("not a frame")
            };
            assert_eq!(f.to_record().key, key);
        }
    }
}

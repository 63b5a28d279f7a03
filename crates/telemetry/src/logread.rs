//! Reading the log store of `shoal up` (`<state_dir>/logs/`, written by the
//! supervisor): every process's files, merged in time order and filtered. One
//! implementation for `shoal logs` and the control plane's `GET /v1/logs` (the
//! dashboard's log search).
//!
//! Each process's files (`<name>.log.<n>` … `<name>.log.1`, `<name>.log`, oldest
//! first) are one [`Stream`] in time order; streams are [`merge`]d by each line's
//! `ts`. Lines are read one at a time, so a large store costs time, not memory (only
//! [`tail`] keeps lines back: the last N). A line that is not JSON (a panic message,
//! a crash before logging started) takes the time of the line before it in its
//! stream, and only a [`Filter`] it cannot match hides it.

use serde_json::{Map, Value};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Longest line read whole; a longer one is returned in pieces.
pub const MAX_LINE_BYTES: u64 = 256 * 1024;

/// A log level's rank, lowest first (`trace` 0 … `error` 4); `None` for a name that
/// is not one.
pub fn level_rank(level: &str) -> Option<u8> {
    match level.to_ascii_lowercase().as_str() {
        "trace" => Some(0),
        "debug" => Some(1),
        "info" => Some(2),
        "warn" | "warning" => Some(3),
        "error" => Some(4),
        _ => None,
    }
}

/// RFC 3339 (`2026-11-23T14:29:18.123Z`, `…+02:00`) as milliseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        // Milliseconds: the first three digits, padded.
        let frac = &s[start..i.min(start + 3)];
        ms = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match s.get(i..)? {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let oh: i64 = o[1..3].parse().ok()?;
            let om: i64 = o[4..6].parse().ok()?;
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
        _ => return None,
    };
    // Days since the epoch from a civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + ms).ok()
}

/// A time to read from: RFC 3339, or a time ago (`500ms`, `90s`, `10m`, `2h`, `1d`)
/// from `now_ms`. The error says what is accepted (the caller names the flag or
/// parameter).
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64, String> {
    let s = s.trim();
    if let Some(at) = parse_rfc3339(s) {
        return Ok(at);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => 0,
    };
    match (number.parse::<u64>(), factor) {
        (Ok(n), f) if f > 0 => Ok(now_ms.saturating_sub(n.saturating_mul(f))),
        _ => Err(format!(
            "{s:?}: give RFC 3339 (2026-11-23T14:29:18Z) or a time ago (90s, 10m, 2h, 1d)"
        )),
    }
}

/// One line of a stream.
#[derive(Clone, Debug)]
pub struct Record {
    /// Its time (of the line before it, when it has none), for ordering.
    ts_ms: u64,
    /// The process it came from (the file's name: `catalog-1`).
    process: String,
    raw: String,
    /// The line, when it is a JSON object.
    json: Option<Map<String, Value>>,
}

impl Record {
    /// Parse `raw`; `last_ts` is the time of the stream's previous line.
    pub fn parse(raw: String, process: &str, last_ts: u64) -> Self {
        let json = match serde_json::from_str::<Value>(&raw) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        };
        let ts_ms = json
            .as_ref()
            .and_then(|m| m.get("ts"))
            .and_then(Value::as_str)
            .and_then(parse_rfc3339)
            .unwrap_or(last_ts);
        Self {
            ts_ms,
            process: process.to_string(),
            raw,
            json,
        }
    }

    /// Its time in milliseconds since the epoch (for a line that is not JSON, the
    /// time of the line before it in its stream).
    pub fn ts_ms(&self) -> u64 {
        self.ts_ms
    }

    /// The process it came from (`catalog-1`, `gateway`).
    pub fn process(&self) -> &str {
        &self.process
    }

    /// The line as stored, without its newline.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The line's fields, when it is a JSON object.
    pub fn json(&self) -> Option<&Map<String, Value>> {
        self.json.as_ref()
    }

    /// The compact form: `ts level service/instance message key=value…`, or for a
    /// line that is not JSON, `process | line`.
    pub fn human(&self) -> String {
        let Some(m) = &self.json else {
            return format!("{} | {}", self.process, self.raw);
        };
        let text = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or("-");
        let mut out = format!(
            "{} {:<5} {}/{} {}",
            text("ts"),
            text("level"),
            text("service"),
            text("instance"),
            m.get("message").and_then(Value::as_str).unwrap_or("")
        );
        for (k, v) in m {
            if matches!(
                k.as_str(),
                "ts" | "level" | "service" | "instance" | "message" | "target"
            ) {
                continue;
            }
            let v = match v {
                Value::String(s)
                    if !s.is_empty()
                        && !s.contains(|c: char| c.is_whitespace() || c == '"' || c == '=') =>
                {
                    s.clone()
                }
                other => other.to_string(),
            };
            out.push_str(&format!(" {k}={v}"));
        }
        out
    }
}

/// Which lines to keep: each `Some` narrows, `Default` keeps every line.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Lines at this [`level_rank`] or above (a line without a level is kept).
    pub min_level: Option<u8>,
    /// Lines whose `trace_id` is this.
    pub trace: Option<String>,
    /// Lines at or after this time (milliseconds since the epoch).
    pub since_ms: Option<u64>,
    /// Lines whose message or any field's value contains this (case-sensitive).
    pub grep: Option<String>,
}

impl Filter {
    /// Whether `r` is kept.
    pub fn matches(&self, r: &Record) -> bool {
        if self.since_ms.is_some_and(|since| r.ts_ms < since) {
            return false;
        }
        let Some(m) = &r.json else {
            // Not JSON: no level (so a panic shows under any level) and no trace
            // id; grep looks at the text.
            return self.trace.is_none() && self.grep.as_deref().is_none_or(|g| r.raw.contains(g));
        };
        if let Some(min) = self.min_level {
            let rank = m.get("level").and_then(Value::as_str).and_then(level_rank);
            if rank.is_some_and(|l| l < min) {
                return false;
            }
        }
        if let Some(t) = &self.trace {
            if m.get("trace_id").and_then(Value::as_str) != Some(t.as_str()) {
                return false;
            }
        }
        if let Some(g) = &self.grep {
            let hit = m.values().any(|v| match v {
                Value::String(s) => s.contains(g.as_str()),
                other => other.to_string().contains(g.as_str()),
            });
            if !hit {
                return false;
            }
        }
        true
    }
}

/// One process's files, read as one stream.
#[derive(Debug)]
pub struct Stream {
    process: String,
    live: PathBuf,
    /// Files not opened yet, oldest first.
    queue: VecDeque<PathBuf>,
    reader: Option<BufReader<File>>,
    reading_live: bool,
    /// A line read up to the end of the file without its newline yet.
    pending: Vec<u8>,
    last_ts: u64,
}

impl Stream {
    /// The stream of `process`, whose live file is `live`, reading `files` (oldest
    /// first; the live file last) from their start.
    pub fn new(process: String, live: PathBuf, files: Vec<PathBuf>) -> Self {
        Self {
            process,
            live,
            queue: files.into(),
            reader: None,
            reading_live: false,
            pending: Vec::new(),
            last_ts: 0,
        }
    }

    /// The process whose files these are.
    pub fn process(&self) -> &str {
        &self.process
    }

    /// The next whole line, or `None` at the end of what is written now. `ended`:
    /// no more is coming (not following), so a last line without a newline counts.
    pub fn next_line(&mut self, ended: bool) -> Option<Record> {
        loop {
            if self.reader.is_none() {
                let path = self.queue.pop_front()?;
                // A file rotated away or pruned since it was listed is skipped.
                let Ok(f) = File::open(&path) else { continue };
                self.reading_live = path == self.live;
                self.reader = Some(BufReader::new(f));
            }
            let reader = self.reader.as_mut()?;
            let before = self.pending.len();
            let room = MAX_LINE_BYTES.saturating_sub(before as u64).max(1);
            let read = reader
                .by_ref()
                .take(room)
                .read_until(b'\n', &mut self.pending);
            match read {
                Ok(_)
                    if self.pending.ends_with(b"\n")
                        || self.pending.len() as u64 >= MAX_LINE_BYTES =>
                {
                    return Some(self.take_pending());
                }
                Ok(0) | Ok(_) => {
                    // The end of this file for now.
                    if self.reading_live && self.queue.is_empty() {
                        if ended && !self.pending.is_empty() {
                            return Some(self.take_pending());
                        }
                        return None;
                    }
                    // A rotated file is complete: its last line, newline or not.
                    self.reader = None;
                    if !self.pending.is_empty() {
                        return Some(self.take_pending());
                    }
                }
                Err(_) => {
                    self.reader = None;
                    self.pending.clear();
                }
            }
        }
    }

    fn take_pending(&mut self) -> Record {
        let mut line = std::mem::take(&mut self.pending);
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        let r = Record::parse(
            String::from_utf8_lossy(&line).into_owned(),
            &self.process,
            self.last_ts,
        );
        self.last_ts = r.ts_ms;
        r
    }

    /// When following: notice the live file being rotated (renamed away, a new one
    /// in its place) or cut, and read on from the new one.
    pub fn check_rotation(&mut self) {
        let Ok(now) = std::fs::metadata(&self.live) else {
            return;
        };
        match self.reader.as_mut() {
            Some(r) if self.reading_live => {
                let ino = r.get_ref().metadata().map(|m| m.ino()).unwrap_or(0);
                if ino != now.ino() {
                    // Finish the old file (now `.log.1`) first, then the new one.
                    self.reading_live = false;
                    self.queue.push_back(self.live.clone());
                } else if r.stream_position().is_ok_and(|pos| now.len() < pos) {
                    self.reader = None;
                    self.pending.clear();
                    self.queue.push_back(self.live.clone());
                }
            }
            None if self.queue.is_empty() => self.queue.push_back(self.live.clone()),
            _ => {}
        }
    }
}

/// Whether `process`'s files belong to `service`: the process of that name
/// (`gateway`, `control-plane`), or a replica (`<entry>-<n>`, the file names
/// `shoal up` gives) of the service itself or of one of `entries`, the system
/// file's entries that register as it (every version).
pub fn selected(process: &str, service: &str, entries: &[String]) -> bool {
    let replica_of = |entry: &str| {
        process
            .strip_prefix(entry)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    process == service || replica_of(service) || entries.iter().any(|e| replica_of(e))
}

/// One process's log files: its name, its live file and every file that exists,
/// oldest first.
pub type ProcessFiles = (String, PathBuf, Vec<PathBuf>);

/// The log files in `dir`, one group per process (`catalog-1`), by name.
pub fn process_files(dir: &Path) -> std::io::Result<Vec<ProcessFiles>> {
    let mut groups: BTreeMap<String, Vec<(usize, PathBuf)>> = BTreeMap::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let (process, n) = match name.rsplit_once(".log") {
            Some((p, "")) => (p.to_string(), 0),
            Some((p, rest)) => match rest.strip_prefix('.').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => (p.to_string(), n),
                None => continue,
            },
            None => continue,
        };
        if process.is_empty() {
            continue;
        }
        groups.entry(process).or_default().push((n, e.path()));
    }
    Ok(groups
        .into_iter()
        .map(|(process, mut files)| {
            // Highest number is oldest; the live file (0) is newest.
            files.sort_by_key(|(n, _)| Reverse(*n));
            let live = dir.join(format!("{process}.log"));
            (process, live, files.into_iter().map(|(_, p)| p).collect())
        })
        .collect())
}

/// The streams of the processes in `dir` that `wanted` selects, by name.
pub fn streams(dir: &Path, wanted: impl Fn(&str) -> bool) -> std::io::Result<Vec<Stream>> {
    Ok(process_files(dir)?
        .into_iter()
        .filter(|(p, _, _)| wanted(p))
        .map(|(p, live, files)| Stream::new(p, live, files))
        .collect())
}

/// Merge the streams' lines in time order until each is at its end for now, calling
/// `out` with each. Ties keep the order of the streams.
pub fn merge(streams: &mut [Stream], ended: bool, mut out: impl FnMut(Record)) {
    let mut heads: Vec<Option<Record>> = streams.iter_mut().map(|s| s.next_line(ended)).collect();
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = heads
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_ref().map(|r| Reverse((r.ts_ms, i))))
        .collect();
    while let Some(Reverse((_, i))) = heap.pop() {
        if let Some(r) = heads[i].take() {
            out(r);
        }
        heads[i] = streams[i].next_line(ended);
        if let Some(r) = &heads[i] {
            heap.push(Reverse((r.ts_ms, i)));
        }
    }
}

/// What [`tail`] found.
#[derive(Debug, Default)]
pub struct Tail {
    /// The last lines that matched, oldest first.
    pub records: VecDeque<Record>,
    /// Lines that matched before those (dropped by the limit).
    pub earlier: u64,
    /// Lines that are not JSON (panics, early errors) the filter hid: they are
    /// never dropped silently, so callers say how many.
    pub hidden_text: u64,
}

/// Merge `streams` to their end for now and keep the last `limit` lines `filter`
/// keeps.
pub fn tail(streams: &mut [Stream], filter: &Filter, ended: bool, limit: usize) -> Tail {
    let mut t = Tail::default();
    merge(streams, ended, |r| {
        if !filter.matches(&r) {
            if r.json.is_none() {
                t.hidden_text += 1;
            }
            return;
        }
        if t.records.len() == limit {
            t.records.pop_front();
            t.earlier += 1;
        }
        if limit > 0 {
            t.records.push_back(r);
        } else {
            t.earlier += 1;
        }
    });
    t
}

#[cfg(test)]
mod tests;

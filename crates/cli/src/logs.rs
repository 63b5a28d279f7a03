//! `shoal logs`: the log store of `shoal up` (`<state_dir>/logs/`), merged, filtered
//! and printed.
//!
//! Each process's files (`<name>.log.<n>` … `<name>.log.1`, `<name>.log`, oldest
//! first) are one stream in time order; the streams are merged by each line's `ts`.
//! Lines are read one at a time, so a large store costs time, not memory (only
//! `--limit` keeps lines back: the last N). A line that is not JSON (a panic message,
//! a crash before logging started) takes the time of the line before it in its
//! stream, is shown as it is, and is only hidden by a filter it cannot match; how
//! many were hidden is said on stderr.

use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{Map, Value};
use shoal_core::Error;
use shoal_supervisor::SystemFile;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest line read whole; a longer one is shown in pieces.
const MAX_LINE_BYTES: u64 = 256 * 1024;
/// How often `--follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Most bytes `--follow` reads from one stream per poll, so one chatty process
/// cannot hold the others' lines back for long.
const FOLLOW_BYTES_PER_POLL: usize = 4 * 1024 * 1024;
/// Largest `--limit`.
const MAX_LIMIT: u64 = 1_000_000;

/// The `logs` subcommand.
pub(crate) fn command(system: Arg) -> Command {
    Command::new("logs")
        .about("Show the logs of `shoal up`'s processes, merged in time order and filtered")
        .long_about(
            "Show the logs `shoal up` keeps in <state_dir>/logs/ (rotated files \
             included), merged in time order. Without SERVICE, every process's; with it, \
             the processes of that service (every replica and version; `gateway` and \
             `control-plane` for those). Lines print as `ts level service/instance \
             message key=value…`; a line that is not JSON (a panic) prints as it is, \
             after its process's name.",
        )
        .arg(system)
        .arg(
            Arg::new("service")
                .value_name("SERVICE")
                .help("Only this service's processes"),
        )
        .arg(
            Arg::new("level")
                .long("level")
                .value_name("LEVEL")
                .value_parser(|s: &str| {
                    level_rank(s)
                        .map(|_| s.to_string())
                        .ok_or_else(|| "one of trace, debug, info, warn, error".to_string())
                })
                .help("Only lines at this level or above (trace, debug, info, warn, error)"),
        )
        .arg(
            Arg::new("trace")
                .long("trace")
                .value_name("ID")
                .help("Only lines of this trace (their `trace_id`)"),
        )
        .arg(Arg::new("since").long("since").value_name("TIME").help(
            "Only lines since TIME: RFC 3339 (2026-11-23T14:29:18Z) or ago (90s, 10m, 2h, 1d)",
        ))
        .arg(
            Arg::new("grep")
                .long("grep")
                .value_name("TEXT")
                .help("Only lines whose message or any field contains TEXT"),
        )
        .arg(
            Arg::new("follow")
                .long("follow")
                .short('f')
                .action(ArgAction::SetTrue)
                .help("Keep printing new lines as they are written, until Ctrl-C"),
        )
        .arg(
            Arg::new("limit")
                .long("limit")
                .short('n')
                .value_name("N")
                .value_parser(clap::value_parser!(u64).range(1..=MAX_LIMIT))
                .help("Only the last N matching lines (before following)"),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .help("Print the lines as they are stored (JSON), not the compact form"),
        )
}

/// A log level's rank, lowest first; `None` for a name that is not one.
fn level_rank(level: &str) -> Option<u8> {
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
pub(crate) fn parse_rfc3339(s: &str) -> Option<u64> {
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

/// `--since`: RFC 3339, or a time ago (`500ms`, `90s`, `10m`, `2h`, `1d`) from `now_ms`.
pub(crate) fn parse_since(s: &str, now_ms: u64) -> Result<u64, String> {
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
            "--since {s:?}: give RFC 3339 (2026-11-23T14:29:18Z) or a time ago (90s, 10m, 2h, 1d)"
        )),
    }
}

/// One line of a stream.
#[derive(Debug)]
pub(crate) struct Record {
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
    pub(crate) fn parse(raw: String, process: &str, last_ts: u64) -> Self {
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

    /// The compact form: `ts level service/instance message key=value…`, or for a
    /// line that is not JSON, `process | line`.
    pub(crate) fn human(&self) -> String {
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

/// What `--level`, `--trace`, `--since` and `--grep` ask for.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    min_level: Option<u8>,
    trace: Option<String>,
    since_ms: Option<u64>,
    grep: Option<String>,
}

impl Filter {
    /// Whether `r` is shown.
    pub(crate) fn matches(&self, r: &Record) -> bool {
        if self.since_ms.is_some_and(|since| r.ts_ms < since) {
            return false;
        }
        let Some(m) = &r.json else {
            // Not JSON: no level (so a panic shows under any --level) and no trace
            // id; --grep looks at the text.
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
struct Stream {
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
    fn new(process: String, live: PathBuf, files: Vec<PathBuf>) -> Self {
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

    /// The next whole line, or `None` at the end of what is written now. `ended`:
    /// no more is coming (not following), so a last line without a newline counts.
    fn next_line(&mut self, ended: bool) -> Option<Record> {
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

    /// `--follow`: notice the live file being rotated (renamed away, a new one in
    /// its place) or cut, and read on from the new one.
    fn check_rotation(&mut self) {
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

/// Which processes' files `shoal logs SERVICE` reads: the entries of the system file
/// that register as SERVICE (every version), by the file names `shoal up` gives them.
pub(crate) fn selected(process: &str, service: &str, entries: &[String]) -> bool {
    let replica_of = |entry: &str| {
        process
            .strip_prefix(entry)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    process == service || replica_of(service) || entries.iter().any(|e| replica_of(e))
}

/// The log files in `dir`, one group per process (`catalog-1`), oldest file first.
pub(crate) fn process_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf, Vec<PathBuf>)>> {
    let mut groups: std::collections::BTreeMap<String, Vec<(usize, PathBuf)>> = Default::default();
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

/// Merge the streams' lines in time order until each is at its end for now, calling
/// `out` with each. Ties keep the order of the streams.
fn merge(streams: &mut [Stream], ended: bool, mut out: impl FnMut(Record)) {
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

/// The folder of the log store, from the system file (`state_dir`), as `up` makes it.
fn log_dir(system: &Path, sys: Option<&SystemFile>) -> PathBuf {
    let root = system
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let state_dir = sys
        .map(|s| s.supervisor.state_dir.clone())
        .unwrap_or_else(|| ".shoal".into());
    root.join(state_dir).join("logs")
}

/// Prints records and counts the lines that were not JSON and hidden by a filter.
struct Printer {
    filter: Filter,
    json: bool,
    hidden_text: u64,
}

impl Printer {
    fn line(&mut self, r: &Record) -> Option<String> {
        if !self.filter.matches(r) {
            if r.json.is_none() {
                self.hidden_text += 1;
            }
            return None;
        }
        Some(if self.json { r.raw.clone() } else { r.human() })
    }

    fn note(&self) {
        if self.hidden_text > 0 {
            eprintln!(
                "shoal: {} line(s) that are not JSON (panics, early errors) did not match the filters and were not shown",
                self.hidden_text
            );
        }
    }
}

/// Run `shoal logs`.
pub(crate) async fn run(m: &ArgMatches) -> Result<(), Error> {
    let system = PathBuf::from(
        m.get_one::<String>("system")
            .map(String::as_str)
            .unwrap_or("shoal.toml"),
    );
    let sys = SystemFile::load(&system).ok();
    let dir = log_dir(&system, sys.as_ref());
    let service = m.get_one::<String>("service").cloned();
    let entries: Vec<String> = match (&sys, &service) {
        (Some(sys), Some(s)) => sys
            .services
            .iter()
            .filter(|(k, spec)| spec.registers_as(k) == s.as_str())
            .map(|(k, _)| k.clone())
            .collect(),
        _ => Vec::new(),
    };
    let filter = Filter {
        min_level: m.get_one::<String>("level").and_then(|l| level_rank(l)),
        trace: m.get_one::<String>("trace").cloned(),
        since_ms: m
            .get_one::<String>("since")
            .map(|s| parse_since(s, shoal_core::unix_ms()))
            .transpose()
            .map_err(Error::config)?,
        grep: m.get_one::<String>("grep").cloned(),
    };
    let follow = m.get_flag("follow");
    let limit = m.get_one::<u64>("limit").map(|n| *n as usize);
    let mut printer = Printer {
        filter,
        json: m.get_flag("json"),
        hidden_text: 0,
    };
    let wanted = |process: &str| {
        service
            .as_deref()
            .is_none_or(|s| selected(process, s, &entries))
    };
    let list = || -> Result<Vec<(String, PathBuf, Vec<PathBuf>)>, Error> {
        Ok(process_files(&dir)
            .map_err(|e| {
                Error::config(format!(
                    "no logs in {} (has `shoal up` run here?)",
                    dir.display()
                ))
                .with_source(e)
            })?
            .into_iter()
            .filter(|(p, _, _)| wanted(p))
            .collect())
    };
    let mut streams: Vec<Stream> = list()?
        .into_iter()
        .map(|(p, live, files)| Stream::new(p, live, files))
        .collect();
    if streams.is_empty() && !follow {
        let what = service.as_deref().unwrap_or("any process");
        return Err(Error::config(format!(
            "no log files of {what} in {}",
            dir.display()
        )));
    }

    let mut tail: VecDeque<String> = VecDeque::new();
    merge(&mut streams, !follow, |r| {
        if let Some(line) = printer.line(&r) {
            match limit {
                Some(n) => {
                    if tail.len() == n {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                None => println!("{line}"),
            }
        }
    });
    for line in tail {
        println!("{line}");
    }
    if !follow {
        printer.note();
        return Ok(());
    }

    let stop = shoal_core::shutdown::signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        // Processes started since (a new replica) join the merge.
        if let Ok(now) = list() {
            for (p, live, _) in now {
                if !streams.iter().any(|s| s.process == p) {
                    streams.push(Stream::new(p, live.clone(), vec![live]));
                }
            }
        }
        let mut batch = Vec::new();
        for s in &mut streams {
            s.check_rotation();
            let mut bytes = 0;
            while bytes < FOLLOW_BYTES_PER_POLL {
                let Some(r) = s.next_line(false) else { break };
                bytes += r.raw.len() + 1;
                batch.push(r);
            }
        }
        // Stable: lines of one stream with one time stay in their order.
        batch.sort_by_key(|r| r.ts_ms);
        for r in &batch {
            if let Some(line) = printer.line(r) {
                println!("{line}");
            }
        }
    }
    printer.note();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(raw: &str) -> Record {
        Record::parse(raw.to_string(), "catalog-1", 7)
    }

    #[test]
    fn rfc3339_both_ways() {
        for ms in [0, 951_782_400_123, 1_795_444_158_000, 1_795_444_158_999] {
            let text = shoal_telemetry::logging::rfc3339(ms);
            assert_eq!(parse_rfc3339(&text), Some(ms), "{text}");
        }
        assert_eq!(
            parse_rfc3339("2026-11-23T16:29:18+02:00"),
            Some(1_795_444_158_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-23T14:29:18.5Z"),
            Some(1_795_444_158_500)
        );
        for bad in [
            "",
            "2026-11-23",
            "2026-13-23T14:29:18Z",
            "2026-11-23T14:29:18",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn since_takes_a_time_or_a_time_ago() {
        let now = 10 * 86_400_000;
        assert_eq!(parse_since("10m", now), Ok(now - 600_000));
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since("1d", now), Ok(now - 86_400_000));
        assert_eq!(parse_since("90s", now), Ok(now - 90_000));
        assert_eq!(parse_since("1970-01-01T00:00:01Z", now), Ok(1000));
        assert!(parse_since("10 minutes", now).is_err());
        assert!(parse_since("m", now).is_err());
    }

    #[test]
    fn records_parse_and_print_compactly() {
        let r = rec(
            r#"{"ts":"2026-11-23T14:29:18.123Z","level":"WARN","service":"catalog","instance":"catalog-1","target":"x","message":"upstream failed","status":503,"request_id":"r-1","error":"connection refused"}"#,
        );
        assert_eq!(r.ts_ms, 1_795_444_158_123);
        assert_eq!(
            r.human(),
            r#"2026-11-23T14:29:18.123Z WARN  catalog/catalog-1 upstream failed error="connection refused" request_id=r-1 status=503"#
        );
        // Not JSON: the time of the line before, shown as it is after the process.
        let panic = rec("thread 'main' panicked at src/main.rs:3:5:");
        assert_eq!(panic.ts_ms, 7);
        assert!(panic.json.is_none());
        assert_eq!(
            panic.human(),
            "catalog-1 | thread 'main' panicked at src/main.rs:3:5:"
        );
        // A JSON value that is not an object is not a log record either.
        assert!(rec("42").json.is_none());
    }

    #[test]
    fn filters() {
        let debug = rec(
            r#"{"ts":"2026-11-23T14:29:18.000Z","level":"DEBUG","message":"cache miss","key":"p-1"}"#,
        );
        let warn = rec(
            r#"{"ts":"2026-11-23T14:29:19.000Z","level":"WARN","message":"slow","trace_id":"abc","ms":812}"#,
        );
        let panic = rec("thread 'main' panicked");
        let f = Filter {
            min_level: level_rank("info"),
            ..Filter::default()
        };
        assert!(!f.matches(&debug) && f.matches(&warn) && f.matches(&panic));
        let f = Filter {
            trace: Some("abc".into()),
            ..Filter::default()
        };
        assert!(!f.matches(&debug) && f.matches(&warn) && !f.matches(&panic));
        let f = Filter {
            since_ms: parse_rfc3339("2026-11-23T14:29:19Z"),
            ..Filter::default()
        };
        assert!(!f.matches(&debug) && f.matches(&warn));
        // Any field's value, numbers included; the panic's text.
        for (g, d, w, p) in [
            ("p-1", true, false, false),
            ("812", false, true, false),
            ("panicked", false, false, true),
            ("miss", true, false, false),
        ] {
            let f = Filter {
                grep: Some(g.into()),
                ..Filter::default()
            };
            assert_eq!(
                (f.matches(&debug), f.matches(&warn), f.matches(&panic)),
                (d, w, p),
                "{g}"
            );
        }
    }

    #[test]
    fn a_service_selects_its_replicas_and_versions() {
        let entries = vec!["catalog".to_string(), "catalog-v2".to_string()];
        assert!(selected("catalog-1", "catalog", &entries));
        assert!(selected("catalog-v2-3", "catalog", &entries));
        assert!(!selected("catalog-v2", "catalog", &[]));
        assert!(!selected("catalogue-1", "catalog", &entries));
        assert!(selected("gateway", "gateway", &[]));
        assert!(!selected("gateway", "catalog", &entries));
    }

    fn line(ts_ms: u64, service: &str, msg: &str) -> String {
        format!(
            "{}\n",
            serde_json::json!({"ts": shoal_telemetry::logging::rfc3339(ts_ms), "level": "INFO", "service": service, "message": msg})
        )
    }

    #[test]
    fn streams_merge_in_time_order_across_rotated_files() {
        let dir = std::env::temp_dir().join(format!("shoal-cli-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // catalog-1: rotated .2 (oldest), .1, then live; gateway: live only, and a
        // panic line with no newline at its end.
        std::fs::write(dir.join("catalog-1.log.2"), line(1_000, "catalog", "c1")).unwrap();
        std::fs::write(
            dir.join("catalog-1.log.1"),
            [line(3_000, "catalog", "c3"), line(5_000, "catalog", "c5")].concat(),
        )
        .unwrap();
        std::fs::write(dir.join("catalog-1.log"), line(6_000, "catalog", "c6")).unwrap();
        std::fs::write(
            dir.join("gateway.log"),
            [
                line(2_000, "gateway", "g2"),
                line(4_000, "gateway", "g4"),
                "thread panicked".into(),
            ]
            .concat(),
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not a log").unwrap();
        let groups = process_files(&dir).unwrap();
        let names: Vec<_> = groups
            .iter()
            .map(|(p, _, f)| (p.as_str(), f.len()))
            .collect();
        assert_eq!(names, [("catalog-1", 3), ("gateway", 1)]);
        let mut streams: Vec<_> = groups
            .into_iter()
            .map(|(p, live, files)| Stream::new(p, live, files))
            .collect();
        let mut got = Vec::new();
        merge(&mut streams, true, |r| {
            got.push(match &r.json {
                Some(m) => m["message"].as_str().unwrap().to_string(),
                None => r.human(),
            })
        });
        assert_eq!(
            got,
            [
                "c1",
                "g2",
                "c3",
                "g4",
                "gateway | thread panicked",
                "c5",
                "c6"
            ]
        );

        // Following: nothing new, then a line appended, then the live file rotated
        // away with a line at its end and a new one started.
        let mut streams: Vec<_> = process_files(&dir)
            .unwrap()
            .into_iter()
            .filter(|(p, _, _)| p == "catalog-1")
            .map(|(p, live, files)| Stream::new(p, live, files))
            .collect();
        merge(&mut streams, false, |_| {});
        let s = &mut streams[0];
        s.check_rotation();
        assert!(s.next_line(false).is_none());
        let live = dir.join("catalog-1.log");
        let append = |text: String| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&live)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        };
        append(line(7_000, "catalog", "c7"));
        s.check_rotation();
        assert_eq!(s.next_line(false).unwrap().ts_ms, 7_000);
        append(line(8_000, "catalog", "c8"));
        std::fs::rename(&live, dir.join("catalog-1.log.1")).unwrap();
        std::fs::write(&live, line(9_000, "catalog", "c9")).unwrap();
        s.check_rotation();
        let next: Vec<_> = std::iter::from_fn(|| s.next_line(false))
            .map(|r| r.ts_ms)
            .collect();
        assert_eq!(next, [8_000, 9_000]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

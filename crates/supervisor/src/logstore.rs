//! The bounded log store under `shoal up`: every process's stdout and stderr, line by
//! line, into `<state_dir>/logs/<name>.log`, rotated by size and pruned by count and
//! age (`[supervisor.logs]`, [`LogStoreConfig`]).
//!
//! Why a pipe and a writer thread, not copy-truncate: with the child appending to the
//! file itself (an fd handed over at spawn), rotating means copying the file and
//! truncating it under a writer that does not know, which loses or duplicates the
//! lines written in between and tears lines at the cut. With a pipe the supervisor
//! owns the file: it rotates between two whole lines and loses nothing.
//!
//! Under pressure (a slow or full disk) the child must not block forever on a full
//! pipe. Two pump tasks per process (stdout, stderr) read the pipes as fast as the
//! child writes and hand whole lines to a queue bounded in bytes
//! (`buffer_bytes`, 1 MiB by default); one thread per process writes the queue to
//! the file. When the queue is full the pumps drop lines rather than wait, count
//! them, and put a `WARN` line saying how many went missing into the log as soon as
//! there is room again. So the child never waits on the disk, memory stays bounded,
//! and a gap in the log is always marked.

use serde::Deserialize;
use shoal_core::Error;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Longest line kept whole; a longer one is cut into pieces of this size, each
/// written as a line of its own (`shoal logs` shows the pieces as non-JSON lines).
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;
/// Most lines queued per process, whatever their size.
const MAX_QUEUED_LINES: usize = 16 * 1024;
/// How often an idle writer checks for rotated files past their retention.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// `[supervisor.logs]`: how much log `shoal up` keeps per process.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogStoreConfig {
    /// A log file is rotated (renamed to `<name>.log.1`, older ones shifted up) before
    /// it would grow past this many bytes.
    pub max_file_bytes: u64,
    /// Rotated files kept per process (`<name>.log.1` … `<name>.log.<max_files>`);
    /// 0 keeps none (the file starts over when full).
    pub max_files: usize,
    /// Rotated files older than this (by their last write) are deleted.
    pub retention_ms: u64,
    /// Most bytes of output queued per process while the disk is slow; beyond, lines
    /// are dropped (and the gap marked in the log) rather than the process blocked.
    pub buffer_bytes: usize,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 16 * 1024 * 1024,
            max_files: 4,
            retention_ms: 7 * 24 * 3600 * 1000,
            buffer_bytes: 1024 * 1024,
        }
    }
}

impl LogStoreConfig {
    /// Check the bounds deserialisation cannot.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_file_bytes < 4096 {
            return Err(Error::config(
                "supervisor.logs.max_file_bytes: must be at least 4096",
            ));
        }
        if self.max_files > 100 {
            return Err(Error::config("supervisor.logs.max_files: must be 0 to 100"));
        }
        if self.retention_ms == 0 {
            return Err(Error::config(
                "supervisor.logs.retention_ms: must be positive",
            ));
        }
        if !(MAX_LINE_BYTES..=256 * 1024 * 1024).contains(&self.buffer_bytes) {
            return Err(Error::config(format!(
                "supervisor.logs.buffer_bytes: must be {MAX_LINE_BYTES} to 268435456"
            )));
        }
        Ok(())
    }
}

/// `<name>.log.<n>`: the `n`-th newest rotated file of `path`.
pub(crate) fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{n}"));
    path.with_file_name(name)
}

/// A log file that rotates itself by size and prunes rotated files by count and age.
pub(crate) struct RotatingWriter {
    path: PathBuf,
    cfg: LogStoreConfig,
    out: BufWriter<File>,
    size: u64,
}

impl RotatingWriter {
    /// Open `path` for appending (an existing file goes on growing, a restarted
    /// `shoal up` keeps its history) and prune what is past its retention.
    pub(crate) fn open(path: &Path, cfg: LogStoreConfig) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        let w = Self {
            path: path.to_path_buf(),
            cfg,
            out: BufWriter::new(file),
            size,
        };
        w.prune(SystemTime::now());
        Ok(w)
    }

    /// Write one line (with its newline). Rotates first if the line would take the
    /// file past `max_file_bytes`; a file is never left empty by a rotation, so a
    /// single line longer than the bound still gets written.
    pub(crate) fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.cfg.max_file_bytes {
            self.rotate()?;
        }
        self.out.write_all(line)?;
        self.size += len;
        Ok(())
    }

    /// Push buffered lines to the file.
    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let n = self.cfg.max_files;
        if n == 0 {
            std::fs::remove_file(&self.path).or_else(ignore_missing)?;
        } else {
            std::fs::remove_file(rotated(&self.path, n)).or_else(ignore_missing)?;
            for i in (1..n).rev() {
                std::fs::rename(rotated(&self.path, i), rotated(&self.path, i + 1))
                    .or_else(ignore_missing)?;
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.out = BufWriter::new(file);
        self.size = 0;
        self.prune(SystemTime::now());
        Ok(())
    }

    /// Delete rotated files older than the retention (judged at `now`), and any
    /// numbered beyond `max_files` (left by a larger setting before).
    pub(crate) fn prune(&self, now: SystemTime) {
        let retention = Duration::from_millis(self.cfg.retention_ms);
        let Some(dir) = self.path.parent() else {
            return;
        };
        let Some(base) = self.path.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix(base))
                .and_then(|n| n.strip_prefix('.'))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > retention);
            if n > self.cfg.max_files || old {
                // A file that cannot be deleted now is tried again at the next
                // rotation or prune.
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// One process's log: a bounded queue in front of a writer thread. The queue is
/// shared by the process's stdout and stderr pumps and outlives restarts of the
/// process.
pub(crate) struct LogSink {
    tx: Option<SyncSender<Vec<u8>>>,
    queued: Arc<AtomicUsize>,
    budget: usize,
    dropped: AtomicU64,
    service: String,
    instance: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogSink {
    /// Open `path` and start its writer thread. `service` and `instance` label the
    /// lines the supervisor itself adds (the dropped-lines marker).
    pub(crate) fn start(
        path: &Path,
        cfg: LogStoreConfig,
        service: &str,
        instance: &str,
    ) -> std::io::Result<Self> {
        let budget = cfg.buffer_bytes;
        let writer = RotatingWriter::open(path, cfg)?;
        let (tx, rx) = sync_channel(MAX_QUEUED_LINES);
        let queued = Arc::new(AtomicUsize::new(0));
        let thread = {
            let queued = queued.clone();
            let label = path.display().to_string();
            std::thread::Builder::new()
                .name(format!("log-{instance}"))
                .spawn(move || write_loop(writer, rx, queued, label))?
        };
        Ok(Self {
            tx: Some(tx),
            queued,
            budget,
            dropped: AtomicU64::new(0),
            service: service.to_string(),
            instance: instance.to_string(),
            thread: Some(thread),
        })
    }

    /// Queue `line` without waiting; false if the queue is full (or the writer is
    /// gone).
    fn try_queue(&self, line: Vec<u8>) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let len = line.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > self.budget {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        match tx.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(len, Ordering::AcqRel);
                false
            }
        }
    }

    /// Queue one line (ending in a newline); never waits. A line that does not fit
    /// is dropped and counted; the count goes into the log first thing once there
    /// is room again.
    pub(crate) fn offer(&self, line: Vec<u8>) {
        let missing = self.dropped.load(Ordering::Acquire);
        if missing > 0 {
            if self.try_queue(self.dropped_marker(missing)) {
                self.dropped.fetch_sub(missing, Ordering::AcqRel);
            } else {
                self.dropped.fetch_add(1, Ordering::AcqRel);
                return;
            }
        }
        if !self.try_queue(line) {
            self.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Lines dropped and not reported in the log yet.
    #[cfg(test)]
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Acquire)
    }

    fn dropped_marker(&self, n: u64) -> Vec<u8> {
        let mut line = serde_json::json!({
            "ts": shoal_telemetry::logging::rfc3339_now(),
            "level": "WARN",
            "service": self.service,
            "instance": self.instance,
            "target": "shoal::supervisor",
            "message": format!("{n} line(s) of output were dropped: the log writer fell behind (slow or full disk)"),
            "dropped": n,
        })
        .to_string()
        .into_bytes();
        line.push(b'\n');
        line
    }

    /// Write out what is queued and stop the writer thread (blocks until then).
    pub(crate) fn close(mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    mut writer: RotatingWriter,
    rx: Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    label: String,
) {
    let mut failing = false;
    let mut write = |writer: &mut RotatingWriter, line: &[u8]| {
        let r = writer.write_line(line);
        queued.fetch_sub(line.len(), Ordering::AcqRel);
        match r {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                // Once per failing streak: a full disk would otherwise print a
                // message per line.
                eprintln!("shoal: cannot write {label}: {e}; dropping its lines meanwhile");
                failing = true;
            }
            Err(_) => {}
        }
    };
    loop {
        match rx.recv_timeout(PRUNE_EVERY) {
            Ok(line) => {
                write(&mut writer, &line);
                // Drain what else is queued, then flush once: a burst costs one
                // flush, a quiet process's lines reach the file at once.
                while let Ok(line) = rx.try_recv() {
                    write(&mut writer, &line);
                }
                let _ = writer.flush();
            }
            Err(RecvTimeoutError::Timeout) => writer.prune(SystemTime::now()),
            Err(RecvTimeoutError::Disconnected) => {
                let _ = writer.flush();
                return;
            }
        }
    }
}

/// Read `from` (a child's stdout or stderr) line by line into `sink` until the end,
/// as fast as the child writes.
pub(crate) async fn pump<R: AsyncRead + Unpin>(from: R, sink: Arc<LogSink>) {
    let mut reader = BufReader::with_capacity(MAX_LINE_BYTES, from);
    let mut line = Vec::new();
    // A read error ends the pump like the end of the pipe does.
    while let Ok(buf) = reader.fill_buf().await {
        if buf.is_empty() {
            break;
        }
        let (upto, whole) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let take = upto.min(MAX_LINE_BYTES - line.len());
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if (whole && take == upto) || line.len() >= MAX_LINE_BYTES {
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            sink.offer(std::mem::take(&mut line));
        }
    }
    // A last line without a newline (a process killed mid-line) is kept too.
    if !line.is_empty() {
        line.push(b'\n');
        sink.offer(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-logstore-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn cfg(max_file_bytes: u64, max_files: usize) -> LogStoreConfig {
        LogStoreConfig {
            max_file_bytes,
            max_files,
            ..LogStoreConfig::default()
        }
    }

    fn files(dir: &Path) -> Vec<(String, u64)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn rotation_keeps_at_most_max_files_of_about_the_bound() {
        let dir = temp_dir("rotate");
        let path = dir.join("catalog-1.log");
        let mut w = RotatingWriter::open(&path, cfg(4096, 3)).unwrap();
        // 100-byte lines, numbered: 10,000 of them is ~1 MB, far past 4 files.
        for n in 0..10_000u32 {
            let mut line = format!("{{\"n\":{n:08}}}").into_bytes();
            line.resize(99, b' ');
            line.push(b'\n');
            w.write_line(&line).unwrap();
        }
        w.flush().unwrap();
        let got = files(&dir);
        let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "catalog-1.log",
                "catalog-1.log.1",
                "catalog-1.log.2",
                "catalog-1.log.3"
            ]
        );
        for (name, size) in &got {
            assert!(*size <= 4096, "{name}: {size}");
            if name != "catalog-1.log" {
                // Rotated only when the next line would not fit: full but for one line.
                assert!(*size > 4096 - 100, "{name}: {size}");
            }
        }
        // Whole lines only, and the newest lines are in the live file.
        let live = std::fs::read_to_string(&path).unwrap();
        assert!(live
            .lines()
            .all(|l| l.len() == 99 && l.starts_with("{\"n\":")));
        assert!(live.trim_end().lines().last().unwrap().contains("00009999"));
        let older = std::fs::read_to_string(rotated(&path, 1)).unwrap();
        let last_older = older.lines().last().unwrap().to_string();
        let first_live = live.lines().next().unwrap();
        assert!(
            last_older.as_str() < first_live,
            "rotated files hold older lines"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_rotated_files_when_max_files_is_zero_and_long_lines_still_go_in() {
        let dir = temp_dir("zero");
        let path = dir.join("gateway.log");
        let mut w = RotatingWriter::open(&path, cfg(4096, 0)).unwrap();
        let long = [vec![b'x'; 5000], vec![b'\n']].concat();
        w.write_line(&long).unwrap();
        w.write_line(b"short\n").unwrap();
        w.flush().unwrap();
        assert_eq!(files(&dir), [("gateway.log".to_string(), 6)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotated_files_past_retention_or_count_are_pruned() {
        let dir = temp_dir("prune");
        let path = dir.join("orders-1.log");
        let week = Duration::from_millis(LogStoreConfig::default().retention_ms);
        for n in 1..=5 {
            std::fs::write(rotated(&path, n), b"old\n").unwrap();
        }
        let w = RotatingWriter::open(&path, cfg(4096, 4)).unwrap();
        // `.5` is beyond max_files; the others are fresh.
        let names: Vec<_> = files(&dir).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(!names.contains(&"orders-1.log.5".to_string()));
        // Eight days on (no waiting: prune takes the time to judge by), `.2` was
        // written a day later than the rest.
        let now = SystemTime::now();
        File::options()
            .write(true)
            .open(rotated(&path, 2))
            .unwrap()
            .set_modified(now + Duration::from_secs(24 * 3600))
            .unwrap();
        w.prune(now + week + Duration::from_secs(3600));
        let names: Vec<_> = files(&dir).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["orders-1.log", "orders-1.log.2"]);
        // The live file is never pruned, however old.
        w.prune(now + week * 4);
        let names: Vec<_> = files(&dir).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["orders-1.log"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn pumped_lines_reach_the_file_and_a_full_queue_drops_and_marks() {
        let dir = temp_dir("pump");
        let path = dir.join("catalog-1.log");
        let sink = Arc::new(
            LogSink::start(&path, LogStoreConfig::default(), "catalog", "catalog-1").unwrap(),
        );
        let input: &[u8] =
            b"{\"message\":\"one\"}\nthread 'main' panicked at src/main.rs\nno newline";
        pump(input, sink.clone()).await;
        // A line longer than the limit is cut, not lost.
        let long = vec![b'y'; MAX_LINE_BYTES + 10];
        pump(&long[..], sink.clone()).await;
        Arc::into_inner(sink).unwrap().close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines[..3],
            [
                "{\"message\":\"one\"}",
                "thread 'main' panicked at src/main.rs",
                "no newline"
            ]
        );
        assert_eq!(lines[3].len(), MAX_LINE_BYTES);
        assert_eq!(lines[4].len(), 10);

        // A queue with no writer behind it (the disk "stuck"): offers never wait,
        // they count what they drop, and the count is logged once there is room.
        let path = dir.join("stuck.log");
        let (tx, rx) = sync_channel(MAX_QUEUED_LINES);
        let sink = LogSink {
            tx: Some(tx),
            queued: Arc::new(AtomicUsize::new(0)),
            budget: 1000,
            dropped: AtomicU64::new(0),
            service: "catalog".into(),
            instance: "catalog-1".into(),
            thread: None,
        };
        for _ in 0..20 {
            sink.offer(vec![b'z'; 100]);
        }
        assert_eq!(sink.dropped(), 10);
        // The writer catches up: what it took frees the budget.
        let taken: Vec<_> = rx.try_iter().collect();
        assert_eq!(taken.len(), 10);
        sink.queued.store(0, Ordering::Release);
        sink.offer(b"after\n".to_vec());
        assert_eq!(sink.dropped(), 0);
        let marker = rx.try_recv().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&marker).unwrap();
        assert_eq!(v["dropped"], 10);
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["instance"], "catalog-1");
        assert_eq!(rx.try_recv().unwrap(), b"after\n");
        drop(path);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::index;
use crate::segment::{index_path, segment_path};
use crate::util::lock;
use crate::{Error, Limit, Log, LogConfig, OffsetStore, Record, StoredRecord};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "shoal-log-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Records of varying shape: some keys (including an empty one), headers, sizes.
fn varied(i: u64) -> Record {
    let mut r = Record::new(format!("payload-{i}-{}", "x".repeat((i % 50) as usize)));
    if i.is_multiple_of(2) {
        r = r.with_key(format!("key-{i}"));
    }
    if i.is_multiple_of(7) {
        r = r.with_key(Vec::new());
    }
    if i.is_multiple_of(3) {
        r = r
            .with_header("trace", i.to_le_bytes().to_vec())
            .with_header("h2", b"".to_vec());
    }
    r
}

/// Records of one fixed frame size, so byte positions are easy to compute.
fn fixed(i: u64) -> Record {
    Record::new(format!("{i:0100}"))
}
const FIXED_LEN: u64 = 38 + 100;

fn small() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        retention_ms: None,
        ..LogConfig::default()
    }
}

async fn read_all(log: &Log) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    let mut next = log.first_offset();
    loop {
        let batch = log.read(next, 37, 3000).await.unwrap();
        let Some(last) = batch.last() else { break };
        next = last.offset + 1;
        out.extend(batch);
    }
    out
}

fn assert_matches(got: &[StoredRecord], first: u64, make: impl Fn(u64) -> Record) {
    for (i, r) in got.iter().enumerate() {
        let off = first + i as u64;
        assert_eq!(r.offset, off);
        assert_eq!(r.clone().into_record(), make(off), "record {off}");
    }
    for w in got.windows(2) {
        assert!(w[0].timestamp_ms <= w[1].timestamp_ms);
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, pos: u64) {
    let mut b = fs::read(path).unwrap();
    b[pos as usize] ^= 0x5a;
    fs::write(path, b).unwrap();
}

async fn append_each(log: &Log, range: std::ops::Range<u64>, make: impl Fn(u64) -> Record) {
    for i in range {
        assert_eq!(log.append(vec![make(i)]).await.unwrap(), i..i + 1);
    }
}

#[tokio::test]
async fn round_trip_across_rolls_and_reopen() {
    let dir = TempDir::new("roundtrip");
    let log = Log::open(dir.path(), small()).unwrap();
    assert_eq!((log.first_offset(), log.next_offset()), (0, 0));
    let mut next = 0;
    let mut size = 1;
    while next < 300 {
        let n = size.min(300 - next);
        let batch = (next..next + n).map(varied).collect();
        assert_eq!(log.append(batch).await.unwrap(), next..next + n);
        next += n;
        size = size % 7 + 1;
    }
    assert!(log.segment_count() > 3, "{} segments", log.segment_count());
    assert!(log.stats().rolls >= 3);
    assert_eq!(log.next_offset(), 300);
    let all = read_all(&log).await;
    assert_eq!(all.len(), 300);
    assert_matches(&all, 0, varied);
    for i in 0..300 {
        let one = log.read_blocking(i, 1, usize::MAX).unwrap();
        assert_eq!(one, vec![all[i as usize].clone()]);
    }
    // max_bytes below one record still makes progress; limits are respected.
    assert_eq!(log.read(5, 10, 1).await.unwrap().len(), 1);
    assert_eq!(log.read(295, 10, usize::MAX).await.unwrap().len(), 5);
    assert!(log.read(300, 10, 100).await.unwrap().is_empty());
    assert!(matches!(
        log.read(301, 10, 100).await,
        Err(Error::OffsetOutOfRange {
            requested: 301,
            first: 0,
            next: 300
        })
    ));
    log.close().await.unwrap();
    assert!(matches!(
        log.append(vec![varied(0)]).await,
        Err(Error::Closed)
    ));

    let files = segment_files(dir.path());
    assert_eq!(files[0].file_name().unwrap(), "00000000000000000000.log");
    let last_ts = all[299].timestamp_ms;
    drop(log);
    let log = Log::open(dir.path(), small()).unwrap();
    let rec = log.recovery();
    assert_eq!(rec.truncation, None);
    assert!(rec.rebuilt_indexes.is_empty(), "{:?}", rec.rebuilt_indexes);
    assert_eq!((rec.next_offset, rec.segments), (300, files.len()));
    assert_eq!(read_all(&log).await, all);
    assert_eq!(log.append(vec![varied(300)]).await.unwrap(), 300..301);
    let again = read_all(&log).await;
    assert_matches(&again, 0, varied);
    assert!(again[300].timestamp_ms >= last_ts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_one_fsync_for_queued_appends() {
    let dir = TempDir::new("group");
    let log = Arc::new(Log::open(dir.path(), small()).unwrap());
    // Hold the writer after it takes the first request, so all 64 are queued
    // by the time it gathers a group: the outcome does not depend on timing.
    let gate = lock(&log.shared().test_gate);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append(vec![varied(i)]).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.queued() < 63 {
        assert!(Instant::now() < deadline, "appends never queued");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(gate);
    let mut offsets = BTreeSet::new();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.end - r.start, 1);
        offsets.insert(r.start);
    }
    assert_eq!(offsets, (0..64).collect());
    let s = log.stats();
    assert_eq!((s.records, s.batches), (64, 64));
    assert!(s.fsyncs < 64, "{s:?}");
    assert_eq!(s.commits, 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_share_fsyncs() {
    let dir = TempDir::new("concurrent");
    let log = Arc::new(Log::open(dir.path(), small()).unwrap());
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (log, barrier) = (log.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                log.append(vec![varied(i)]).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = log.stats();
    assert_eq!(s.records, 64);
    assert!(s.fsyncs < 64, "no sharing: {s:?}");
    let all = read_all(&log).await;
    assert_eq!(
        all.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (0..64).collect::<Vec<_>>()
    );
}

/// Many producers and a tailing consumer at once; prints rough throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_and_tailing_consumer() {
    const TASKS: u64 = 32;
    const PER_TASK: u64 = 150;
    let dir = TempDir::new("throughput");
    let log = Arc::new(
        Log::open(
            dir.path(),
            LogConfig {
                segment_bytes: 64 << 10,
                ..small()
            },
        )
        .unwrap(),
    );
    let consumer = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut rx = log.subscribe();
            let mut next = 0;
            let mut seen = BTreeSet::new();
            while next < TASKS * PER_TASK {
                rx.wait_for(|&hwm| hwm > next).await.unwrap();
                for r in log.read(next, 500, 1 << 20).await.unwrap() {
                    assert_eq!(r.offset, next);
                    assert!(r.offset < log.next_offset());
                    seen.insert(String::from_utf8(r.payload).unwrap());
                    next += 1;
                }
            }
            seen
        })
    };
    let start = Instant::now();
    let producers: Vec<_> = (0..TASKS)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    log.append(vec![Record::new(format!("{t}/{i}"))])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    let elapsed = start.elapsed();
    let seen = consumer.await.unwrap();
    assert_eq!(seen.len() as u64, TASKS * PER_TASK);
    let s = log.stats();
    println!(
        "{} single-record appends from {TASKS} tasks in {:.2?}: {:.0} appends/s, {} fsyncs ({:.1} appends per fsync), {} segments",
        s.records,
        elapsed,
        s.records as f64 / elapsed.as_secs_f64(),
        s.fsyncs,
        s.records as f64 / s.fsyncs as f64,
        log.segment_count()
    );
    assert!(s.fsyncs < s.records);
}

/// Appends `n` fixed records one batch each into one segment and closes.
async fn fixed_log(dir: &Path, n: u64) -> PathBuf {
    let log = Log::open(dir, LogConfig::default()).unwrap();
    append_each(&log, 0..n, fixed).await;
    log.close().await.unwrap();
    segment_path(dir, 0)
}

#[tokio::test]
async fn torn_tail_mid_record_is_truncated() {
    let dir = TempDir::new("torn");
    let seg = fixed_log(dir.path(), 20).await;
    let len = fs::metadata(&seg).unwrap().len();
    assert_eq!(len, 20 * FIXED_LEN);
    fs::File::options()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - FIXED_LEN / 2)
        .unwrap();

    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let t = log
        .recovery()
        .truncation
        .clone()
        .expect("truncation reported");
    assert_eq!(t.segment, seg);
    assert_eq!(t.position, 19 * FIXED_LEN);
    assert_eq!(t.bytes, FIXED_LEN - FIXED_LEN / 2);
    assert_eq!(t.resumed_at, 19);
    assert_eq!(fs::metadata(&seg).unwrap().len(), 19 * FIXED_LEN);
    assert_matches(&read_all(&log).await, 0, fixed);
    assert_eq!(read_all(&log).await.len(), 19);
    assert_eq!(log.append(vec![fixed(19)]).await.unwrap(), 19..20);
    assert_matches(&read_all(&log).await, 0, fixed);
}

#[tokio::test]
async fn garbage_after_tail_is_truncated() {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let garbage: Vec<u8> = (0..777)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    // Zeros after garbage are still a torn tail: only zeros from a batch
    // boundary to the end are preallocation.
    let mut garbage_then_zeros = garbage[..100].to_vec();
    garbage_then_zeros.extend([0u8; 4000]);
    for (name, tail) in [("garbage", garbage), ("garbage-zeros", garbage_then_zeros)] {
        let dir = TempDir::new(name);
        let seg = fixed_log(dir.path(), 10).await;
        fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&tail)
            .unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let t = log.recovery().truncation.clone().expect(name);
        assert_eq!((t.bytes, t.resumed_at), (tail.len() as u64, 10), "{name}");
        assert_eq!(read_all(&log).await.len(), 10);
        assert_eq!(log.append(vec![fixed(10)]).await.unwrap(), 10..11);
        assert_matches(&read_all(&log).await, 0, fixed);
    }
}

#[tokio::test]
async fn zeros_after_a_batch_are_preallocation_not_damage() {
    let dir = TempDir::new("zeros");
    let seg = fixed_log(dir.path(), 10).await;
    // What a crash leaves: the writer's zeros ahead of the last batch.
    fs::OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&[0u8; 5000])
        .unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(log.recovery().truncation, None);
    assert_eq!(log.next_offset(), 10);
    // Appends overwrite the zeros; a clean close hands back what is left.
    assert_eq!(log.append(vec![fixed(10)]).await.unwrap(), 10..11);
    assert_matches(&read_all(&log).await, 0, fixed);
    log.close().await.unwrap();
    drop(log);
    assert_eq!(fs::metadata(&seg).unwrap().len(), 11 * FIXED_LEN);
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert_eq!(read_all(&log).await.len(), 11);
}

#[tokio::test]
async fn the_active_segment_is_written_into_zeros_ahead_of_the_data() {
    let dir = TempDir::new("prealloc");
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    append_each(&log, 0..3, fixed).await;
    let seg = segment_path(dir.path(), 0);
    let len = fs::metadata(&seg).unwrap().len();
    assert_eq!(len, 64 << 10, "the first extension is 64 KiB");
    assert_eq!(
        log.size_bytes(),
        3 * FIXED_LEN,
        "readers see only the records"
    );
    assert_eq!(read_all(&log).await.len(), 3);
    // A crash now (the file dropped without a close) keeps every record.
    std::mem::forget(log);
    let dir2 = TempDir::new("prealloc-copy");
    fs::copy(&seg, segment_path(dir2.path(), 0)).unwrap();
    let log = Log::open(dir2.path(), LogConfig::default()).unwrap();
    assert_eq!(log.recovery().truncation, None);
    assert_matches(&read_all(&log).await, 0, fixed);
    assert_eq!(log.append(vec![fixed(3)]).await.unwrap(), 3..4);
    assert_matches(&read_all(&log).await, 0, fixed);
}

/// Waits for the zeroing thread to finish what the active segment asked of it.
fn settle(log: &Log) {
    let ahead = lock(&log.shared().ahead).clone().unwrap();
    ahead.settle();
}

#[tokio::test]
async fn the_zeroing_thread_extends_the_active_segment_before_the_writer_needs_it() {
    let dir = TempDir::new("ahead");
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let seg = segment_path(dir.path(), 0);
    let mut next = 0;
    let mut lens = BTreeSet::new();
    // Batches of 40 records (5,520 bytes) to past 1 MiB, each extension given
    // time to finish: the writer writes only the first 64 KiB of zeros itself.
    while log.size_bytes() < 1 << 20 {
        assert_eq!(
            log.append((next..next + 40).map(fixed).collect())
                .await
                .unwrap(),
            next..next + 40
        );
        next += 40;
        settle(&log);
        let len = fs::metadata(&seg).unwrap().len();
        assert!(len > log.size_bytes(), "{len} after {}", log.size_bytes());
        lens.insert(len);
    }
    assert_eq!(log.stats().zeroed_inline, 1);
    // Each extension is asked for once half of the next one's length is left.
    let kib: Vec<u64> = lens.into_iter().map(|l| l >> 10).collect();
    assert_eq!(kib, [64, 128, 256, 512, 1024, 2048, 4096]);
    assert_matches(&read_all(&log).await, 0, fixed);
    // A crash keeps every record; a clean close cuts the zeros off.
    let dir2 = TempDir::new("ahead-copy");
    fs::copy(&seg, segment_path(dir2.path(), 0)).unwrap();
    let copy = Log::open(dir2.path(), LogConfig::default()).unwrap();
    assert_eq!(copy.recovery().truncation, None);
    assert_eq!(copy.next_offset(), next);
    log.close().await.unwrap();
    drop(log);
    assert_eq!(fs::metadata(&seg).unwrap().len(), next * FIXED_LEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeros_never_overwrite_records_or_outlive_a_sealed_segment() {
    // Small segments, large batches (a roll soon after the zeroing thread was
    // asked for more) and eight appenders racing it: every segment must end up
    // exactly its records, each record intact.
    let dir = TempDir::new("ahead-race");
    let config = LogConfig {
        segment_bytes: 300 << 10,
        retention_ms: None,
        ..LogConfig::default()
    };
    let log = Arc::new(Log::open(dir.path(), config.clone()).unwrap());
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..60u64 {
                    // 138 bytes to 72 KiB: some batches fill much of a segment.
                    let n = 1 + ((t * 7 + i) % 13) * ((t + i) % 3) * 20;
                    log.append((0..n).map(fixed).collect()).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let total = log.next_offset();
    assert!(log.stats().rolls >= 3, "{:?}", log.stats());
    let log = Arc::into_inner(log).unwrap();
    log.close().await.unwrap();
    drop(log);
    let mut bytes = 0;
    for entry in fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let len = fs::metadata(&path).unwrap().len();
            assert_eq!(len % FIXED_LEN, 0, "{} is {len} bytes", path.display());
            bytes += len;
        }
    }
    assert_eq!(bytes, total * FIXED_LEN);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.recovery().truncation, None);
    let all = read_all(&log).await;
    assert_eq!(all.len() as u64, total);
    for r in &all {
        assert_eq!(r.payload.len(), 100, "record {}", r.offset);
    }
}

#[tokio::test]
async fn unfinished_batch_is_dropped_whole() {
    for cut in [FIXED_LEN / 3, FIXED_LEN] {
        let dir = TempDir::new("batch");
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        append_each(&log, 0..5, fixed).await;
        assert_eq!(log.append((5..9).map(fixed).collect()).await.unwrap(), 5..9);
        log.close().await.unwrap();
        drop(log);
        let seg = segment_path(dir.path(), 0);
        // Cut inside, or exactly before, the batch's last record: the records
        // before it are intact but the batch never finished.
        fs::File::options()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(9 * FIXED_LEN - cut)
            .unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let t = log.recovery().truncation.clone().unwrap();
        assert_eq!((t.position, t.resumed_at), (5 * FIXED_LEN, 5), "cut {cut}");
        assert_eq!(read_all(&log).await.len(), 5);
        assert_eq!(log.append(vec![fixed(5)]).await.unwrap(), 5..6);
    }
}

#[tokio::test]
async fn corruption_inside_active_segment_fails_open() {
    // A payload byte, the checksum, and the length field of record 2.
    for at in [FIXED_LEN - 1, 5, 1] {
        let dir = TempDir::new("corrupt-active");
        let seg = fixed_log(dir.path(), 10).await;
        flip(&seg, 2 * FIXED_LEN + at);
        let len = fs::metadata(&seg).unwrap().len();
        match Log::open(dir.path(), LogConfig::default()) {
            Err(Error::Corrupt {
                segment,
                position,
                offset,
                ..
            }) => {
                assert_eq!((segment, position, offset), (seg.clone(), 2 * FIXED_LEN, 2));
            }
            other => panic!("flip at +{at}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(fs::metadata(&seg).unwrap().len(), len, "nothing truncated");
        let e = Log::open(dir.path(), LogConfig::default()).unwrap_err();
        assert!(!e.retryable());
    }
}

#[tokio::test]
async fn corruption_in_sealed_segment_fails_reads_not_open() {
    let dir = TempDir::new("corrupt-sealed");
    let cfg = LogConfig {
        segment_bytes: 10 * FIXED_LEN,
        ..small()
    };
    let log = Log::open(dir.path(), cfg.clone()).unwrap();
    append_each(&log, 0..50, fixed).await;
    log.close().await.unwrap();
    drop(log);
    let first = segment_path(dir.path(), 0);
    flip(&first, FIXED_LEN + 60);

    let log = Log::open(dir.path(), cfg).unwrap();
    assert_eq!(log.read(0, 1, usize::MAX).await.unwrap()[0].offset, 0);
    match log.read(0, 100, usize::MAX).await {
        Err(Error::Corrupt {
            segment,
            position,
            offset,
            ..
        }) => {
            assert_eq!((segment, position, offset), (first.clone(), FIXED_LEN, 1));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(
        log.read(1, 1, usize::MAX).await,
        Err(Error::Corrupt { offset: 1, .. })
    ));
    // The sparse index lets reads past the damage start after it.
    assert_matches(&log.read(5, 5, usize::MAX).await.unwrap(), 5, fixed);
    assert_matches(&log.read(10, 40, usize::MAX).await.unwrap(), 10, fixed);
}

#[tokio::test]
async fn bad_index_files_are_rebuilt() {
    let dir = TempDir::new("index");
    let cfg = LogConfig {
        segment_bytes: 2000,
        index_interval_bytes: 300,
        ..small()
    };
    let log = Log::open(dir.path(), cfg.clone()).unwrap();
    append_each(&log, 0..60, fixed).await;
    log.close().await.unwrap();
    let bases: Vec<u64> = log.shared().snapshot().iter().map(|s| s.base).collect();
    drop(log);
    assert!(bases.len() >= 5);
    let idx = |i: usize| index_path(dir.path(), bases[i]);
    let last = bases.len() - 1;
    fs::remove_file(idx(0)).unwrap();
    fs::write(idx(1), b"definitely not an index").unwrap();
    // Well-formed and checksummed, but describing another segment.
    fs::copy(idx(2), idx(3)).unwrap();
    fs::write(idx(last), index::MAGIC).unwrap();

    let log = Log::open(dir.path(), cfg.clone()).unwrap();
    let rebuilt: BTreeSet<PathBuf> = log.recovery().rebuilt_indexes.iter().cloned().collect();
    assert_eq!(
        rebuilt,
        [idx(0), idx(1), idx(3), idx(last)].into_iter().collect()
    );
    assert_eq!(log.recovery().truncation, None);
    for i in 0..60 {
        assert_matches(&log.read(i, 1, usize::MAX).await.unwrap(), i, fixed);
    }
    let segs = log.shared().snapshot();
    assert!(
        crate::util::read_lock(&segs[0].index).len() > 1,
        "rebuilt index is sparse, not empty"
    );
    log.close().await.unwrap();
    drop((segs, log));
    let log = Log::open(dir.path(), cfg).unwrap();
    assert!(
        log.recovery().rebuilt_indexes.is_empty(),
        "rebuilt files were saved"
    );
}

#[tokio::test]
async fn retention_by_size() {
    let dir = TempDir::new("ret-size");
    let cfg = LogConfig {
        retention_bytes: Some(10_000),
        ..small()
    };
    let log = Log::open(dir.path(), cfg.clone()).unwrap();
    append_each(&log, 0..200, fixed).await;
    let before = log.size_bytes();
    assert_eq!(before, 200 * FIXED_LEN);
    let out = log.enforce_retention(crate::util::now_ms()).unwrap();
    assert!(out.deleted_segments > 0);
    assert_eq!(log.size_bytes(), before - out.deleted_bytes);
    assert!(log.size_bytes() <= 10_000);
    assert!(
        log.size_bytes() + cfg.segment_bytes > 10_000,
        "deleted more than needed"
    );
    let first = log.first_offset();
    assert_eq!(out.first_offset, first);
    assert!(first > 0);
    assert_eq!(
        segment_files(dir.path())[0],
        segment_path(dir.path(), first)
    );
    for bad in [0, first - 1] {
        assert!(matches!(
            log.read(bad, 1, 100).await,
            Err(Error::OffsetOutOfRange { requested, first: f, next: 200 }) if requested == bad && f == first
        ));
    }
    assert_matches(&read_all(&log).await, first, fixed);
    assert_eq!(log.offset_for_time(0).unwrap(), first);
    assert_eq!(
        log.enforce_retention(crate::util::now_ms())
            .unwrap()
            .deleted_segments,
        0
    );
    log.close().await.unwrap();
    drop(log);
    let log = Log::open(dir.path(), cfg).unwrap();
    assert_eq!((log.first_offset(), log.next_offset()), (first, 200));
}

#[tokio::test]
async fn retention_by_age() {
    let dir = TempDir::new("ret-age");
    // Every batch in its own segment, so each segment has its own timestamp.
    let cfg = LogConfig {
        segment_bytes: 1,
        retention_ms: Some(1000),
        ..small()
    };
    let log = Log::open(dir.path(), cfg).unwrap();
    for i in 0..5 {
        log.append(vec![fixed(i)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(log.segment_count(), 5);
    let ts: Vec<u64> = read_all(&log)
        .await
        .iter()
        .map(|r| r.timestamp_ms)
        .collect();
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "{ts:?}");

    assert_eq!(log.enforce_retention(ts[0]).unwrap().deleted_segments, 0);
    // Segments 0 and 1 hold only records older than ts[2] + 1 - 1000.
    let out = log.enforce_retention(ts[2] + 1001).unwrap();
    assert_eq!((out.deleted_segments, out.first_offset), (2, 2));
    assert!(matches!(
        log.read(1, 1, 100).await,
        Err(Error::OffsetOutOfRange { first: 2, .. })
    ));
    // Far in the future everything expires except the active segment.
    let out = log.enforce_retention(ts[4] + 1_000_000).unwrap();
    assert_eq!((out.deleted_segments, out.first_offset), (2, 4));
    assert_eq!(segment_files(dir.path()), vec![segment_path(dir.path(), 4)]);
    assert_matches(&log.read(4, 10, 1000).await.unwrap(), 4, fixed);
    assert_eq!(log.append(vec![fixed(5)]).await.unwrap(), 5..6);
}

#[tokio::test]
async fn offset_for_time_finds_first_record_at_or_after() {
    let dir = TempDir::new("time");
    let cfg = LogConfig {
        segment_bytes: 600,
        index_interval_bytes: 200,
        ..small()
    };
    let log = Log::open(dir.path(), cfg.clone()).unwrap();
    assert_eq!(log.offset_for_time(0).unwrap(), 0);
    for b in 0..12 {
        log.append(vec![fixed(2 * b), fixed(2 * b + 1)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let all = read_all(&log).await;
    let expected = |t: u64| {
        all.iter()
            .find(|r| r.timestamp_ms >= t)
            .map_or(24, |r| r.offset)
    };
    let mut probes = vec![0, u64::MAX];
    for r in &all {
        probes.extend([r.timestamp_ms - 1, r.timestamp_ms, r.timestamp_ms + 1]);
    }
    for &t in &probes {
        assert_eq!(log.offset_for_time(t).unwrap(), expected(t), "t = {t}");
    }
    assert_eq!(log.offset_for_time(all[6].timestamp_ms).unwrap(), 6);
    log.close().await.unwrap();
    drop(log);
    let log = Log::open(dir.path(), cfg).unwrap();
    for &t in &probes {
        assert_eq!(
            log.offset_for_time(t).unwrap(),
            expected(t),
            "after reopen, t = {t}"
        );
    }
}

#[tokio::test]
async fn oversized_records_and_batches_are_refused() {
    let dir = TempDir::new("limits");
    let cfg = LogConfig {
        max_record_bytes: 200,
        max_batch_records: 4,
        max_batch_bytes: 500,
        ..small()
    };
    let log = Log::open(dir.path(), cfg).unwrap();
    log.append(vec![fixed(0)]).await.unwrap();
    let seg = segment_path(dir.path(), 0);
    let len = fs::metadata(&seg).unwrap().len();

    let big = Record::new(vec![0u8; 300]);
    let r = log.append(vec![fixed(1), big]).await;
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                what: Limit::RecordBytes { index: 1 },
                size: 338,
                limit: 200
            })
        ),
        "{r:?}"
    );
    let r = log.append((0..5).map(fixed).collect()).await;
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                what: Limit::BatchRecords,
                size: 5,
                limit: 4
            })
        ),
        "{r:?}"
    );
    let r = log.append((0..4).map(fixed).collect()).await;
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                what: Limit::BatchBytes,
                size: 552,
                limit: 500
            })
        ),
        "{r:?}"
    );
    assert!(!r.unwrap_err().retryable());
    assert!(matches!(
        log.append(Vec::new()).await,
        Err(Error::EmptyBatch)
    ));

    assert_eq!(log.next_offset(), 1);
    assert_eq!(fs::metadata(&seg).unwrap().len(), len);
    assert_eq!(log.stats().batches, 1);
    assert_eq!(log.append(vec![fixed(1)]).await.unwrap(), 1..2);
    assert_matches(&read_all(&log).await, 0, fixed);
}

#[tokio::test]
async fn subscribe_wakes_long_poll() {
    let dir = TempDir::new("watch");
    let log = Arc::new(Log::open(dir.path(), small()).unwrap());
    let mut rx = log.subscribe();
    let waiter = tokio::spawn(async move { *rx.wait_for(|&n| n >= 3).await.unwrap() });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    log.append((0..3).map(fixed).collect()).await.unwrap();
    assert_eq!(waiter.await.unwrap(), 3);
}

#[tokio::test]
async fn one_log_per_directory_and_bad_config() {
    let dir = TempDir::new("lock");
    let log = Log::open(dir.path(), small()).unwrap();
    let e = Log::open(dir.path(), small()).unwrap_err();
    assert!(
        matches!(e, Error::AlreadyOpen { .. }) && e.retryable(),
        "{e:?}"
    );
    log.close().await.unwrap();
    Log::open(dir.path(), small()).unwrap();

    let bad = LogConfig {
        max_batch_bytes: 10,
        ..small()
    };
    assert!(matches!(
        Log::open(dir.path(), bad),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn offset_store_round_trip_atomic_replace_and_corruption() {
    let dir = TempDir::new("offsets");
    let path = dir.path().join("offsets");
    let mut s = OffsetStore::open(&path).unwrap();
    assert_eq!(s.get("g", 0), None);
    s.commit("g", 0, 10).unwrap();
    s.commit_all([("g", 1, 20), ("other", 0, 5), ("g", 0, 11)])
        .unwrap();
    let s = OffsetStore::open(&path).unwrap();
    assert_eq!(s.get("g", 0), Some(11));
    assert_eq!(
        s.group("g").into_iter().collect::<Vec<_>>(),
        vec![(0, 11), (1, 20)]
    );
    assert_eq!(s.iter().count(), 3);
    let tmp = dir.path().join("offsets.tmp");
    assert!(!tmp.exists());

    // A crash between writing the temp file and renaming it leaves the old contents current.
    let before = fs::read(&path).unwrap();
    fs::write(&tmp, b"half-written").unwrap();
    let mut s = OffsetStore::open(&path).unwrap();
    assert!(!tmp.exists());
    assert_eq!(s.get("g", 1), Some(20));
    assert!(s.remove_group("other").unwrap());
    assert!(!s.remove_group("other").unwrap());
    assert_ne!(fs::read(&path).unwrap(), before);
    assert_eq!(OffsetStore::open(&path).unwrap().get("other", 0), None);

    // Two slots: the newest copy has `other` removed, the older one still has it.
    let good = fs::read(&path).unwrap();
    let half = good.len() / 2;
    let newest = if good[..8] == good[half..half + 8] {
        // Both slots written: the one whose sequence is higher.
        let seq = |at: usize| u64::from_le_bytes(good[at + 8..at + 16].try_into().unwrap());
        if seq(0) > seq(half) {
            0
        } else {
            half
        }
    } else {
        panic!("both slots should be in use after several commits")
    };
    let older = half - newest;
    // A torn or damaged newest slot: the older copy is taken (acked messages may
    // come again; nothing unacked is skipped).
    for damage in [0usize, 10, 30] {
        let mut b = good.clone();
        b[newest + damage] ^= 1;
        fs::write(&path, &b).unwrap();
        let s = OffsetStore::open(&path).unwrap();
        assert_eq!(s.get("other", 0), Some(5), "damage at {damage}");
        assert_eq!(s.get("g", 1), Some(20));
    }
    // Both slots damaged: a clear error naming the file.
    for damage in [0usize, 10, 30] {
        let mut b = good.clone();
        b[newest + damage] ^= 1;
        b[older + damage] ^= 1;
        fs::write(&path, &b).unwrap();
        let e = OffsetStore::open(&path).unwrap_err();
        assert!(
            matches!(&e, Error::CorruptFile { path: p, .. } if *p == path),
            "{e:?}"
        );
    }
    fs::write(&path, &good[..good.len() - 3]).unwrap();
    assert!(matches!(
        OffsetStore::open(&path),
        Err(Error::CorruptFile { .. })
    ));

    // Writes after the first go in place: the file keeps its inode and size.
    fs::write(&path, &good).unwrap();
    let mut s = OffsetStore::open(&path).unwrap();
    let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
    for i in 0..10 {
        s.commit("g", 0, 100 + i).unwrap();
    }
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&meta), ino);
    assert_eq!(meta.len(), good.len() as u64);
    assert_eq!(OffsetStore::open(&path).unwrap().get("g", 0), Some(109));

    // Offsets that outgrow a slot: the file is replaced with larger slots.
    let many: Vec<String> = (0..300)
        .map(|i| format!("group-with-a-long-name-{i}"))
        .collect();
    s.commit_all(many.iter().map(|g| (g.as_str(), 0, 7)))
        .unwrap();
    assert!(fs::metadata(&path).unwrap().len() > good.len() as u64);
    let s = OffsetStore::open(&path).unwrap();
    assert_eq!(s.iter().count(), 302);
    assert_eq!(s.get("g", 0), Some(109));
}

#[test]
fn offset_store_reads_the_first_format_and_rewrites_it() {
    let dir = TempDir::new("offsets-v1");
    let path = dir.path().join("offsets");
    // SHOFFS01: magic, count, (u32 len, group, u32 partition, u64 offset)..., CRC-32C.
    let mut v1 = b"SHOFFS01".to_vec();
    v1.extend(1u32.to_le_bytes());
    v1.extend(1u32.to_le_bytes());
    v1.extend(b"g");
    v1.extend(3u32.to_le_bytes());
    v1.extend(42u64.to_le_bytes());
    let crc = crc32c::crc32c(&v1);
    v1.extend(crc.to_le_bytes());
    fs::write(&path, &v1).unwrap();
    let mut s = OffsetStore::open(&path).unwrap();
    assert_eq!(s.get("g", 3), Some(42));
    s.commit("g", 3, 43).unwrap();
    let bytes = fs::read(&path).unwrap();
    let half = bytes.len() / 2;
    assert!(&bytes[..8] == b"SHOFFS02" || &bytes[half..half + 8] == b"SHOFFS02");
    assert_eq!(OffsetStore::open(&path).unwrap().get("g", 3), Some(43));
}

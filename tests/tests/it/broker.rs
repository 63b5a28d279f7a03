//! The embedded broker as it runs in production: inside a `shoal control-plane`
//! process, killed with SIGKILL under load and restarted on the same data folder
//! and ports. Every acknowledged publish must come back, byte for byte; a segment
//! cut in the middle of a record (a torn write) must be repaired on start.

use shoal_broker::EmbeddedBus;
use shoal_bus::{Bus, Consumer, Delivery, OutgoingMessage, SubscribeOptions, TopicSpec};
use shoal_tests::{bin_dir, build_binaries, temp_dir, ChildGuard};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest any wait in these tests lasts.
const WAIT: Duration = Duration::from_secs(60);

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A control plane process on fixed ports and a fixed data folder, so a restart
/// comes back where the first one was.
pub(crate) struct ControlPlane {
    dir: PathBuf,
    system: PathBuf,
    /// Its HTTP address (the registry, `/v1/broker`).
    pub(crate) http: SocketAddr,
    broker: SocketAddr,
    child: Option<ChildGuard>,
    starts: u32,
}

impl ControlPlane {
    pub(crate) fn new(tag: &str) -> Self {
        let dir = temp_dir(tag);
        let (http, broker) = (free_port(), free_port());
        let system = dir.join("shoal.toml");
        std::fs::write(
            &system,
            format!(
                r#"[control_plane]
listen = "127.0.0.1:{http}"
data_dir = "{data}"
log_level = "warn"
[control_plane.broker]
listen = "127.0.0.1:{broker}"
"#,
                data = dir.join("cp").display()
            ),
        )
        .unwrap();
        Self {
            dir,
            system,
            http: SocketAddr::from(([127, 0, 0, 1], http)),
            broker: SocketAddr::from(([127, 0, 0, 1], broker)),
            child: None,
            starts: 0,
        }
    }

    pub(crate) fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("cp-{}.log", self.starts))).unwrap();
        let child = Command::new(bin_dir().join("shoal"))
            .arg("control-plane")
            .arg("--system")
            .arg(&self.system)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start shoal control-plane");
        self.child = Some(ChildGuard(child));
    }

    /// SIGKILL, and wait until the process is gone.
    pub(crate) fn kill(&mut self) {
        let mut g = self.child.take().expect("running");
        g.0.kill().unwrap();
        g.0.wait().unwrap();
    }

    /// A client, once the broker answers.
    pub(crate) async fn bus(&self) -> EmbeddedBus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match EmbeddedBus::connect(self.broker).await {
                Ok(b) => return b,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "broker at {} never answered ({e}); logs in {}",
                    self.broker,
                    self.dir.display()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn segment(&self, topic: &str, partition: u32) -> PathBuf {
        self.dir
            .join("cp/broker/topics")
            .join(topic)
            .join(partition.to_string())
            .join("00000000000000000000.log")
    }
}

/// FNV-1a 64: the checksum recorded for every acknowledged payload.
fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The payload of message `id`: its length and bytes follow from the id, so any
/// message read back can be checked, acknowledged or not.
fn payload(id: &str) -> Vec<u8> {
    let mut x = checksum(id.as_bytes()) | 1;
    let len = 16 + (x % 3000) as usize;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn message(id: String, key: &str) -> OutgoingMessage {
    OutgoingMessage::new(payload(&id)).with_id(id).with_key(key)
}

async fn next(c: &mut Box<dyn Consumer>) -> Delivery {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, c.next()).await {
            Ok(Ok(d)) => return d,
            // A connection that was cut by the restart: the next call reconnects.
            Ok(Err(e)) if e.is_retryable() => continue,
            Ok(Err(e)) => panic!("next delivery: {e}"),
            Err(_) => panic!("no delivery within {WAIT:?}"),
        }
    }
}

/// Several publishers, two connections, batches of 1 to 8, until `stop` or the
/// first error (the kill). Returns id → checksum of every acknowledged message.
async fn publish_load(
    buses: Vec<EmbeddedBus>,
    topic: &str,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashMap<String, u64>>>,
) -> Vec<tokio::task::JoinHandle<(u64, u64)>> {
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let bus = buses[t as usize % buses.len()].clone();
        let topic = topic.to_owned();
        let stop = stop.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            // Bounded: the kill comes long before this.
            for i in 0..5_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let batch: Vec<OutgoingMessage> = (0..1 + (i + t) % 8)
                    .map(|j| message(format!("t{t}-b{i}-m{j}"), &format!("key-{}", (i + j) % 13)))
                    .collect();
                let ids: Vec<(String, u64)> = batch
                    .iter()
                    .map(|m| (m.id.clone(), checksum(&m.payload)))
                    .collect();
                match bus.publish(&topic, batch).await {
                    Ok(p) => {
                        assert_eq!(p.len(), ids.len());
                        ok += 1;
                        acked.lock().unwrap().extend(ids);
                    }
                    Err(e) => {
                        // The broker died: the outcome of this batch is unknown.
                        assert!(e.is_retryable(), "{e}");
                        failed += 1;
                        break;
                    }
                }
            }
            (ok, failed)
        }));
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_publish_survives_kill_9_of_the_control_plane() {
    build_binaries();
    let mut cp = ControlPlane::new("broker-kill");
    cp.start();
    let bus = cp.bus().await;
    bus.create_topic(&TopicSpec::new("crash", 4)).await.unwrap();

    let acked = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let second = cp.bus().await;
    let tasks = publish_load(vec![bus, second], "crash", stop.clone(), acked.clone()).await;

    // Kill it mid-load, once a good number of publishes are acknowledged.
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked.lock().unwrap().len() < 3_000 {
        assert!(tokio::time::Instant::now() < deadline, "load too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cp.kill();
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap().1;
    }
    stop.store(true, Ordering::SeqCst);
    assert_eq!(failed, 6, "a publisher ran out of work before the kill");
    let acked = acked.lock().unwrap().clone();

    cp.start();
    let bus = cp.bus().await;
    // Everything, from the start, in one group.
    let mut c = bus
        .subscribe("crash", "verify", SubscribeOptions::default())
        .await
        .unwrap();
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut last_offset: HashMap<u32, u64> = HashMap::new();
    let mut found = 0;
    while found < acked.len() {
        let d = next(&mut c).await;
        let m = &d.message;
        // Acknowledged or not, what is stored is what was sent.
        assert_eq!(
            m.payload.as_ref(),
            payload(&m.id).as_slice(),
            "message {} at {}/{} is damaged",
            m.id,
            m.partition,
            m.offset
        );
        if let Some(prev) = last_offset.insert(m.partition, m.offset) {
            assert!(m.offset > prev, "partition {} went back", m.partition);
        }
        if seen.insert(m.id.clone(), checksum(&m.payload)).is_none() && acked.contains_key(&m.id) {
            found += 1;
        }
        c.ack(&d).await.unwrap();
    }
    let mut checked = 0;
    for (id, sum) in &acked {
        assert_eq!(seen.get(id), Some(sum), "message {id}");
        checked += 1;
    }
    assert!(checked >= 3_000, "checked {checked}");
    eprintln!(
        "{checked} acknowledged messages came back after kill -9; {} stored in all",
        seen.len()
    );

    // And it carries on.
    let p = bus
        .publish("crash", vec![message("after".into(), "key-0")])
        .await
        .unwrap();
    // Stored but unacknowledged messages may still come first.
    loop {
        let d = next(&mut c).await;
        if d.message.id == "after" {
            assert_eq!(
                (d.message.partition, d.message.offset),
                (p[0].partition, p[0].offset)
            );
            break;
        }
        assert_eq!(
            d.message.payload.as_ref(),
            payload(&d.message.id).as_slice()
        );
        c.ack(&d).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_cut_inside_its_last_record_is_repaired_on_restart() {
    build_binaries();
    let mut cp = ControlPlane::new("broker-torn");
    cp.start();
    let bus = cp.bus().await;
    bus.create_topic(&TopicSpec::new("torn", 1)).await.unwrap();
    for i in 0..50 {
        let p = bus
            .publish("torn", vec![message(format!("m{i}"), "k")])
            .await
            .unwrap();
        assert_eq!(p[0].offset, i);
    }
    cp.kill();

    // A torn write: the last record loses its tail.
    // The killed broker left its preallocated zeros after the records: the data
    // ends at the last non-zero byte (every record ends with its payload).
    let seg = cp.segment("torn", 0);
    let bytes = std::fs::read(&seg).unwrap();
    let len = bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 7).unwrap();
    f.sync_all().unwrap();
    drop(f);

    cp.start();
    let bus = cp.bus().await;
    let mut c = bus
        .subscribe("torn", "g", SubscribeOptions::default())
        .await
        .unwrap();
    for i in 0..49u64 {
        let d = next(&mut c).await;
        assert_eq!(d.message.offset, i);
        assert_eq!(d.message.id, format!("m{i}"));
        assert_eq!(
            d.message.payload.as_ref(),
            payload(&d.message.id).as_slice()
        );
        c.ack(&d).await.unwrap();
    }
    // The torn record is gone, the rest is whole, and appends resume at its offset.
    assert_eq!(bus.lag("torn", "g").await.unwrap(), 0);
    let p = bus
        .publish("torn", vec![message("new".into(), "k")])
        .await
        .unwrap();
    assert_eq!(p[0].offset, 49);
    let d = next(&mut c).await;
    assert_eq!(d.message.id, "new");
    assert_repair_logged(&cp.dir);
}

/// The second start's log says it cut the tail.
fn assert_repair_logged(dir: &Path) {
    let log = std::fs::read_to_string(dir.join("cp-2.log")).unwrap();
    assert!(log.contains("torn tail"), "no repair logged:\n{log}");
}

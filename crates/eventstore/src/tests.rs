//! The conformance suite: what every backend must do. Every case runs twice, on a
//! SQLite file and on a real PostgreSQL server (`shoal_testkit::postgres`), each
//! time on a fresh database of its own.

use crate::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use shoal_core::ErrorKind;
use shoal_db::Db;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

fn temp_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "shoal-es-{tag}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("events.db")
}

/// Which backend a case runs on.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A new, empty database: a SQLite file, or a database on the test PostgreSQL.
async fn fresh_url(kind: Kind) -> String {
    match kind {
        Kind::Sqlite => format!("sqlite://{}", temp_path("store").display()),
        Kind::Postgres => shoal_testkit::postgres::fresh_database().await,
    }
}

async fn fresh_db(kind: Kind) -> Db {
    Db::open(&shoal_db::DbOptions::new(fresh_url(kind).await), &[])
        .await
        .unwrap()
}

async fn fresh_with(kind: Kind, upcasters: Upcasters) -> EventStore {
    EventStore::open(&fresh_db(kind).await, upcasters)
        .await
        .unwrap()
}

async fn fresh(kind: Kind) -> EventStore {
    fresh_with(kind, Upcasters::new()).await
}

fn ev(t: &str, n: i64) -> NewEvent {
    NewEvent::new(t, 1, &json!({ "n": n })).unwrap()
}

async fn appends_and_reads_both_ways_with_metadata(k: Kind) {
    let s = fresh(k).await;
    let meta = Metadata {
        correlation_id: Some("c-1".into()),
        causation_id: Some("m-7".into()),
        extra: [("user".to_string(), "alice".to_string())].into(),
    };
    let a = s
        .append(
            "order-1",
            ExpectedVersion::NoStream,
            vec![ev("Placed", 1).with_metadata(meta.clone()), ev("Paid", 2)],
        )
        .await
        .unwrap();
    assert_eq!(
        a,
        Appended {
            version: 2,
            position: 2
        }
    );
    s.append("order-2", ExpectedVersion::Any, vec![ev("Placed", 3)])
        .await
        .unwrap();
    let b = s
        .append("order-1", ExpectedVersion::Exact(2), vec![ev("Shipped", 4)])
        .await
        .unwrap();
    assert_eq!(
        b,
        Appended {
            version: 3,
            position: 4
        }
    );
    assert_eq!(s.stream_version("order-1").await.unwrap(), 3);
    assert_eq!(s.stream_version("nobody").await.unwrap(), 0);

    let fwd = s
        .read_stream("order-1", 1, Direction::Forwards, 100)
        .await
        .unwrap();
    let types: Vec<_> = fwd.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["Placed", "Paid", "Shipped"]);
    assert_eq!(fwd.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(
        fwd.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 4]
    );
    assert_eq!(fwd[0].metadata, meta);
    assert_eq!(fwd[0].data, json!({"n": 1}));
    assert!(fwd[0].recorded_at_ms > 0);
    let back = s
        .read_stream("order-1", u64::MAX, Direction::Backwards, 2)
        .await
        .unwrap();
    assert_eq!(back.iter().map(|e| e.version).collect::<Vec<_>>(), [3, 2]);
    let from2 = s
        .read_stream("order-1", 2, Direction::Forwards, 1)
        .await
        .unwrap();
    assert_eq!(from2[0].event_type, "Paid");

    let all = s.read_all(0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    let after = s.read_all(2, 100).await.unwrap();
    assert_eq!(after.iter().map(|e| e.position).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(s.head(), 4);
}

async fn expected_versions_are_enforced_with_a_typed_conflict(k: Kind) {
    let s = fresh(k).await;
    s.append("a", ExpectedVersion::NoStream, vec![ev("X", 1)])
        .await
        .unwrap();
    let e = s
        .append("a", ExpectedVersion::NoStream, vec![ev("X", 2)])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(
        e.to_string()
            .contains("expected no stream, but it is at version 1"),
        "{e}"
    );
    let e = s
        .append("a", ExpectedVersion::Exact(5), vec![ev("X", 2)])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("expected version 5"), "{e}");
    let e = s
        .append("b", ExpectedVersion::Exact(1), vec![ev("X", 2)])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    // Nothing of the refused appends was written.
    assert_eq!(s.read_all(0, 10).await.unwrap().len(), 1);
    s.append("a", ExpectedVersion::Exact(1), vec![ev("X", 2)])
        .await
        .unwrap();
    s.append("a", ExpectedVersion::Any, vec![ev("X", 3)])
        .await
        .unwrap();
    assert_eq!(s.stream_version("a").await.unwrap(), 3);
}

async fn a_repeated_append_is_recognised_and_writes_nothing(k: Kind) {
    let s = fresh(k).await;
    let events = vec![ev("X", 1), ev("Y", 2)];
    let first = s
        .append("a", ExpectedVersion::NoStream, events.clone())
        .await
        .unwrap();
    // The answer was lost; the client sends the same append again.
    let again = s
        .append("a", ExpectedVersion::NoStream, events.clone())
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(s.read_all(0, 10).await.unwrap().len(), 2);
    // Recognised however much the stream grew since: an append that expected a
    // version is looked for where it would have put its events.
    for i in 0..200 {
        s.append("a", ExpectedVersion::Any, vec![ev("More", i)])
            .await
            .unwrap();
    }
    let again = s
        .append("a", ExpectedVersion::NoStream, events.clone())
        .await
        .unwrap();
    assert_eq!(first, again);
    let pq = vec![ev("P", 1), ev("Q", 2)];
    let at_2 = s
        .append("a", ExpectedVersion::Exact(202), pq.clone())
        .await
        .unwrap();
    for i in 0..100 {
        s.append("a", ExpectedVersion::Any, vec![ev("More", i)])
            .await
            .unwrap();
    }
    let again = s
        .append("a", ExpectedVersion::Exact(202), pq)
        .await
        .unwrap();
    assert_eq!(at_2, again);
    // A repeat of only part of an append is a conflict, and writes nothing.
    let e = s
        .append(
            "a",
            ExpectedVersion::NoStream,
            vec![events[0].clone(), ev("New", 1)],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert!(e.to_string().contains("repeats stored event ids"), "{e}");
    assert_eq!(s.stream_version("a").await.unwrap(), 304);
    // An append expecting any version, sent again: recognised while it is the
    // stream's latest append.
    let batch = vec![ev("W", 1), ev("W", 2), ev("W", 3)];
    s.append("w", ExpectedVersion::Any, vec![ev("Before", 0)])
        .await
        .unwrap();
    let first = s
        .append("w", ExpectedVersion::Any, batch.clone())
        .await
        .unwrap();
    let again = s
        .append("w", ExpectedVersion::Any, batch.clone())
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(s.stream_version("w").await.unwrap(), 4);
    // An id reused in the middle of an append that is not a repeat: refused whole,
    // the rest of the store untouched, and appends committed with it in one group
    // still land.
    let reuse = vec![ev("Z", 1), batch[2].clone()];
    let others: Vec<_> = (0..4)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.append("c", ExpectedVersion::Any, vec![ev("C", i)]).await })
        })
        .collect();
    let e = s
        .append("w", ExpectedVersion::Any, reuse)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e:?}");
    for o in others {
        o.await.unwrap().unwrap();
    }
    assert_eq!(s.stream_version("w").await.unwrap(), 4);
    assert_eq!(s.stream_version("c").await.unwrap(), 4);
    let all = s.read_all(0, 1_000).await.unwrap();
    assert_positions_have_no_gaps(&all);
}

/// What is not recognised, as documented: ids are not unique across streams, and
/// an append expecting any version sent again after another append to its stream
/// is a new append.
async fn ids_are_checked_only_where_a_repeat_would_be(k: Kind) {
    let s = fresh(k).await;
    let one = vec![ev("X", 1)];
    s.append("a", ExpectedVersion::Any, one.clone())
        .await
        .unwrap();
    // The same id in another stream is stored again there.
    let b = s
        .append("b", ExpectedVersion::Any, one.clone())
        .await
        .unwrap();
    assert_eq!(b.version, 1);
    s.append("a", ExpectedVersion::Any, vec![ev("More", 1)])
        .await
        .unwrap();
    // Another append came between: appended again.
    let again = s
        .append("a", ExpectedVersion::Any, one.clone())
        .await
        .unwrap();
    assert_eq!(again.version, 3);
    let all = s.read_all(0, 1_000).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_positions_have_no_gaps(&all);
}

/// A database made by a build of schema 1 (a unique index on the event id) is
/// brought to the current schema when the store opens it: every event kept at its
/// position, the index gone, appends going on after the head.
async fn tables_of_schema_1_are_brought_up_to_date_and_keep_every_event(k: Kind) {
    let db = fresh_db(k).await;
    let (int, old) = match k {
        Kind::Sqlite => ("INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT"),
        Kind::Postgres => ("BIGINT", "BIGINT PRIMARY KEY"),
    };
    let v1 = format!(
        "CREATE TABLE _shoal_es_events (
            position {old}, stream TEXT NOT NULL, version {int} NOT NULL,
            id TEXT NOT NULL UNIQUE, event_type TEXT NOT NULL, type_version {int} NOT NULL,
            data TEXT NOT NULL, metadata TEXT NOT NULL, recorded_at_ms {int} NOT NULL,
            UNIQUE (stream, version));
         CREATE TABLE _shoal_es_snapshots (stream TEXT PRIMARY KEY, version {int} NOT NULL,
            data TEXT NOT NULL, recorded_at_ms {int} NOT NULL);
         CREATE TABLE _shoal_es_checkpoints (projection TEXT PRIMARY KEY, position {int} NOT NULL);
         INSERT INTO _shoal_es_events VALUES
            (1, 'a', 1, 'id-1', 'X', 1, '{{\"n\":1}}', '{{}}', 5),
            (2, 'b', 1, 'id-2', 'X', 1, '{{\"n\":2}}', '{{}}', 5),
            (3, 'a', 2, 'id-3', 'X', 1, '{{\"n\":3}}', '{{}}', 5);"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(v1))
        .execute(db.pool())
        .await
        .unwrap();
    let s = EventStore::open(&db, Upcasters::new()).await.unwrap();
    assert_eq!(s.head(), 3);
    let all = s.read_all(0, 10).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|e| (e.position, e.stream.as_str(), e.version, e.id.as_str()))
            .collect::<Vec<_>>(),
        [
            (1, "a", 1, "id-1"),
            (2, "b", 1, "id-2"),
            (3, "a", 2, "id-3")
        ]
    );
    assert_eq!(all[2].data, json!({"n": 3}));
    // Stream a's events, apart in the global order, are found both ways.
    let versions = |events: Vec<RecordedEvent>| {
        events
            .iter()
            .map(|e| (e.version, e.position))
            .collect::<Vec<_>>()
    };
    let a = s
        .read_stream("a", 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert_eq!(versions(a), [(1, 1), (2, 3)]);
    let a = s
        .read_stream("a", u64::MAX, Direction::Backwards, 10)
        .await
        .unwrap();
    assert_eq!(versions(a), [(2, 3), (1, 1)]);
    assert_eq!(s.stream_version("b").await.unwrap(), 1);
    // A retry of the append that wrote a:2 is recognised through the versions.
    let retry = NewEvent {
        id: "id-3".into(),
        ..ev("X", 3)
    };
    let again = s
        .append("a", ExpectedVersion::Exact(1), vec![retry])
        .await
        .unwrap();
    assert_eq!((again.version, again.position), (2, 3));
    let next = s
        .append("a", ExpectedVersion::Exact(2), vec![ev("Y", 4)])
        .await
        .unwrap();
    assert_eq!((next.version, next.position), (3, 4));
    let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _shoal_es_schema")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(version, current_schema(k));
    // The event id index is gone: the same id again in another stream is taken.
    let dup = NewEvent {
        id: "id-1".into(),
        ..ev("X", 5)
    };
    s.append("c", ExpectedVersion::NoStream, vec![dup])
        .await
        .unwrap();
    // Opening again changes nothing.
    drop(s);
    let s = EventStore::open(&db, Upcasters::new()).await.unwrap();
    assert_eq!(s.head(), 5);
    let next = s
        .append("a", ExpectedVersion::Any, vec![ev("Y", 6)])
        .await
        .unwrap();
    assert_eq!(next.position, 6);
}

async fn appends_grouped_into_one_commit_are_each_decided_as_if_alone(k: Kind) {
    let s = fresh(k).await;
    s.append("g", ExpectedVersion::NoStream, vec![ev("E", 0)])
        .await
        .unwrap();
    // Many appends at once, expecting version 1 of the same stream: one wins;
    // appends to other streams all land; a repeat of the winner answers as it did.
    let same = ev("E", 1);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let s = s.clone();
            let same = same.clone();
            tokio::spawn(async move {
                let r = match i % 4 {
                    0 => {
                        s.append("g", ExpectedVersion::Exact(1), vec![ev("E", i)])
                            .await
                    }
                    1 => s.append("g", ExpectedVersion::Exact(1), vec![same]).await,
                    _ => s
                        .append(
                            &format!("o-{i}"),
                            ExpectedVersion::NoStream,
                            vec![ev("E", i), ev("E", i)],
                        )
                        .await
                        .map(|_| Appended {
                            version: 0,
                            position: 0,
                        }),
                };
                (i % 4 < 2, r)
            })
        })
        .collect();
    let mut wins_on_g = std::collections::HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            (true, Ok(a)) => {
                wins_on_g.insert(a);
            }
            (true, Err(e)) => assert_eq!(e.kind(), ErrorKind::Conflict),
            (false, r) => {
                r.unwrap();
            }
        }
    }
    assert_eq!(s.stream_version("g").await.unwrap(), 2);
    // Every success that put version 2 on "g" reports the same append.
    assert_eq!(wins_on_g.len(), 1, "{wins_on_g:?}");
    let all = s.read_all(0, 1_000).await.unwrap();
    assert_eq!(all.len(), 1 + 1 + 16 * 2);
    assert_positions_have_no_gaps(&all);
    for e in &all {
        let v = s
            .read_stream(&e.stream, e.version, Direction::Forwards, 1)
            .await
            .unwrap();
        assert_eq!(v[0].position, e.position);
    }
}

async fn eight_writers_on_one_stream_one_wins_per_version_and_nothing_has_gaps(k: Kind) {
    let s = fresh(k).await;
    let wins = Arc::new(AtomicU32::new(0));
    let conflicts = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        let wins = wins.clone();
        let conflicts = conflicts.clone();
        tasks.push(tokio::spawn(async move {
            // Each writer tries to put its own event at each next version.
            for _ in 0..40 {
                let v = s.stream_version("hot").await.unwrap();
                let expected = if v == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(v)
                };
                match s.append("hot", expected, vec![ev("W", w)]).await {
                    Ok(a) => {
                        assert_eq!(a.version, v + 1);
                        wins.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) if e.kind() == ErrorKind::Conflict => {
                        conflicts.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let events = s
        .read_stream("hot", 1, Direction::Forwards, 10_000)
        .await
        .unwrap();
    let n = wins.load(Ordering::SeqCst) as u64;
    assert_eq!(events.len() as u64, n);
    assert_eq!(n + conflicts.load(Ordering::SeqCst) as u64, 8 * 40);
    // Versions 1..=n, each once; positions 1..=n, each once.
    assert!(events
        .iter()
        .enumerate()
        .all(|(i, e)| e.version == i as u64 + 1));
    let all = s.read_all(0, 10_000).await.unwrap();
    assert_positions_have_no_gaps(&all);
}

async fn readers_never_see_a_gap_while_writers_commit(k: Kind) {
    let s = fresh(k).await;
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    s.append(&format!("s-{w}"), ExpectedVersion::Any, vec![ev("E", i)])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    // A reader following the global order sees every position, in order, once.
    let mut sub = s.subscribe(0);
    let mut expect = 1;
    while expect <= 16 * 50 {
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), sub.next())
            .await
            .expect("the subscription keeps up")
            .unwrap();
        assert_eq!(e.position, expect);
        expect += 1;
    }
    for w in writers {
        w.await.unwrap();
    }
}

/// Four stores on one database, as four replicas of a service would have (each its
/// own pools and writer, so their transactions really are concurrent), and a
/// reader in a fifth: the global order it follows has no gaps and no repeats.
async fn replicas_writing_at_once_leave_no_gap_a_reader_can_see(k: Kind) {
    let url = fresh_url(k).await;
    let mut stores = Vec::new();
    for _ in 0..5 {
        let db = Db::open(&shoal_db::DbOptions::new(url.clone()), &[])
            .await
            .unwrap();
        stores.push(EventStore::open(&db, Upcasters::new()).await.unwrap());
    }
    let reader = stores.pop().unwrap();
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let s = stores[w % 4].clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    s.append(&format!("r-{w}"), ExpectedVersion::Any, vec![ev("E", i)])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut sub = reader.subscribe(0);
    let mut seen = HashSet::new();
    for expect in 1..=16 * 25 {
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), sub.next())
            .await
            .expect("the subscription keeps up")
            .unwrap();
        assert_eq!(e.position, expect);
        assert!(seen.insert(e.id.clone()), "event {} seen twice", e.id);
    }
    for w in writers {
        w.await.unwrap();
    }
    // Every stream's versions run 1..=25 without a gap.
    for w in 0..16 {
        let events = reader
            .read_stream(&format!("r-{w}"), 1, Direction::Forwards, 100)
            .await
            .unwrap();
        let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
        assert_eq!(versions, (1..=25).collect::<Vec<u64>>());
    }
}

async fn a_subscription_catches_up_then_goes_live(k: Kind) {
    let s = fresh(k).await;
    for i in 0..3 {
        s.append("a", ExpectedVersion::Any, vec![ev("E", i)])
            .await
            .unwrap();
    }
    let mut sub = s.subscribe(1);
    assert_eq!(sub.next().await.unwrap().position, 2);
    assert_eq!(sub.next().await.unwrap().position, 3);
    let waiting = tokio::spawn(async move { sub.next().await.map(|e| e.position) });
    tokio::task::yield_now().await;
    s.append("b", ExpectedVersion::Any, vec![ev("E", 9)])
        .await
        .unwrap();
    let live = tokio::time::timeout(std::time::Duration::from_secs(2), waiting)
        .await
        .expect("a live event arrives at once")
        .unwrap()
        .unwrap();
    assert_eq!(live, 4);
}

async fn snapshots_keep_the_newest(k: Kind) {
    let s = fresh(k).await;
    assert_eq!(s.load_snapshot("a").await.unwrap(), None);
    s.save_snapshot("a", 10, &json!({"total": 10}))
        .await
        .unwrap();
    s.save_snapshot("a", 5, &json!({"total": 5})).await.unwrap();
    let snap = s.load_snapshot("a").await.unwrap().unwrap();
    assert_eq!(snap.version, 10);
    assert_eq!(snap.data, json!({"total": 10}));
}

async fn old_event_shapes_are_upcast_on_read(k: Kind) {
    let s = fresh_with(
        k,
        Upcasters::new().add("Placed", 1, |mut v| {
            v["currency"] = json!("EUR");
            Ok(v)
        }),
    )
    .await;
    s.append(
        "a",
        ExpectedVersion::Any,
        vec![NewEvent::new("Placed", 1, &json!({"cents": 5})).unwrap()],
    )
    .await
    .unwrap();
    s.append(
        "a",
        ExpectedVersion::Any,
        vec![NewEvent::new("Placed", 2, &json!({"cents": 7, "currency": "USD"})).unwrap()],
    )
    .await
    .unwrap();
    let events = s
        .read_stream("a", 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert_eq!(events[0].type_version, 2);
    assert_eq!(events[0].data, json!({"cents": 5, "currency": "EUR"}));
    assert_eq!(events[1].data, json!({"cents": 7, "currency": "USD"}));
}

async fn bad_input_gets_a_clear_error_and_writes_nothing(k: Kind) {
    let s = fresh(k).await;
    let big = NewEvent::new(
        "Big",
        1,
        &json!({"blob": "x".repeat(limits::MAX_EVENT_BYTES)}),
    )
    .unwrap();
    let e = s
        .append("a", ExpectedVersion::Any, vec![big])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("the limit is"), "{e}");
    for stream in ["", "has space", &"x".repeat(201)] {
        let e = s
            .append(stream, ExpectedVersion::Any, vec![ev("X", 1)])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{stream:?}");
    }
    let e = s
        .append("a", ExpectedVersion::Any, vec![])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(s.read_all(0, 10).await.unwrap().is_empty());
    assert_eq!(s.head(), 0);
}

#[tokio::test]
async fn a_corrupt_database_file_is_named_as_such() {
    let path = temp_path("corrupt");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let url = format!("sqlite://{}", path.display());
    let e = match Db::open(&shoal_db::DbOptions::new(url), &[]).await {
        Err(e) => e.to_string(),
        Ok(db) => EventStore::open(&db, Upcasters::new())
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    };
    assert!(e.contains("corrupt") || e.contains("not a database"), "{e}");
    assert!(e.contains("events.db"), "{e}");
}

#[derive(Default, Serialize, Deserialize, Debug)]
struct Counter {
    total: i64,
    seen: u64,
}

#[derive(Serialize, Deserialize)]
enum CounterEvent {
    Added(i64),
}

impl Aggregate for Counter {
    type Event = CounterEvent;
    const KIND: &'static str = "counter";
    const SNAPSHOT_EVERY: u64 = 10;

    fn event_type(_: &CounterEvent) -> &'static str {
        "Added"
    }

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added(n) = event;
        self.total += n;
        self.seen += 1;
    }
}

async fn aggregates_retry_on_conflict_and_snapshots_match_replay(k: Kind) {
    let s = fresh(k).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    s.execute::<Counter, _>("c1", Metadata::default(), |_| {
                        Ok(vec![CounterEvent::Added(1)])
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let loaded = s.load::<Counter>("c1").await.unwrap();
    assert_eq!(loaded.state.total, 80);
    assert_eq!(loaded.version, 80);
    let snap = s.load_snapshot("counter-c1").await.unwrap().unwrap();
    assert_eq!(snap.version % 10, 0);
    // Replaying every event gives the same state as snapshot plus tail.
    let mut replayed = Counter::default();
    for e in s
        .read_stream("counter-c1", 1, Direction::Forwards, 1_000)
        .await
        .unwrap()
    {
        replayed.apply(&e.decode().unwrap());
    }
    assert_eq!(replayed.total, loaded.state.total);
    // A decision can refuse: nothing is appended.
    let e = s
        .execute::<Counter, _>("c1", Metadata::default(), |c| {
            if c.total >= 80 {
                Err(shoal_core::Error::new(
                    ErrorKind::Conflict,
                    shoal_core::Origin::Downstream,
                    "full",
                ))
            } else {
                Ok(vec![])
            }
        })
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "full");
    assert_eq!(s.stream_version("counter-c1").await.unwrap(), 80);
}

/// Counts events per stream into a table; can be told to stall after applying an
/// event, to be cut off between its read-model write and its checkpoint.
struct PerStream {
    stall_at: Option<u64>,
    stalled: Arc<tokio::sync::Notify>,
}

impl Projection for PerStream {
    fn name(&self) -> &str {
        "per_stream"
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut sqlx::AnyConnection,
        event: &'a RecordedEvent,
    ) -> ProjectionFuture<'a> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO per_stream (stream, n) VALUES ($1, 1)
                 ON CONFLICT (stream) DO UPDATE SET n = per_stream.n + 1",
            )
            .bind(&event.stream)
            .execute(&mut *tx)
            .await
            .map_err(|e| shoal_core::Error::internal("read model").with_source(e))?;
            if self.stall_at == Some(event.position) {
                self.stalled.notify_one();
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    }

    fn reset<'a>(&'a self, tx: &'a mut sqlx::AnyConnection) -> ProjectionFuture<'a> {
        Box::pin(async move {
            sqlx::query("DELETE FROM per_stream")
                .execute(&mut *tx)
                .await
                .map_err(|e| shoal_core::Error::internal("read model").with_source(e))?;
            Ok(())
        })
    }
}

async fn read_model(s: &EventStore) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT stream, n FROM per_stream ORDER BY stream")
        .fetch_all(s.db().pool())
        .await
        .unwrap()
}

async fn a_projection_cut_off_mid_batch_applies_nothing_twice_and_rebuilds_the_same(k: Kind) {
    let s = fresh(k).await;
    sqlx::query("CREATE TABLE per_stream (stream TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(s.db().pool())
        .await
        .unwrap();
    for i in 0..30 {
        s.append(
            &format!("s-{}", i % 3),
            ExpectedVersion::Any,
            vec![ev("E", i)],
        )
        .await
        .unwrap();
    }
    // A runner that stalls after writing event 17's read-model row, inside its
    // batch's transaction; it is then cut off (its task aborted), as a crash would.
    let stalled = Arc::new(tokio::sync::Notify::new());
    let stalling = ProjectionRunner::new(
        s.clone(),
        Arc::new(PerStream {
            stall_at: Some(17),
            stalled: stalled.clone(),
        }),
        8,
    );
    let task = tokio::spawn(async move { stalling.catch_up().await });
    stalled.notified().await;
    task.abort();
    let _ = task.await;

    let runner = ProjectionRunner::new(
        s.clone(),
        Arc::new(PerStream {
            stall_at: None,
            stalled: Arc::new(tokio::sync::Notify::new()),
        }),
        8,
    );
    // Batches of 8: events 1..=16 were committed with their checkpoint; 17's batch
    // was rolled back with it.
    assert_eq!(runner.checkpoint().await.unwrap(), 16);
    assert_eq!(runner.lag().await.unwrap(), 14);
    runner.catch_up().await.unwrap();
    assert_eq!(runner.checkpoint().await.unwrap(), 30);
    let incremental = read_model(&s).await;
    assert_eq!(
        incremental,
        vec![("s-0".into(), 10), ("s-1".into(), 10), ("s-2".into(), 10)]
    );
    assert_eq!(runner.rebuild().await.unwrap(), 30);
    assert_eq!(read_model(&s).await, incremental);
    let streams: HashSet<_> = incremental.iter().map(|(s, _)| s.clone()).collect();
    assert_eq!(streams.len(), 3);
}

async fn a_cache_forgets_what_an_event_says_changed(k: Kind) {
    let s = fresh(k).await;
    let cache: ReadThrough<String, i64> =
        ReadThrough::new(std::time::Duration::from_secs(3600), 100);
    let _follow = cache.invalidate_on(&s, |e| Some(e.stream.clone()));
    cache
        .get_or_load("price-p1".to_string(), || async { Ok(100) })
        .await
        .unwrap();
    cache
        .get_or_load("price-p2".to_string(), || async { Ok(200) })
        .await
        .unwrap();
    s.append(
        "price-p1",
        ExpectedVersion::Any,
        vec![ev("PriceChanged", 120)],
    )
    .await
    .unwrap();
    let forgotten = async {
        while cache.get(&"price-p1".to_string()).is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), forgotten)
        .await
        .expect("the event invalidates the entry");
    assert_eq!(cache.get(&"price-p2".to_string()), Some(200));
}

async fn a_running_projection_keeps_up_and_reports_its_lag(k: Kind) {
    let s = fresh(k).await;
    sqlx::query("CREATE TABLE per_stream (stream TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(s.db().pool())
        .await
        .unwrap();
    let metrics = shoal_telemetry::Metrics::new("test");
    let runner = ProjectionRunner::new(
        s.clone(),
        Arc::new(PerStream {
            stall_at: None,
            stalled: Arc::new(tokio::sync::Notify::new()),
        }),
        100,
    )
    .with_metrics(&metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(runner.clone().run(async {
        let _ = stopped.await;
    }));
    for i in 0..5 {
        s.append("live", ExpectedVersion::Any, vec![ev("E", i)])
            .await
            .unwrap();
    }
    let caught_up = async {
        while runner.checkpoint().await.unwrap() < 5 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), caught_up)
        .await
        .expect("the live runner applies new events");
    assert_eq!(read_model(&s).await, vec![("live".to_string(), 5)]);
    let text = metrics.render();
    assert!(
        text.contains("shoal_eventstore_projection_applied_total{"),
        "{text}"
    );
    assert!(text.contains("shoal_eventstore_projection_lag{"), "{text}");
    let _ = stop.send(());
    running.await.unwrap();
}

/// A stream written in appends of several sizes, between another stream's, reads
/// the same as its whole list would from every version, both ways, in every page
/// size: its events are found through its appends.
async fn a_stream_of_many_appends_reads_alike_from_every_version(k: Kind) {
    let s = fresh(k).await;
    let mut expected = Vec::new();
    for (i, n) in [1usize, 3, 2, 5, 1].into_iter().enumerate() {
        let events: Vec<NewEvent> = (0..n).map(|j| ev("X", (i * 10 + j) as i64)).collect();
        let got = s.append("x", ExpectedVersion::Any, events).await.unwrap();
        for j in 0..n as u64 {
            expected.push((
                got.version - n as u64 + 1 + j,
                got.position - n as u64 + 1 + j,
            ));
        }
        s.append("y", ExpectedVersion::Any, vec![ev("Y", i as i64)])
            .await
            .unwrap();
    }
    assert_eq!(expected.len(), 12);
    let pairs = |events: Vec<RecordedEvent>| {
        assert!(events.iter().all(|e| e.stream == "x"));
        events
            .iter()
            .map(|e| (e.version, e.position))
            .collect::<Vec<_>>()
    };
    let newest_first: Vec<_> = expected.iter().rev().copied().collect();
    for from in 0..=14u64 {
        for max in [1usize, 2, 4, 20] {
            for (direction, list) in [
                (Direction::Forwards, &expected),
                (Direction::Backwards, &newest_first),
            ] {
                let read = s.read_stream("x", from, direction, max).await.unwrap();
                let want: Vec<_> = list
                    .iter()
                    .copied()
                    .filter(|(v, _)| match direction {
                        Direction::Forwards => *v >= from,
                        Direction::Backwards => *v <= from,
                    })
                    .take(max)
                    .collect();
                assert_eq!(pairs(read), want, "{direction:?} from {from}, {max}");
            }
        }
    }
    assert_eq!(s.stream_version("x").await.unwrap(), 12);
    assert_eq!(s.stream_version("y").await.unwrap(), 5);
    assert_eq!(s.stream_version("z").await.unwrap(), 0);
}

/// On PostgreSQL, with every plan generic (as plpgsql's and prepared statements'
/// plans become after a few calls) and statistics saying every append is of one
/// stream, appends, probes for repeated appends and stream reads never scan the
/// events table: they go by position ranges. (Written as joins, a probe once
/// scanned the whole table for its id, and a single-stream benchmark fell to a
/// sixth of its rate.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_generic_plans_never_scan_the_events_table() {
    let url = fresh_url(Kind::Postgres).await;
    let open = || async {
        Db::open(&shoal_db::DbOptions::new(url.clone()), &[])
            .await
            .unwrap()
    };
    let exec = |db: &Db, sql: &'static str| {
        let pool = db.pool().clone();
        async move {
            sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        }
    };
    let db = open().await;
    exec(
        &db,
        "DO $$ BEGIN
             EXECUTE format('ALTER DATABASE %I SET plan_cache_mode = force_generic_plan',
                            current_database());
         END $$",
    )
    .await;
    db.close().await;
    // A stream of 40,000 events, and statistics that know it.
    let db = open().await;
    let s = EventStore::open(&db, Upcasters::new()).await.unwrap();
    for i in 0..40 {
        let events = (0..1_000).map(|j| ev("E", i * 1_000 + j)).collect();
        s.append("one", ExpectedVersion::Any, events).await.unwrap();
    }
    exec(&db, "ANALYZE _shoal_es_events; ANALYZE _shoal_es_appends").await;
    drop(s);
    db.close().await;
    // Backends hand in their counters as they exit: once the inserts are counted,
    // the set-up's scans are too, and the counters start again from zero.
    let db = open().await;
    let counters = |db: &Db| {
        let pool = db.pool().clone();
        let cleared = exec(db, "SELECT pg_stat_clear_snapshot()");
        async move {
            cleared.await;
            sqlx::query_as::<_, (i64, i64, i64)>(
                "SELECT COALESCE(seq_scan, 0), COALESCE(idx_scan, 0), n_tup_ins
                   FROM pg_stat_user_tables
                  WHERE relname = '_shoal_es_events' AND schemaname = current_schema()",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    for _ in 0..100 {
        if counters(&db).await.2 >= 40_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    exec(
        &db,
        "SELECT pg_stat_reset_single_table_counters('_shoal_es_events'::regclass)",
    )
    .await;
    db.close().await;

    // New connections, so every plan is made under the setting.
    let db = open().await;
    let s = EventStore::open(&db, Upcasters::new()).await.unwrap();
    let reads = 10;
    for i in 0..reads {
        let v = s.stream_version("one").await.unwrap();
        let e = ev("F", i);
        let first = s
            .append("one", ExpectedVersion::Exact(v), vec![e.clone()])
            .await
            .unwrap();
        // A retry: found by its probe, answered as the first time.
        let again = s
            .append("one", ExpectedVersion::Exact(v), vec![e])
            .await
            .unwrap();
        assert_eq!(again, first);
        s.append("one", ExpectedVersion::Any, vec![ev("G", i), ev("G", i)])
            .await
            .unwrap();
        let page = s
            .read_stream("one", 25_700, Direction::Forwards, 100)
            .await
            .unwrap();
        assert_eq!(page.first().map(|e| e.version), Some(25_700));
        let page = s
            .read_stream("one", 30_900, Direction::Backwards, 100)
            .await
            .unwrap();
        assert_eq!(page.first().map(|e| e.version), Some(30_900));
    }
    drop(s);
    db.close().await;
    // Every round inserted 3 events (the retry none): once they are counted, the
    // writer's scans are too; the reads' index scans, the readers'.
    let db = open().await;
    let mut counted = (0, 0, 0);
    for _ in 0..100 {
        counted = counters(&db).await;
        if counted.2 >= 3 * reads && counted.1 >= 2 * reads {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        counted.2 >= 3 * reads && counted.1 >= 2 * reads,
        "counters: {counted:?}"
    );
    assert_eq!(counted.0, 0, "sequential scans of the events table");
}

/// The schema version each backend's build writes.
fn current_schema(k: Kind) -> i64 {
    match k {
        Kind::Sqlite => crate::sqlite::SCHEMA_VERSION,
        Kind::Postgres => crate::postgres::SCHEMA_VERSION,
    }
}

/// The tables of schema 2 on SQLite (`AUTOINCREMENT` positions), with events 1 to 3
/// and the counter at `counter`.
async fn sqlite_schema_2(counter: i64) -> Db {
    let db = fresh_db(Kind::Sqlite).await;
    let v2 = format!(
        "CREATE TABLE _shoal_es_schema (version INTEGER NOT NULL);
         INSERT INTO _shoal_es_schema VALUES (2);
         CREATE TABLE _shoal_es_events (
            position INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,
            version INTEGER NOT NULL, id TEXT NOT NULL, event_type TEXT NOT NULL,
            type_version INTEGER NOT NULL, data TEXT NOT NULL, metadata TEXT NOT NULL,
            recorded_at_ms INTEGER NOT NULL, UNIQUE (stream, version));
         CREATE TABLE _shoal_es_snapshots (stream TEXT PRIMARY KEY, version INTEGER NOT NULL,
            data TEXT NOT NULL, recorded_at_ms INTEGER NOT NULL);
         CREATE TABLE _shoal_es_checkpoints (projection TEXT PRIMARY KEY, position INTEGER NOT NULL);
         INSERT INTO _shoal_es_events VALUES
            (1, 'a', 1, 'id-1', 'X', 1, '{{}}', '{{}}', 5),
            (2, 'b', 1, 'id-2', 'X', 1, '{{}}', '{{}}', 5),
            (3, 'a', 2, 'id-3', 'X', 1, '{{}}', '{{}}', 5);
         UPDATE sqlite_sequence SET seq = {counter} WHERE name = '_shoal_es_events';"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(v2))
        .execute(db.pool())
        .await
        .unwrap();
    db
}

/// Schema 2 to 3 on SQLite: the positions stay, appends go on after the head, and
/// the events can no longer be deleted or moved, so no position is handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_schema_2_is_brought_up_to_date_and_its_events_are_kept_for_good() {
    let db = sqlite_schema_2(3).await;
    let s = EventStore::open(&db, Upcasters::new()).await.unwrap();
    assert_eq!(s.head(), 3);
    let next = s
        .append("b", ExpectedVersion::Exact(1), vec![ev("Y", 4)])
        .await
        .unwrap();
    assert_eq!((next.version, next.position), (2, 4));
    let all = s.read_all(0, 10).await.unwrap();
    assert_eq!(all.len(), 4);
    assert_positions_have_no_gaps(&all);
    let pool = db.pool();
    let deleted = sqlx::query("DELETE FROM _shoal_es_events WHERE position = 4")
        .execute(pool)
        .await
        .unwrap_err();
    assert!(deleted.to_string().contains("never deleted"), "{deleted}");
    let moved = sqlx::query("UPDATE _shoal_es_events SET position = 9 WHERE position = 4")
        .execute(pool)
        .await
        .unwrap_err();
    assert!(moved.to_string().contains("never changes"), "{moved}");
    assert_eq!(s.read_all(0, 10).await.unwrap().len(), 4);
    let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _shoal_es_schema")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(version, 3);
}

/// Events deleted by hand from the end of a schema-2 table: their positions were
/// handed out, and schema 3 would hand them out again, so the store refuses to
/// open and leaves the tables as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_schema_2_with_deleted_newest_events_is_left_as_it_was() {
    let db = sqlite_schema_2(7).await;
    let Err(e) = EventStore::open(&db, Upcasters::new()).await else {
        panic!("a store whose positions would be handed out again opened");
    };
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("after position 3 (up to 7)"), "{e}");
    let (version, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT MAX(version) FROM _shoal_es_schema), (SELECT COUNT(*) FROM _shoal_es_events)",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((version, events), (2, 3));
}

/// Each case as two tests, one per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Sqlite).await
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    appends_and_reads_both_ways_with_metadata,
    a_stream_of_many_appends_reads_alike_from_every_version,
    expected_versions_are_enforced_with_a_typed_conflict,
    a_repeated_append_is_recognised_and_writes_nothing,
    ids_are_checked_only_where_a_repeat_would_be,
    tables_of_schema_1_are_brought_up_to_date_and_keep_every_event,
    appends_grouped_into_one_commit_are_each_decided_as_if_alone,
    eight_writers_on_one_stream_one_wins_per_version_and_nothing_has_gaps,
    readers_never_see_a_gap_while_writers_commit,
    replicas_writing_at_once_leave_no_gap_a_reader_can_see,
    a_subscription_catches_up_then_goes_live,
    snapshots_keep_the_newest,
    old_event_shapes_are_upcast_on_read,
    bad_input_gets_a_clear_error_and_writes_nothing,
    aggregates_retry_on_conflict_and_snapshots_match_replay,
    a_projection_cut_off_mid_batch_applies_nothing_twice_and_rebuilds_the_same,
    a_cache_forgets_what_an_event_says_changed,
    a_running_projection_keeps_up_and_reports_its_lag
);

/// Events read from the start hold positions 1, 2, 3, … with none missing.
fn assert_positions_have_no_gaps(all: &[RecordedEvent]) {
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, e)| e.position == i as u64 + 1));
}

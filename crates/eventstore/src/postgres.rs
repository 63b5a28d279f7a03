//! The event store's writer on PostgreSQL.
//!
//! A sequence would hand out positions in the order transactions start, while they
//! commit in another order: a reader could see position 7 before 6 commits, move
//! past 6, and never see it. So positions are not drawn from a sequence. Every
//! append transaction first takes one transaction-scoped advisory lock, reads the
//! head under it and writes the next positions; the lock is released only after the
//! commit is visible, so transactions commit in position order, across every
//! process of the service, and every snapshot a reader takes holds a gap-free
//! prefix. Group commit keeps the lock's cost to one transaction per group.
//!
//! Other processes learn of new events by `NOTIFY` on commit, so their live
//! subscriptions wake at once instead of at the next poll.

use crate::store::{
    advance, answers, appends_of, checked, db_err, fail_all, id_taken, lookups, plan, rows_of,
    Encoded, Write,
};
use crate::types::Appended;
use shoal_core::Error;
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The version of the event store's tables this code writes on PostgreSQL, kept in
/// `_shoal_es_schema`: the `3` in [`SCHEMA`]'s migration block. (SQLite's tables
/// have their own numbering, `crate::sqlite::SCHEMA_VERSION`.)
pub(crate) const SCHEMA_VERSION: i64 = 3;

/// The events a probe `p` (stream `p.s`, id `p.id`, versions `p.lo..=p.hi`) finds,
/// selecting `$what` of them as `e`, up to the closing parenthesis the caller
/// writes: its versions are in the appends from the one holding lo to the one
/// holding hi (or the newest), and within each at the positions from its first.
/// The events are read in a `LATERAL` subquery with a `LIMIT`, which the planner
/// cannot pull up into the join: so always by a position range. As one join, a
/// generic plan (plpgsql's, or a prepared statement's, after a few calls) scanned
/// the whole events table for the id once the statistics said every append was
/// of one stream. One event per probe is all the writer keeps.
macro_rules! probe_hits {
    ($what:literal) => {
        concat!(
            " CROSS JOIN LATERAL (
                SELECT a.first_position + GREATEST(p.lo, a.first_version) - a.first_version AS lo,
                       a.first_position + LEAST(p.hi, a.last_version) - a.first_version AS hi
                  FROM _shoal_es_appends a
                 WHERE a.stream = p.s
                   AND a.last_version BETWEEN p.lo AND COALESCE(
                       (SELECT MIN(b.last_version) FROM _shoal_es_appends b
                         WHERE b.stream = p.s AND b.last_version >= p.hi), p.hi)
            ) AS r CROSS JOIN LATERAL (
                SELECT ",
            $what,
            " FROM _shoal_es_events e
                 WHERE e.position BETWEEN r.lo AND r.hi AND e.id = p.id
                 LIMIT 1"
        )
    };
}

const SCHEMA: &str = concat!(
    "
BEGIN;
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_es_events'));
CREATE TABLE IF NOT EXISTS _shoal_es_events (
    position BIGINT PRIMARY KEY,
    stream TEXT NOT NULL,
    version BIGINT NOT NULL,
    id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    type_version BIGINT NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at_ms BIGINT NOT NULL
);
-- One row per append: its events are at the positions from first_position on, one
-- per version from first_version to last_version. The key makes a version taken
-- twice fail. (An index on the events' (stream, version) instead costs every
-- commit an index entry per event.)
CREATE TABLE IF NOT EXISTS _shoal_es_appends (
    stream TEXT NOT NULL,
    last_version BIGINT NOT NULL,
    first_version BIGINT NOT NULL,
    first_position BIGINT NOT NULL,
    PRIMARY KEY (stream, last_version)
);
CREATE TABLE IF NOT EXISTS _shoal_es_snapshots (
    stream TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    data TEXT NOT NULL,
    recorded_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS _shoal_es_checkpoints (
    projection TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
-- The schema's version (SCHEMA_VERSION in postgres.rs). 1 (no row): the events
-- table had a unique index on the event id. 2: none; repeated appends are
-- recognised through (stream, version), and the group function takes the probes.
-- 3: the events' (stream, version) index replaced by _shoal_es_appends.
CREATE TABLE IF NOT EXISTS _shoal_es_schema (
    version BIGINT NOT NULL
);
DO $m$
DECLARE
    v BIGINT := COALESCE((SELECT MAX(version) FROM _shoal_es_schema), 1);
BEGIN
    IF v > 3 THEN
        RAISE EXCEPTION 'the event store''s tables are at schema version %, newer than this build''s 3', v;
    END IF;
    IF v < 2 THEN
        ALTER TABLE _shoal_es_events DROP CONSTRAINT IF EXISTS _shoal_es_events_id_key;
        DROP FUNCTION IF EXISTS _shoal_es_append_group(TEXT[], SMALLINT[], BIGINT[], INT[],
            BIGINT[], TEXT[], TEXT[], BIGINT[], TEXT[], TEXT[], BIGINT, TEXT);
    END IF;
    IF v < 3 THEN
        -- Appends of older tables are not on record: each run of a stream's events
        -- at consecutive positions (the same position - version) is one row, which
        -- finds the same events.
        INSERT INTO _shoal_es_appends (stream, last_version, first_version, first_position)
            SELECT stream, MAX(version), MIN(version), MIN(position)
              FROM _shoal_es_events GROUP BY stream, position - version;
        ALTER TABLE _shoal_es_events DROP CONSTRAINT IF EXISTS _shoal_es_events_stream_version_key;
        DELETE FROM _shoal_es_schema;
        INSERT INTO _shoal_es_schema (version) VALUES (3);
    END IF;
END
$m$;
-- A whole group in one round trip, when it needs no answer but success: take the
-- lock, check every append's expected version, insert every event after the head,
-- notify. Called outside a transaction block, so the statement is the transaction:
-- each statement in here takes a new snapshot, and the insert sees every commit
-- made before the lock was granted. The caller makes sure the appends' streams are
-- distinct. Returns nothing (and writes nothing) when an expectation fails or when
-- an append expecting any version may repeat a stored one (a probe, an id at an
-- offset from its stream's version, finds it); the caller then takes the general
-- path, which tells each append its own answer. An append whose expectation holds
-- cannot repeat a stored one: those are at versions after the one it expects.
CREATE OR REPLACE FUNCTION _shoal_es_append_group(
    a_stream TEXT[], a_kind SMALLINT[], a_expected BIGINT[],
    p_stream TEXT[], p_id TEXT[], p_lo BIGINT[], p_hi BIGINT[],
    e_append INT[], e_k BIGINT[], e_id TEXT[], e_type TEXT[], e_type_version BIGINT[],
    e_data TEXT[], e_metadata TEXT[], now_ms BIGINT, channel TEXT)
RETURNS TABLE (o_stream TEXT, o_version BIGINT, o_position BIGINT)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    head BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_es_events'));
    IF EXISTS (
        SELECT 1 FROM UNNEST(a_stream, a_kind, a_expected) AS a(s, kind, expected)
         WHERE a.kind <> 0
           AND COALESCE((SELECT MAX(x.last_version) FROM _shoal_es_appends x WHERE x.stream = a.s), 0)
               <> CASE a.kind WHEN 1 THEN 0 ELSE a.expected END
    ) THEN
        RETURN;
    END IF;
    -- What the probes find (probe_hits in postgres.rs).
    IF EXISTS (
        WITH p AS MATERIALIZED (
            SELECT p.s, p.id, v + p.lo AS lo, v + p.hi AS hi
              FROM UNNEST(p_stream, p_id, p_lo, p_hi) AS p(s, id, lo, hi)
             CROSS JOIN LATERAL (
                 SELECT COALESCE(MAX(x.last_version), 0) AS v
                   FROM _shoal_es_appends x WHERE x.stream = p.s
             ) AS cur
        )
        SELECT 1 FROM p",
    probe_hits!("1"),
    "
        ) AS hit
    ) THEN
        RETURN;
    END IF;
    SELECT COALESCE(MAX(e.position), 0) INTO head FROM _shoal_es_events e;
    RETURN QUERY
    -- Materialized: each stream's version is looked up once, not once per event.
    WITH cur AS MATERIALIZED (
        SELECT a.idx, a.s,
               COALESCE((SELECT MAX(x.last_version) FROM _shoal_es_appends x WHERE x.stream = a.s), 0) AS v
          FROM UNNEST(a_stream) WITH ORDINALITY AS a(s, idx)
    ), ev AS MATERIALIZED (
        SELECT * FROM UNNEST(e_append, e_k, e_id, e_type, e_type_version, e_data, e_metadata)
               WITH ORDINALITY AS ev(idx, k, id, t, tv, d, m, ord)
    ), ins AS (
        INSERT INTO _shoal_es_events
               (position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms)
        SELECT head + ev.ord, cur.s, cur.v + ev.k, ev.id, ev.t, ev.tv, ev.d, ev.m, now_ms
          FROM ev JOIN cur ON cur.idx = ev.idx
    ), app AS (
        INSERT INTO _shoal_es_appends (stream, last_version, first_version, first_position)
        SELECT cur.s, cur.v + COUNT(*), cur.v + 1, head + MIN(ev.ord)
          FROM ev JOIN cur ON cur.idx = ev.idx
         GROUP BY cur.idx, cur.s, cur.v
        RETURNING _shoal_es_appends.stream AS s, _shoal_es_appends.last_version AS v,
                  _shoal_es_appends.first_position + _shoal_es_appends.last_version
                      - _shoal_es_appends.first_version AS p
    )
    SELECT app.s, app.v, app.p FROM app;
    PERFORM pg_notify(channel, (head + cardinality(e_id))::text);
END
$fn$;
COMMIT;
"
);

/// Taken by every append transaction (and the schema set-up) of one schema's store.
const LOCK: &str =
    "BEGIN; SELECT pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_es_events'))";

/// Make the tables if missing (replicas starting together take turns); the head
/// position and the notification channel of this schema's store.
pub(crate) async fn prepare(pool: &PgPool) -> Result<(u64, String), Error> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(db_err("acquiring a connection"))?;
    if let Err(e) = sqlx::raw_sql(SCHEMA).execute(&mut *conn).await {
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        return Err(db_err("creating the event store's tables")(e));
    }
    let (head, schema, version): (i64, String, Option<i64>) = sqlx::query_as(
        "SELECT COALESCE(MAX(position), 0), current_schema()::text,
                (SELECT MAX(version) FROM _shoal_es_schema)
           FROM _shoal_es_events",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err("reading the event store's head"))?;
    if version != Some(SCHEMA_VERSION) {
        return Err(Error::internal(format!(
            "the event store's tables are at schema version {version:?} after set-up, not {SCHEMA_VERSION}"
        )));
    }
    // A channel name is at most 63 bytes; schema names are too, so cut.
    let channel: String = format!("shoal_es.{schema}").chars().take(63).collect();
    Ok((head as u64, channel))
}

/// Follow other processes' commits: every notification moves the head on. Lost
/// notifications (a dropped connection) cost only latency: subscriptions also poll.
pub(crate) async fn listen(pool: PgPool, channel: String, head: Arc<watch::Sender<u64>>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "event store listener cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            tracing::debug!(error = %e, "event store listener cannot listen; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(n) => {
                    if let Ok(p) = n.payload().parse::<u64>() {
                        advance(&head, p);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "event store listener lost its connection");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

/// The writer's own connection, outside the service's pool: the writer is one task
/// appending group after group, and a pooled connection would cost a ping (a round
/// trip) on every acquire. Opened on first use with the pool's options (so the same
/// schema), and again after any failure, which may have been the connection's.
pub(crate) type WriterConn = Arc<tokio::sync::Mutex<Option<PgConnection>>>;

pub(crate) async fn commit_group(
    pool: &PgPool,
    conn: &WriterConn,
    channel: &str,
    group: &[Write],
) -> Vec<Result<Appended, Error>> {
    let mut slot = conn.lock().await;
    if slot.is_none() {
        use sqlx::ConnectOptions;
        match pool.connect_options().connect().await {
            Ok(c) => *slot = Some(c),
            Err(e) => return fail_all(group, &db_err("connecting to append")(e)),
        }
    }
    let Some(conn) = slot.as_mut() else {
        return fail_all(
            group,
            &Error::internal("the writer's connection is missing"),
        );
    };
    match fast_group(conn, channel, group).await {
        Ok(Some(results)) => return results,
        Ok(None) => {}
        Err(e) => {
            *slot = None;
            return fail_all(group, &e);
        }
    }
    let Some(conn) = slot.as_mut() else {
        return fail_all(
            group,
            &Error::internal("the writer's connection is missing"),
        );
    };
    match append_group(conn, channel, group).await {
        Ok(results) => results,
        Err(GroupError::Fatal(e)) => {
            *slot = None;
            fail_all(group, &e)
        }
        // A stream version taken (the appends' key; the lock makes this
        // unexpected): the transaction is gone (PostgreSQL aborts it on the failed
        // statement), so each append goes again in its own, and only the offending
        // one fails.
        Err(GroupError::OneByOne) => {
            let mut results = Vec::with_capacity(group.len());
            for w in group {
                results.push(
                    match append_group(conn, channel, std::slice::from_ref(w)).await {
                        Ok(mut r) => r
                            .pop()
                            .unwrap_or_else(|| Err(Error::internal("an append went unanswered"))),
                        Err(GroupError::Fatal(e)) => Err(e),
                        Err(GroupError::OneByOne) => Err(id_taken(w)),
                    },
                );
            }
            results
        }
    }
}

enum GroupError {
    Fatal(Error),
    OneByOne,
}

/// The events' own columns as arrays, one element per event, for `UNNEST`.
struct EventColumns<'a> {
    id: Vec<&'a str>,
    event_type: Vec<&'a str>,
    type_version: Vec<i64>,
    data: Vec<&'a str>,
    metadata: Vec<&'a str>,
}

impl<'a> EventColumns<'a> {
    fn with_capacity(rows: usize) -> Self {
        Self {
            id: Vec::with_capacity(rows),
            event_type: Vec::with_capacity(rows),
            type_version: Vec::with_capacity(rows),
            data: Vec::with_capacity(rows),
            metadata: Vec::with_capacity(rows),
        }
    }

    fn push(&mut self, e: &'a Encoded) {
        self.id.push(e.id.as_str());
        self.event_type.push(e.event_type.as_str());
        self.type_version.push(i64::from(e.type_version));
        self.data.push(e.data.as_str());
        self.metadata.push(e.metadata.as_str());
    }
}

/// The group in one round trip (`_shoal_es_append_group`) when every append in it
/// is new and on its own stream and every expectation holds: the usual case.
/// `None` when it does not apply or did not succeed and nothing was written: the
/// general path then answers each append.
async fn fast_group(
    conn: &mut PgConnection,
    channel: &str,
    group: &[Write],
) -> Result<Option<Vec<Result<Appended, Error>>>, Error> {
    let (streams, probes) = lookups(group);
    if streams.len() != group.len() {
        return Ok(None);
    }
    // Only appends expecting any version can repeat a stored one here.
    let (mut p_stream, mut p_id, mut p_lo, mut p_hi) = (vec![], vec![], vec![], vec![]);
    for p in probes.iter().filter(|p| p.from_head) {
        p_stream.push(p.stream);
        p_id.push(p.id);
        p_lo.push(p.lo);
        p_hi.push(p.hi);
    }
    let rows: usize = group.iter().map(|w| w.events.len()).sum();
    let (mut a_stream, mut a_kind, mut a_expected) = (vec![], vec![], vec![]);
    let mut e_append = Vec::with_capacity(rows);
    let mut e_k = Vec::with_capacity(rows);
    let mut events = EventColumns::with_capacity(rows);
    for (i, w) in group.iter().enumerate() {
        a_stream.push(w.stream.as_str());
        let (kind, expected) = match w.expected {
            crate::ExpectedVersion::Any => (0i16, 0i64),
            crate::ExpectedVersion::NoStream => (1, 0),
            crate::ExpectedVersion::Exact(v) => (2, v.min(i64::MAX as u64) as i64),
        };
        a_kind.push(kind);
        a_expected.push(expected);
        for (k, e) in w.events.iter().enumerate() {
            // 1-based: ORDINALITY numbers the appends from 1.
            e_append.push(i as i32 + 1);
            e_k.push(k as i64 + 1);
            events.push(e);
        }
    }
    let answered: Result<Vec<(String, i64, i64)>, sqlx::Error> = sqlx::query_as(
        "SELECT o_stream, o_version, o_position FROM _shoal_es_append_group(
             $1::text[], $2::int2[], $3::int8[], $4::text[], $5::text[], $6::int8[], $7::int8[],
             $8::int4[], $9::int8[], $10::text[], $11::text[], $12::int8[], $13::text[],
             $14::text[], $15::int8, $16::text)",
    )
    .bind(&a_stream)
    .bind(&a_kind)
    .bind(&a_expected)
    .bind(&p_stream)
    .bind(&p_id)
    .bind(&p_lo)
    .bind(&p_hi)
    .bind(&e_append)
    .bind(&e_k)
    .bind(&events.id)
    .bind(&events.event_type)
    .bind(&events.type_version)
    .bind(&events.data)
    .bind(&events.metadata)
    .bind(shoal_core::unix_ms() as i64)
    .bind(channel)
    .fetch_all(&mut *conn)
    .await;
    let answered = match answered {
        Ok(a) => a,
        // A stream version taken (not expected: the lock is held): the statement
        // was undone.
        Err(e)
            if e.as_database_error()
                .is_some_and(|d| d.is_unique_violation()) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(db_err("appending events")(e)),
    };
    if answered.len() != group.len() {
        // An expectation failed: nothing was written.
        return Ok(None);
    }
    let by_stream: HashMap<String, (i64, i64)> =
        answered.into_iter().map(|(s, v, p)| (s, (v, p))).collect();
    let mut results = Vec::with_capacity(group.len());
    for w in group {
        let Some(&(version, position)) = by_stream.get(&w.stream) else {
            return Err(Error::internal("an append went unanswered"));
        };
        results.push(Ok(Appended {
            version: version as u64,
            position: position as u64,
        }));
    }
    Ok(Some(results))
}

/// One transaction for the group: lock, one query that checks every append and
/// reads the head, one INSERT of every accepted event (arrays, so one statement
/// whatever the group's size), then commit with a notification. Rolled back on
/// any error.
async fn append_group(
    conn: &mut PgConnection,
    channel: &str,
    group: &[Write],
) -> Result<Vec<Result<Appended, Error>>, GroupError> {
    let r = try_append_group(conn, channel, group).await;
    if r.is_err() {
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    }
    r
}

async fn try_append_group(
    conn: &mut PgConnection,
    channel: &str,
    group: &[Write],
) -> Result<Vec<Result<Appended, Error>>, GroupError> {
    let fatal = |what: &'static str| move |e: sqlx::Error| GroupError::Fatal(db_err(what)(e));
    sqlx::raw_sql(LOCK)
        .execute(&mut *conn)
        .await
        .map_err(fatal("starting an append transaction"))?;
    let (streams, probes) = lookups(group);
    let p_stream: Vec<&str> = probes.iter().map(|p| p.stream).collect();
    let p_id: Vec<&str> = probes.iter().map(|p| p.id).collect();
    let p_head: Vec<i64> = probes.iter().map(|p| i64::from(p.from_head)).collect();
    let p_lo: Vec<i64> = probes.iter().map(|p| p.lo).collect();
    let p_hi: Vec<i64> = probes.iter().map(|p| p.hi).collect();
    // Kind 0: a stream's version; kind 1: an event a probe found; kind 2: the head.
    // The lock is held, so all of it stays true until commit.
    let rows: Vec<(i64, String, String, i64, i64)> = sqlx::query_as(concat!(
        "WITH v AS MATERIALIZED (
             SELECT s.stream,
                    COALESCE((SELECT MAX(x.last_version) FROM _shoal_es_appends x
                               WHERE x.stream = s.stream), 0)::int8 AS v
               FROM UNNEST($1::text[]) AS s(stream)
         ), p AS MATERIALIZED (
             SELECT p.s, p.id, p.lo + p.h * v.v AS lo, p.hi + p.h * v.v AS hi
               FROM UNNEST($2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[]) AS p(s, id, h, lo, hi)
               JOIN v ON v.stream = p.s
         )
         SELECT 0::int8, v.stream, ''::text, v.v, 0::int8 FROM v
         UNION ALL
         SELECT 1, e.id, e.stream, e.version, e.position
           FROM p",
        probe_hits!("e.id, e.stream, e.version, e.position"),
        "
           ) AS e
         UNION ALL
         SELECT 2, '', '', COALESCE(MAX(position), 0), 0 FROM _shoal_es_events"
    ))
    .bind(&streams)
    .bind(&p_stream)
    .bind(&p_id)
    .bind(&p_head)
    .bind(&p_lo)
    .bind(&p_hi)
    .fetch_all(&mut *conn)
    .await
    .map_err(fatal("checking the group's appends"))?;
    let (versions, stored, head) = checked(rows);
    let (plans, rows) = plan(group, versions, &stored);
    if rows > 0 {
        let pending = rows_of(group, &plans, rows);
        let mut positions = Vec::with_capacity(rows);
        let mut stream = Vec::with_capacity(rows);
        let mut version = Vec::with_capacity(rows);
        let mut events = EventColumns::with_capacity(rows);
        for (i, (w, base, e, k)) in pending.iter().enumerate() {
            positions.push((head + 1 + i as u64) as i64);
            stream.push(w.stream.as_str());
            version.push((base + k) as i64);
            events.push(e);
        }
        let appends = appends_of(group, &plans, head + 1);
        let inserted = sqlx::query(
            "WITH app AS (
                 INSERT INTO _shoal_es_appends (stream, last_version, first_version, first_position)
                 SELECT * FROM UNNEST($10::text[], $11::int8[], $12::int8[], $13::int8[])
             )
             INSERT INTO _shoal_es_events
               (position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms)
             SELECT u.*, $9::int8 FROM UNNEST($1::int8[], $2::text[], $3::int8[], $4::text[],
                                              $5::text[], $6::int8[], $7::text[], $8::text[]) AS u",
        )
        .bind(&positions)
        .bind(&stream)
        .bind(&version)
        .bind(&events.id)
        .bind(&events.event_type)
        .bind(&events.type_version)
        .bind(&events.data)
        .bind(&events.metadata)
        .bind(shoal_core::unix_ms() as i64)
        .bind(appends.iter().map(|a| a.0).collect::<Vec<_>>())
        .bind(appends.iter().map(|a| a.1).collect::<Vec<_>>())
        .bind(appends.iter().map(|a| a.2).collect::<Vec<_>>())
        .bind(appends.iter().map(|a| a.3).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e)
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation()) =>
            {
                return Err(GroupError::OneByOne)
            }
            Err(e) => return Err(fatal("appending events")(e)),
        }
        // The notification is sent on commit, in the same round trip. The channel
        // is ours and the payload a number; quotes are doubled all the same.
        let last = head + rows as u64;
        let commit = format!(
            "SELECT pg_notify('{}', '{last}'); COMMIT",
            channel.replace('\'', "''")
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(commit))
            .execute(&mut *conn)
            .await
            .map_err(fatal("committing appends"))?;
    } else {
        sqlx::raw_sql("COMMIT")
            .execute(&mut *conn)
            .await
            .map_err(fatal("committing appends"))?;
    }
    Ok(answers(group, plans, head + 1))
}

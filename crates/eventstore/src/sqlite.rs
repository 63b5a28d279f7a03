//! The event store's writer on SQLite.
//!
//! With `synchronous = FULL` every commit is an fsync. SQLite has one writer at a
//! time; the writer reads the head position inside its `BEGIN IMMEDIATE`
//! transaction and writes the next ones, so positions are assigned in commit order
//! and the global order a reader sees has no gaps. Triggers refuse deleting an event
//! or changing its position, so a position is never handed out twice. sqlx runs
//! every statement as a round trip to the connection's thread, so a group is
//! written in as few statements as possible: one query checks every append and
//! reads the head, one more writes every accepted event and commits.
//!
//! A commit's time follows the pages it writes to the WAL (the profile is fsync and
//! page writes), and each index of the events table costs every commit pages. So
//! the events table has one, the position (the row id), as a bare table would; a
//! stream's events are found through `_shoal_es_appends`, one row per append
//! (stream, last and first versions, first position), whose events are the
//! positions from the first on, one per version. Counted (WAL pages per commit of
//! 100 events, after 200,000): bare table 11.4; schema 1 (indexes on the event id
//! and on (stream, version), AUTOINCREMENT) 22.0; schema 2 (no event id index)
//! 16.2; schema 3 (this) 12.5 with 1 stream, 12.7 with 1,000. A repeated append is
//! recognised through (stream, version) (see [`crate::store::lookups`]).

use crate::store::{
    answers, appends_of, checked, db_err, fail_all, id_taken, lookups, plan, rows_of, Encoded,
    Write,
};
use crate::types::Appended;
use shoal_core::Error;
use sqlx::sqlite::{SqliteConnection, SqlitePool};

/// The version of the event store's tables this code writes; kept in
/// `_shoal_es_schema`. 1 (no row): the events table had a unique index on the event
/// id. 2: it has none; repeated appends are recognised through (stream, version).
/// 3: positions without `AUTOINCREMENT` (guarded by triggers), and the (stream,
/// version) index replaced by `_shoal_es_appends`, one row per append.
pub(crate) const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _shoal_es_schema (
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _shoal_es_snapshots (
    stream TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _shoal_es_checkpoints (
    projection TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
";

/// The tables of schema 3, the events table named `$table`, without the triggers.
/// An append of n events to a stream at version v, written from position p: events
/// at positions p..p+n-1 with versions v+1..v+n, and one row (stream, v+n, v+1, p)
/// in `_shoal_es_appends`, whose key makes a version taken twice fail.
macro_rules! tables {
    ($table:literal) => {
        concat!(
            "CREATE TABLE ",
            $table,
            " (
    position INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    type_version INTEGER NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL
);
CREATE TABLE _shoal_es_appends (
    stream TEXT NOT NULL,
    last_version INTEGER NOT NULL,
    first_version INTEGER NOT NULL,
    first_position INTEGER NOT NULL,
    PRIMARY KEY (stream, last_version)
) WITHOUT ROWID;"
        )
    };
}

/// Positions are one past the largest stored: deleting the newest events would
/// hand their positions out again, to events a projection past them would never
/// see. So events are never deleted, nor their positions changed.
const GUARDS: &str = "
CREATE TRIGGER _shoal_es_events_kept BEFORE DELETE ON _shoal_es_events
BEGIN SELECT RAISE(ABORT, 'event store: events are never deleted'); END;
CREATE TRIGGER _shoal_es_events_placed BEFORE UPDATE OF position ON _shoal_es_events
BEGIN SELECT RAISE(ABORT, 'event store: an event''s position never changes'); END;
";

/// Schema 1 or 2 to 3, in the transaction that checked the version: SQLite can
/// drop neither a column's `UNIQUE` nor `AUTOINCREMENT`, so the events are copied
/// into a new table, positions kept. Their appends are not on record; each run of
/// a stream's events at consecutive positions (the same position − version) is one
/// row, which finds the same events. The caller first makes sure no position above
/// the last stored one was ever handed out.
const MIGRATE_TO_3: &str = concat!(
    tables!("_shoal_es_events_v3"),
    "
INSERT INTO _shoal_es_events_v3
    (position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms)
    SELECT position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms
      FROM _shoal_es_events ORDER BY position;
INSERT INTO _shoal_es_appends (stream, last_version, first_version, first_position)
    SELECT stream, MAX(version), MIN(version), MIN(position)
      FROM _shoal_es_events_v3 GROUP BY stream, position - version;
DROP TABLE _shoal_es_events;
ALTER TABLE _shoal_es_events_v3 RENAME TO _shoal_es_events;
DELETE FROM sqlite_sequence WHERE name = '_shoal_es_events';
"
);

/// Make the tables if missing, or bring them to [`SCHEMA_VERSION`] (replicas
/// starting together take turns: the check and the change are one write
/// transaction); the head position.
pub(crate) async fn prepare(pool: &SqlitePool) -> Result<u64, Error> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(db_err("acquiring a connection"))?;
    let r = migrate(&mut conn).await;
    let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = sqlx::raw_sql(end).execute(&mut *conn).await;
    r?;
    ended.map_err(db_err("creating the event store's tables"))?;
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM _shoal_es_events")
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err("reading the event store's head"))?;
    Ok(head as u64)
}

/// Inside `BEGIN IMMEDIATE`, which this begins; the caller ends it.
async fn migrate(conn: &mut SqliteConnection) -> Result<(), Error> {
    let what = "creating the event store's tables";
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .map_err(db_err(what))?;
    sqlx::raw_sql(SCHEMA)
        .execute(&mut *conn)
        .await
        .map_err(db_err(what))?;
    let (version, events): (Option<i64>, i64) = sqlx::query_as(
        "SELECT (SELECT MAX(version) FROM _shoal_es_schema),
                (SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_shoal_es_events')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err(what))?;
    let version = match (version, events) {
        (Some(v), _) => v,
        (None, 0) => 0,
        (None, _) => 1,
    };
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    if version > SCHEMA_VERSION {
        return Err(Error::config(format!(
            "the event store's tables are at schema version {version}, newer than this build's {SCHEMA_VERSION}"
        )));
    }
    let change = if version == 0 {
        tables!("_shoal_es_events")
    } else {
        // AUTOINCREMENT's counter is above the last position only if the newest
        // events were deleted by hand; without it, their positions would be handed
        // out again.
        let (handed_out, last): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = '_shoal_es_events'),
                    (SELECT COALESCE(MAX(position), 0) FROM _shoal_es_events)",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err(what))?;
        if handed_out > last {
            return Err(Error::config(format!(
                "the event store's events after position {last} (up to {handed_out}) were deleted; \
                 schema {SCHEMA_VERSION} would hand their positions out again, so the tables stay \
                 at schema {version}: restore the events, or open the database with the build \
                 that made it"
            )));
        }
        tracing::info!(
            from = version,
            "event store: moving the events table to schema {SCHEMA_VERSION}"
        );
        MIGRATE_TO_3
    };
    sqlx::raw_sql(change)
        .execute(&mut *conn)
        .await
        .map_err(db_err("migrating the event store's tables"))?;
    sqlx::raw_sql(GUARDS)
        .execute(&mut *conn)
        .await
        .map_err(db_err("migrating the event store's tables"))?;
    sqlx::query("DELETE FROM _shoal_es_schema; INSERT INTO _shoal_es_schema (version) VALUES ($1)")
        .bind(SCHEMA_VERSION)
        .execute(&mut *conn)
        .await
        .map_err(db_err(what))?;
    Ok(())
}

pub(crate) async fn commit_group(
    pool: &SqlitePool,
    group: &[Write],
) -> Vec<Result<Appended, Error>> {
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => return fail_all(group, &db_err("acquiring a connection to append")(e)),
    };
    // The transaction begins with the group's check and ends with its insert, in
    // the same statements: each statement is a round trip to SQLite's thread.
    let (results, committed) = match append_group(&mut conn, group, Ends::Both).await {
        Ok(done) => done,
        Err(GroupError::Fatal(e)) => {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            return fail_all(group, &e);
        }
        // The group's insert was refused as a whole (a stream version taken, by the
        // appends' key; the writer's checks make this unexpected) and undone:
        // append one by one so only the offending append fails. No savepoints are
        // needed here: every check happens before an append writes, and its
        // statement writes its appends row first, so a refusal (SQLite undoes the
        // failed INSERT and runs nothing after it) leaves nothing behind.
        Err(GroupError::OneByOne) => {
            let mut results = Vec::with_capacity(group.len());
            for w in group {
                results.push(append_one(&mut conn, w).await);
            }
            (results, false)
        }
    };
    if committed {
        return results;
    }
    if let Err(e) = sqlx::raw_sql("COMMIT").execute(&mut *conn).await {
        let e = db_err("committing appends")(e);
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        return fail_all(group, &e);
    }
    results
}

enum GroupError {
    Fatal(Error),
    OneByOne,
}

/// Whether [`append_group`] opens and closes the transaction itself (a group
/// alone) or runs inside one (an append of a refused group).
#[derive(Clone, Copy, PartialEq)]
enum Ends {
    Both,
    Neither,
}

/// Rows per INSERT statement: 9 values each, and with the group's appends (4
/// values each, at most 512) under SQLite's 32,766 variables. Tests use a tiny one
/// so that groups of several statements (and their savepoint) are exercised by
/// every larger append.
const ROWS_PER_INSERT: usize = if cfg!(test) { 3 } else { 3_000 };

/// The whole group in a few statements: one query for the streams' versions, the
/// repeated appends and the head, then every accepted event and append in one
/// statement (a few for a very large group), so the group costs about as much as
/// one append.
///
/// With [`Ends::Both`] the check query begins the transaction (`BEGIN IMMEDIATE`)
/// and the last statement commits it, when that is safe (one statement, no
/// savepoint); the answer says whether it did.
async fn append_group(
    conn: &mut SqliteConnection,
    group: &[Write],
    ends: Ends,
) -> Result<(Vec<Result<Appended, Error>>, bool), GroupError> {
    let fatal = |what: &'static str| move |e: sqlx::Error| GroupError::Fatal(db_err(what)(e));
    let (streams, probes) = lookups(group);
    let mut sql = String::from(if ends == Ends::Both {
        "BEGIN IMMEDIATE; "
    } else {
        ""
    });
    // A probe counted from its stream's version gets the version first (once per
    // probe, materialized). Its versions lo..=lo+span are in the appends from the
    // one holding lo to the one holding lo+span (or the newest), and within each
    // at the positions from its first; SQLite walks the appends' key and the
    // events' row ids, never a whole stream.
    sql.push_str(
        "WITH p AS MATERIALIZED (
             SELECT column1 AS stream, column2 AS id, column5 - column4 AS span,
                    column4 + CASE column3 WHEN 1 THEN
                        (SELECT COALESCE(MAX(last_version), 0) FROM _shoal_es_appends
                          WHERE stream = column1)
                    ELSE 0 END AS lo
               FROM (VALUES ",
    );
    sql.push_str(&vec!["(?, ?, ?, ?, ?)"; probes.len()].join(","));
    sql.push_str(
        ")
         )
         SELECT 1, e.id, e.stream, e.version, e.position
           FROM p CROSS JOIN _shoal_es_appends a CROSS JOIN _shoal_es_events e
          WHERE a.stream = p.stream
            AND a.last_version BETWEEN p.lo AND COALESCE(
                (SELECT MIN(b.last_version) FROM _shoal_es_appends b
                  WHERE b.stream = p.stream AND b.last_version >= p.lo + p.span), p.lo + p.span)
            AND e.position BETWEEN a.first_position + MAX(p.lo, a.first_version) - a.first_version
                               AND a.first_position + MIN(p.lo + p.span, a.last_version) - a.first_version
            AND e.id = p.id",
    );
    // The streams' versions from a VALUES list too: a compound SELECT has at most
    // 500 terms, and a group up to 512 streams.
    sql.push_str(&format!(
        " UNION ALL SELECT 0, column1, '',
              (SELECT COALESCE(MAX(last_version), 0) FROM _shoal_es_appends WHERE stream = column1), 0
            FROM (VALUES {})
          UNION ALL SELECT 2, '', '', (SELECT COALESCE(MAX(position), 0) FROM _shoal_es_events), 0",
        vec!["(?)"; streams.len()].join(",")
    ));
    // Built from fixed fragments only; every value is bound.
    let mut q = sqlx::query_as::<_, (i64, String, String, i64, i64)>(sqlx::AssertSqlSafe(sql));
    for p in &probes {
        q = q
            .bind(p.stream)
            .bind(p.id)
            .bind(i64::from(p.from_head))
            .bind(p.lo)
            .bind(p.hi);
    }
    for st in &streams {
        q = q.bind(*st);
    }
    let (versions, stored, head) = checked(
        q.fetch_all(&mut *conn)
            .await
            .map_err(fatal("checking the group's appends"))?,
    );
    let (plans, rows) = plan(group, versions, &stored);

    // Every accepted event, in order, from the position after the head; then one
    // row per accepted append.
    let first_position = head + 1;
    let mut committed = false;
    if rows > 0 {
        // One statement is undone by SQLite itself when it fails; several need a
        // savepoint to be undone together.
        let several = rows > ROWS_PER_INSERT;
        if several {
            sqlx::raw_sql("SAVEPOINT group_insert")
                .execute(&mut *conn)
                .await
                .map_err(fatal("starting the group's insert"))?;
        }
        let now = shoal_core::unix_ms() as i64;
        let pending = rows_of(group, &plans, rows);
        let appends = appends_of(group, &plans, first_position);
        // The first statement carries the appends, ahead of its events: their key
        // is the one a taken version breaks, and SQLite undoes the failed INSERT
        // and runs nothing after it, so a refused group leaves nothing behind. A
        // lone statement also carries the COMMIT, which is then not run either.
        let commit = ends == Ends::Both && !several;
        for (i, chunk) in pending.chunks(ROWS_PER_INSERT).enumerate() {
            let at = first_position + (i * ROWS_PER_INSERT) as u64;
            let ahead = (i == 0).then_some(appends.as_slice());
            match insert_rows(conn, ahead, chunk, at, now, commit).await {
                Ok(()) => committed = commit,
                Err(e)
                    if e.as_database_error()
                        .is_some_and(|d| d.is_unique_violation()) =>
                {
                    if several {
                        sqlx::raw_sql("ROLLBACK TO group_insert; RELEASE group_insert")
                            .execute(&mut *conn)
                            .await
                            .map_err(fatal("undoing the group's insert"))?;
                    }
                    return Err(GroupError::OneByOne);
                }
                Err(e) => return Err(fatal("appending events")(e)),
            }
        }
        if several {
            sqlx::raw_sql("RELEASE group_insert")
                .execute(&mut *conn)
                .await
                .map_err(fatal("finishing the group's insert"))?;
        }
    }
    Ok((answers(group, plans, first_position), committed))
}

/// Insert `appends` (stream, last version, first version, first position) when
/// given, then rows (append, its base version, event, offset in the append) at the
/// positions from `first`, in one statement.
async fn insert_rows(
    conn: &mut SqliteConnection,
    appends: Option<&[(&str, i64, i64, i64)]>,
    rows: &[(&Write, u64, &Encoded, u64)],
    first: u64,
    now: i64,
    commit: bool,
) -> Result<(), sqlx::Error> {
    let appends = appends.unwrap_or_default();
    let mut sql = String::new();
    if !appends.is_empty() {
        sql.push_str(
            "INSERT INTO _shoal_es_appends (stream, last_version, first_version, first_position) VALUES ",
        );
        sql.push_str(&vec!["(?, ?, ?, ?)"; appends.len()].join(","));
        sql.push_str("; ");
    }
    sql.push_str(
        "INSERT INTO _shoal_es_events
         (position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms) VALUES ",
    );
    sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; rows.len()].join(","));
    if commit {
        sql.push_str("; COMMIT");
    }
    // Built from fixed fragments only; every value is bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (stream, last_version, first_version, first_position) in appends {
        q = q
            .bind(*stream)
            .bind(*last_version)
            .bind(*first_version)
            .bind(*first_position);
    }
    for (i, (w, base, e, k)) in rows.iter().enumerate() {
        q = q
            .bind((first + i as u64) as i64)
            .bind(&w.stream)
            .bind((base + k) as i64)
            .bind(&e.id)
            .bind(&e.event_type)
            .bind(e.type_version as i64)
            .bind(&e.data)
            .bind(&e.metadata)
            .bind(now);
    }
    q.execute(&mut *conn).await?;
    Ok(())
}

/// One append alone (after its group was refused): a group of one, so the same
/// decisions; a refused insert is then this append's own.
async fn append_one(conn: &mut SqliteConnection, w: &Write) -> Result<Appended, Error> {
    match append_group(conn, std::slice::from_ref(w), Ends::Neither).await {
        Ok((mut results, _)) => results
            .pop()
            .unwrap_or_else(|| Err(Error::internal("an append went unanswered"))),
        Err(GroupError::Fatal(e)) => Err(e),
        Err(GroupError::OneByOne) => Err(id_taken(w)),
    }
}

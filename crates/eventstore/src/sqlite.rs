//! The event store's writer on SQLite.
//!
//! With `synchronous = FULL` every commit is an fsync. SQLite has one writer at a
//! time and positions are assigned in commit order (`AUTOINCREMENT`), so the global
//! order a reader sees has no gaps. sqlx runs every statement as a round trip to the
//! connection's thread, so a group is written in as few statements as possible: one
//! query checks every append, one INSERT writes every accepted event.
//!
//! The events table has two indexes, the row id (the position) and a unique one on
//! (stream, version); there is none on the event id. Each index costs every commit
//! a few more pages in the WAL (measured: 11.4 pages per 100 rows for the bare
//! table, 22.0 with the event id index of schema 1, 16.6 without it), and the
//! commit's time follows the pages it writes. A repeated append is recognised
//! through (stream, version) instead (see [`crate::store::lookups`]).

use crate::store::{
    answers, db_err, fail_all, id_taken, lookups, plan, rows_of, Encoded, Stored, Write,
};
use crate::types::Appended;
use shoal_core::Error;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use std::collections::HashMap;

/// The version of the event store's tables this code writes; kept in
/// `_shoal_es_schema`. 1 (no row): the events table had a unique index on the event
/// id. 2: it has none; repeated appends are recognised through (stream, version).
pub(crate) const SCHEMA_VERSION: i64 = 2;

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

/// The events table of schema 2, named `$table`.
macro_rules! events_table {
    ($table:literal) => {
        concat!(
            "CREATE TABLE ",
            $table,
            " (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    type_version INTEGER NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    UNIQUE (stream, version)
);"
        )
    };
}

/// Schema 1 to 2: SQLite cannot drop the index of a column's `UNIQUE`, so the
/// events table is copied into one without it (positions kept, and AUTOINCREMENT's
/// high-water mark with them), in the transaction that checked the version.
const MIGRATE_1_TO_2: &str = concat!(
    events_table!("_shoal_es_events_v2"),
    "
INSERT INTO _shoal_es_events_v2
    (position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms)
    SELECT position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms
      FROM _shoal_es_events ORDER BY position;
DELETE FROM sqlite_sequence WHERE name = '_shoal_es_events_v2';
INSERT INTO sqlite_sequence (name, seq)
    SELECT '_shoal_es_events_v2', MAX(seq) FROM (
        SELECT seq FROM sqlite_sequence WHERE name = '_shoal_es_events'
        UNION ALL SELECT COALESCE(MAX(position), 0) FROM _shoal_es_events_v2);
DROP TABLE _shoal_es_events;
ALTER TABLE _shoal_es_events_v2 RENAME TO _shoal_es_events;
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
        events_table!("_shoal_es_events")
    } else {
        tracing::info!("event store: moving the events table to schema 2 (no event id index)");
        MIGRATE_1_TO_2
    };
    sqlx::raw_sql(change)
        .execute(&mut *conn)
        .await
        .map_err(db_err("migrating the event store's tables to schema 2"))?;
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
        // The group's insert was refused as a whole (an event id used twice) and
        // undone: append one by one so only the offending append fails. No
        // savepoints are needed here: every check happens before an append writes,
        // and its one INSERT writes all its events or (SQLite undoes a failed
        // statement) none.
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

/// Rows per INSERT statement: 8 values each, under SQLite's 32,766 variables. Tests
/// use a tiny one so that groups of several statements (and their savepoint) are
/// exercised by every larger append.
const ROWS_PER_INSERT: usize = if cfg!(test) { 3 } else { 4_000 };

/// The whole group in a few statements: one query for the streams' versions and the
/// repeated appends, then every accepted event in one INSERT (a few for a very
/// large group), so the group costs about as much as one append.
///
/// With [`Ends::Both`] the check query begins the transaction (`BEGIN IMMEDIATE`)
/// and the last INSERT commits it, when that is safe (one INSERT, no savepoint);
/// the answer says whether it did.
async fn append_group(
    conn: &mut SqliteConnection,
    group: &[Write],
    ends: Ends,
) -> Result<(Vec<Result<Appended, Error>>, bool), GroupError> {
    let fatal = |what: &'static str| move |e: sqlx::Error| GroupError::Fatal(db_err(what)(e));
    let (streams, probes) = lookups(group);
    // One sub-select per stream: SQLite answers `MAX(version)` for one stream from
    // the end of the (stream, version) index. The probes go through the same index
    // (a range of versions of one stream, the ids compared in the rows).
    let mut sql = String::from(if ends == Ends::Both {
        "BEGIN IMMEDIATE; "
    } else {
        ""
    });
    // A probe counted from its stream's version gets the version first (once per
    // probe, materialized), then the events table is entered through the
    // (stream, version) index at the probe's range; the cross join keeps SQLite
    // from scanning a whole stream with the range checked afterwards.
    sql.push_str(
        "WITH p AS MATERIALIZED (
             SELECT column1 AS stream, column2 AS id, column5 - column4 AS span,
                    column4 + CASE column3 WHEN 1 THEN
                        (SELECT COALESCE(MAX(version), 0) FROM _shoal_es_events WHERE stream = column1)
                    ELSE 0 END AS lo
               FROM (VALUES ",
    );
    sql.push_str(&vec!["(?, ?, ?, ?, ?)"; probes.len()].join(","));
    sql.push_str(
        ")
         )
         SELECT 1, e.id, e.stream, e.version, e.position
           FROM p CROSS JOIN _shoal_es_events e
          WHERE e.stream = p.stream AND e.version BETWEEN p.lo AND p.lo + p.span AND e.id = p.id",
    );
    // The streams' versions from a VALUES list too: a compound SELECT has at most
    // 500 terms, and a group up to 512 streams.
    sql.push_str(&format!(
        " UNION ALL SELECT 0, column1, '',
              (SELECT COALESCE(MAX(version), 0) FROM _shoal_es_events WHERE stream = column1), 0
            FROM (VALUES {})",
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
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut stored: Stored = HashMap::new();
    for (kind, key, stream, version, position) in q
        .fetch_all(&mut *conn)
        .await
        .map_err(fatal("checking the group's appends"))?
    {
        if kind == 0 {
            versions.insert(key, version as u64);
        } else {
            stored.insert((stream, key), (version as u64, position as u64));
        }
    }
    let (plans, rows) = plan(group, versions, &stored);

    // Every accepted event, in order; positions follow one another.
    let mut first_position = 0u64;
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
        let mut last_position = 0i64;
        // A lone INSERT can carry the COMMIT: if it fails, the COMMIT is not run.
        let commit = ends == Ends::Both && !several;
        for chunk in pending.chunks(ROWS_PER_INSERT) {
            match insert_rows(conn, chunk, now, commit).await {
                Ok(p) => {
                    last_position = p;
                    committed = commit;
                }
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
        first_position = last_position as u64 + 1 - rows as u64;
    }
    Ok((answers(group, plans, first_position), committed))
}

/// Insert rows (append, its base version, event, offset in the append) in one
/// statement; the position of the last row.
async fn insert_rows(
    conn: &mut SqliteConnection,
    rows: &[(&Write, u64, &Encoded, u64)],
    now: i64,
    commit: bool,
) -> Result<i64, sqlx::Error> {
    let mut sql = String::from(
        "INSERT INTO _shoal_es_events
         (stream, version, id, event_type, type_version, data, metadata, recorded_at_ms) VALUES ",
    );
    for i in 0..rows.len() {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?)");
    }
    if commit {
        sql.push_str("; COMMIT");
    }
    // Built from fixed fragments only; every value is bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (w, base, e, k) in rows {
        q = q
            .bind(&w.stream)
            .bind((base + k) as i64)
            .bind(&e.id)
            .bind(&e.event_type)
            .bind(e.type_version as i64)
            .bind(&e.data)
            .bind(&e.metadata)
            .bind(now);
    }
    Ok(q.execute(&mut *conn).await?.last_insert_rowid())
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

//! The event store's writer on SQLite.
//!
//! With `synchronous = FULL` every commit is an fsync. SQLite has one writer at a
//! time and positions are assigned in commit order (`AUTOINCREMENT`), so the global
//! order a reader sees has no gaps. sqlx runs every statement as a round trip to the
//! connection's thread, so a group is written in as few statements as possible: one
//! query checks every append, one INSERT writes every accepted event.

use crate::store::{answers, db_err, fail_all, id_taken, lookups, plan, rows_of, Encoded, Write};
use crate::types::Appended;
use shoal_core::Error;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use std::collections::HashMap;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _shoal_es_events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    type_version INTEGER NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    UNIQUE (stream, version)
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

/// Make the tables if missing; the head position.
pub(crate) async fn prepare(pool: &SqlitePool) -> Result<u64, Error> {
    sqlx::raw_sql(SCHEMA)
        .execute(pool)
        .await
        .map_err(db_err("creating the event store's tables"))?;
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM _shoal_es_events")
        .fetch_one(pool)
        .await
        .map_err(db_err("reading the event store's head"))?;
    Ok(head as u64)
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
    let (streams, ids) = lookups(group);
    // One sub-select per stream: SQLite answers `MAX(version)` for one stream from
    // the end of the (stream, version) index, where a GROUP BY over an IN list would
    // walk every event of every stream in it.
    let mut sql = String::from(if ends == Ends::Both {
        "BEGIN IMMEDIATE; "
    } else {
        ""
    });
    for _ in &streams {
        sql.push_str(
            "SELECT 0, ?, '', (SELECT COALESCE(MAX(version), 0) FROM _shoal_es_events WHERE stream = ?), 0 UNION ALL ",
        );
    }
    sql.push_str(&format!(
        "SELECT 1, id, stream, version, position FROM _shoal_es_events WHERE id IN ({})",
        vec!["?"; ids.len()].join(",")
    ));
    // Built from fixed fragments only; every value is bound.
    let mut q = sqlx::query_as::<_, (i64, String, String, i64, i64)>(sqlx::AssertSqlSafe(sql));
    for st in &streams {
        q = q.bind(*st).bind(*st);
    }
    for id in &ids {
        q = q.bind(*id);
    }
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut stored: HashMap<String, (String, u64, u64)> = HashMap::new();
    for (kind, key, stream, version, position) in q
        .fetch_all(&mut *conn)
        .await
        .map_err(fatal("checking the group's appends"))?
    {
        if kind == 0 {
            versions.insert(key, version as u64);
        } else {
            stored.insert(key, (stream, version as u64, position as u64));
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

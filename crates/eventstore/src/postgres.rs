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

use crate::store::{advance, answers, db_err, fail_all, id_taken, lookups, plan, rows_of, Write};
use crate::types::Appended;
use shoal_core::Error;
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_es_events'));
CREATE TABLE IF NOT EXISTS _shoal_es_events (
    position BIGINT PRIMARY KEY,
    stream TEXT NOT NULL,
    version BIGINT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    type_version BIGINT NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    recorded_at_ms BIGINT NOT NULL,
    UNIQUE (stream, version)
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
COMMIT;
";

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
    let (head, schema): (i64, String) = sqlx::query_as(
        "SELECT COALESCE(MAX(position), 0), current_schema()::text FROM _shoal_es_events",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err("reading the event store's head"))?;
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

pub(crate) async fn commit_group(
    pool: &PgPool,
    channel: &str,
    group: &[Write],
) -> Vec<Result<Appended, Error>> {
    let mut conn = match pool.acquire().await {
        Ok(c) => c,
        Err(e) => return fail_all(group, &db_err("acquiring a connection to append")(e)),
    };
    match append_group(&mut conn, channel, group).await {
        Ok(results) => results,
        Err(GroupError::Fatal(e)) => fail_all(group, &e),
        // An event id used twice: the transaction is gone (PostgreSQL aborts it on
        // the failed statement), so each append goes again in its own, and only the
        // offending one fails.
        Err(GroupError::OneByOne) => {
            let mut results = Vec::with_capacity(group.len());
            for w in group {
                results.push(
                    match append_group(&mut conn, channel, std::slice::from_ref(w)).await {
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
    let (streams, ids) = lookups(group);
    // Kind 0: a stream's version; kind 1: an event stored already; kind 2: the
    // head. The lock is held, so all of it stays true until commit.
    let checked: Vec<(i64, String, String, i64, i64)> = sqlx::query_as(
        "SELECT 0::int8, s.stream, ''::text,
                COALESCE((SELECT MAX(e.version) FROM _shoal_es_events e WHERE e.stream = s.stream), 0)::int8,
                0::int8
           FROM UNNEST($1::text[]) AS s(stream)
         UNION ALL
         SELECT 1, id, stream, version, position FROM _shoal_es_events WHERE id = ANY($2::text[])
         UNION ALL
         SELECT 2, '', '', COALESCE(MAX(position), 0), 0 FROM _shoal_es_events",
    )
    .bind(&streams)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(fatal("checking the group's appends"))?;
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut stored: HashMap<String, (String, u64, u64)> = HashMap::new();
    let mut head = 0u64;
    for (kind, key, stream, version, position) in checked {
        match kind {
            0 => {
                versions.insert(key, version as u64);
            }
            1 => {
                stored.insert(key, (stream, version as u64, position as u64));
            }
            _ => head = version as u64,
        }
    }
    let (plans, rows) = plan(group, versions, &stored);
    if rows > 0 {
        let pending = rows_of(group, &plans, rows);
        let mut positions = Vec::with_capacity(rows);
        let mut stream = Vec::with_capacity(rows);
        let mut version = Vec::with_capacity(rows);
        let mut id = Vec::with_capacity(rows);
        let mut event_type = Vec::with_capacity(rows);
        let mut type_version = Vec::with_capacity(rows);
        let mut data = Vec::with_capacity(rows);
        let mut metadata = Vec::with_capacity(rows);
        for (i, (w, base, e, k)) in pending.iter().enumerate() {
            positions.push((head + 1 + i as u64) as i64);
            stream.push(w.stream.as_str());
            version.push((base + k) as i64);
            id.push(e.id.as_str());
            event_type.push(e.event_type.as_str());
            type_version.push(i64::from(e.type_version));
            data.push(e.data.as_str());
            metadata.push(e.metadata.as_str());
        }
        let inserted = sqlx::query(
            "INSERT INTO _shoal_es_events
               (position, stream, version, id, event_type, type_version, data, metadata, recorded_at_ms)
             SELECT u.*, $9::int8 FROM UNNEST($1::int8[], $2::text[], $3::int8[], $4::text[],
                                              $5::text[], $6::int8[], $7::text[], $8::text[]) AS u",
        )
        .bind(&positions)
        .bind(&stream)
        .bind(&version)
        .bind(&id)
        .bind(&event_type)
        .bind(&type_version)
        .bind(&data)
        .bind(&metadata)
        .bind(shoal_core::unix_ms() as i64)
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

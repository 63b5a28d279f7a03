//! A service's own database: SQLite by default, with embedded migrations.

use shoal_core::Error;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Connection;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// One schema change, embedded in the service binary (`include_str!`).
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Applied in increasing order; never reuse or change an applied version.
    pub version: i64,
    /// A short name, for people.
    pub name: &'static str,
    /// SQL statements.
    pub sql: &'static str,
}

impl Migration {
    /// A migration (usable in a `static`).
    pub const fn new(version: i64, name: &'static str, sql: &'static str) -> Self {
        Self { version, name, sql }
    }
}

/// A service's database: a pool of connections to its own SQLite file.
#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
}

fn db_err(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let what = what.into();
    move |e| {
        Error::new(
            shoal_core::ErrorKind::Io,
            shoal_core::Origin::Internal,
            what,
        )
        .with_source(e)
    }
}

/// FNV-1a: a stable checksum of a migration's text, to notice one edited after it ran.
fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl Db {
    /// Open (creating if missing) the database at `url` (`sqlite://path` or a path)
    /// and apply `migrations`.
    ///
    /// SQLite runs in WAL mode with `synchronous = FULL`: a committed transaction is
    /// on disk. A file that is not a database is refused with an error naming it.
    pub async fn open(
        url: &str,
        migrations: &[Migration],
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, Error> {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        if let Some(dir) = Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::config(format!("cannot create data directory {}", dir.display()))
                        .with_source(e)
                })?;
            }
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(db_err(format!("database url {url:?}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(opts)
            .await
            .map_err(db_err(format!("cannot open database {path}")))?;
        let db = Self { pool };
        db.migrate(migrations)
            .await
            .map_err(|e| Error::config(format!("database {path}: {e}")))?;
        Ok(db)
    }

    /// The connection pool, for queries (`sqlx::query(..).fetch_all(db.pool())`).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Apply the migrations not yet applied, each in its own transaction. Replicas
    /// starting together are serialised by an immediate (write) transaction.
    async fn migrate(&self, migrations: &[Migration]) -> Result<(), Error> {
        let mut sorted = migrations.to_vec();
        sorted.sort_by_key(|m| m.version);
        if sorted.windows(2).any(|w| w[0].version == w[1].version) {
            return Err(Error::config("two migrations share a version"));
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(db_err("acquiring a connection"))?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS _shoal_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                checksum TEXT NOT NULL,
                applied_at_ms INTEGER NOT NULL
            )",
        )
        .execute(&mut *conn)
        .await
        .map_err(db_err(
            "creating the migrations table (is this file a SQLite database?)",
        ))?;
        for m in &sorted {
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut *conn)
                .await
                .map_err(db_err("locking for migration"))?;
            let result = async {
                let applied: Option<(String,)> =
                    sqlx::query_as("SELECT checksum FROM _shoal_migrations WHERE version = ?")
                        .bind(m.version)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_err("reading applied migrations"))?;
                match applied {
                    Some((sum,)) if sum == checksum(m.sql) => Ok(()),
                    Some(_) => Err(Error::config(format!(
                        "migration {} ({}) was changed after it was applied; add a new migration instead",
                        m.version, m.name
                    ))),
                    None => {
                        sqlx::raw_sql(m.sql)
                            .execute(&mut *conn)
                            .await
                            .map_err(db_err(format!("migration {} ({})", m.version, m.name)))?;
                        sqlx::query("INSERT INTO _shoal_migrations (version, name, checksum, applied_at_ms) VALUES (?, ?, ?, ?)")
                            .bind(m.version)
                            .bind(m.name)
                            .bind(checksum(m.sql))
                            .bind(shoal_core::unix_ms() as i64)
                            .execute(&mut *conn)
                            .await
                            .map_err(db_err("recording migration"))?;
                        tracing::info!(version = m.version, name = m.name, "migration applied");
                        Ok(())
                    }
                }
            }
            .await;
            let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
            sqlx::raw_sql(end)
                .execute(&mut *conn)
                .await
                .map_err(db_err("ending migration"))?;
            result?;
        }
        Ok(())
    }

    /// Readiness: the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), Error> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(db_err("acquiring a connection"))?;
        conn.ping().await.map_err(db_err("database ping"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> String {
        let dir = std::env::temp_dir().join(format!("shoal-db-{}", uuid::Uuid::new_v4()));
        dir.join(name).display().to_string()
    }

    static M: &[Migration] = &[
        Migration::new(
            1,
            "items",
            "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER NOT NULL);",
        ),
        Migration::new(
            2,
            "seed",
            "INSERT INTO items VALUES ('a', 1); INSERT INTO items VALUES ('b', 2);",
        ),
    ];

    #[tokio::test]
    async fn migrations_apply_once_and_edits_are_refused() {
        let url = tmp("x.db");
        let db = Db::open(&url, M, 2, Duration::from_secs(5)).await.unwrap();
        drop(db);
        // Applying again is a no-op (the seed rows are not doubled).
        let db = Db::open(&url, M, 2, Duration::from_secs(5)).await.unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM items")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 2);
        db.ping().await.unwrap();
        drop(db);
        let edited = [
            M[0],
            Migration::new(2, "seed", "INSERT INTO items VALUES ('c', 3);"),
        ];
        let err = Db::open(&url, &edited, 2, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("changed after it was applied"), "{err}");
    }

    #[tokio::test]
    async fn a_corrupt_file_is_refused_with_its_name() {
        let url = tmp("bad.db");
        std::fs::create_dir_all(Path::new(&url).parent().unwrap()).unwrap();
        std::fs::write(&url, vec![0x42u8; 8192]).unwrap();
        let err = Db::open(&url, M, 2, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.db"), "{err}");
    }

    #[tokio::test]
    async fn a_failing_migration_leaves_nothing_behind() {
        let url = tmp("f.db");
        let bad = [
            M[0],
            Migration::new(
                2,
                "broken",
                "INSERT INTO items VALUES ('a', 1); INSERT INTO nope VALUES (1);",
            ),
        ];
        assert!(Db::open(&url, &bad, 2, Duration::from_secs(5))
            .await
            .is_err());
        let db = Db::open(&url, M, 2, Duration::from_secs(5)).await.unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM items")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 2);
    }
}

//! Database per service: each service owns its data, and reaches it only through its
//! own [`Db`].
//!
//! - SQLite by default: one file in the service's data directory, in WAL mode with
//!   `synchronous = FULL` (a committed transaction is on disk);
//! - PostgreSQL by configuration: the service's own database, or its own schema in a
//!   shared database, with its own credentials, so the server's privileges, not good
//!   manners, keep services out of each other's tables.
//!
//! Services write queries once, for both: [`Db::pool`] is a sqlx `AnyPool` (portable
//! SQL with `$1` placeholders, which SQLite accepts too). Platform crates that need a
//! backend's own speed (the event store's group commit) take [`Db::native`].
//! Migrations are embedded in the binary, applied once each at start, checksummed
//! so an edited migration is refused, with a PostgreSQL variant where SQL differs.

use shoal_core::{Error, ErrorKind, Origin};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::AnyPool;
use sqlx::{ConnectOptions, Connection};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

#[cfg(test)]
mod tests;

/// One schema change, embedded in the service binary (`include_str!`).
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Applied in increasing order; never reuse or change an applied version.
    pub version: i64,
    /// A short name, for people.
    pub name: &'static str,
    /// SQL statements (for both backends unless [`Self::postgres`] is set).
    pub sql: &'static str,
    /// SQL for PostgreSQL, where it differs from [`Self::sql`].
    pub postgres_sql: Option<&'static str>,
}

impl Migration {
    /// A migration whose SQL suits both backends (usable in a `static`).
    pub const fn new(version: i64, name: &'static str, sql: &'static str) -> Self {
        Self {
            version,
            name,
            sql,
            postgres_sql: None,
        }
    }

    /// The same migration with its own SQL for PostgreSQL.
    pub const fn postgres(mut self, sql: &'static str) -> Self {
        self.postgres_sql = Some(sql);
        self
    }

    fn sql_for(&self, backend: Backend) -> &'static str {
        match (backend, self.postgres_sql) {
            (Backend::Postgres, Some(sql)) => sql,
            _ => self.sql,
        }
    }
}

/// Which database engine a [`Db`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL database (or schema).
    Postgres,
}

/// The backend's own pool, for platform code that needs what the portable API
/// cannot give (group commit, `LISTEN`, arrays).
#[derive(Clone, Debug)]
pub enum Native {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL, with the service's schema on its search path.
    Postgres(PgPool),
}

/// How to open a service's database.
#[derive(Clone, Debug)]
pub struct DbOptions {
    /// `sqlite://path` (or a bare path), or `postgres://user:password@host:port/db`.
    pub url: String,
    /// PostgreSQL only: the schema the service's tables live in (created if missing
    /// and put first on the search path). `None` keeps the role's default.
    pub schema: Option<String>,
    /// Most pooled connections (for each of the portable and the native pool).
    pub max_connections: u32,
    /// Longest wait for a pooled connection.
    pub acquire_timeout: Duration,
}

impl DbOptions {
    /// Options for `url` with 8 connections and a 5 s acquire timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// A service's database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    any: AnyPool,
    native: Native,
    /// The URL without its password, for messages.
    label: String,
}

/// A database error as a shoal error, saying what was being done. A SQLite file that
/// is not a database says so; a refused connection or a pool timeout is worth a
/// retry, other failures are not.
pub fn db_err(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let what = what.into();
    move |e| {
        let corrupt = e.as_database_error().is_some_and(|d| {
            d.message().contains("not a database") || d.message().contains("malformed")
        });
        let kind = match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Io,
        };
        let what = if corrupt {
            format!("{what}: the database file is corrupt or not a SQLite database")
        } else {
            what
        };
        Error::new(kind, Origin::Internal, what).with_source(e)
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

/// `postgres://user:secret@host/db` as `postgres://user@host/db`.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A schema name is a plain identifier: it is spliced into `SET search_path`.
fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl Db {
    /// Open (for SQLite: creating if missing) the database `opts` names and apply
    /// `migrations`. A SQLite file that is not a database, an unreachable server or
    /// refused credentials are errors naming the database.
    pub async fn open(opts: &DbOptions, migrations: &[Migration]) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let url = opts.url.as_str();
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::open_postgres(opts).await?
        } else {
            if opts.schema.is_some() {
                return Err(Error::config(
                    "database.schema: only PostgreSQL has schemas",
                ));
            }
            Self::open_sqlite(opts).await?
        };
        let label = db.inner.label.clone();
        db.migrate(migrations)
            .await
            .map_err(|e| Error::config(format!("database {label}: {e}")))?;
        Ok(db)
    }

    async fn open_sqlite(opts: &DbOptions) -> Result<Self, Error> {
        let path = opts.url.strip_prefix("sqlite://").unwrap_or(&opts.url);
        if let Some(dir) = Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::config(format!("cannot create data directory {}", dir.display()))
                        .with_source(e)
                })?;
            }
        }
        let native_opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(db_err(format!("database url {:?}", opts.url)))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        // The native pool opens the file first: it creates it and switches it to WAL
        // (a property of the file), so the portable pool's connections find it so.
        // No ping before handing out a connection: a SQLite connection is a file
        // handle, not a socket that can die, and the ping is a round trip to the
        // connection's thread on every acquire.
        let native = SqlitePoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(native_opts)
            .await
            .map_err(db_err(format!("cannot open database {path}")))?;
        let any_opts = AnyConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(db_err(format!("database url {:?}", opts.url)))?;
        let any = AnyPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .test_before_acquire(false)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::raw_sql(
                        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000",
                    )
                    .execute(conn)
                    .await
                    .map(|_| ())
                })
            })
            .connect_with(any_opts)
            .await
            .map_err(db_err(format!("cannot open database {path}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                any,
                native: Native::Sqlite(native),
                label: path.to_string(),
            }),
        })
    }

    async fn open_postgres(opts: &DbOptions) -> Result<Self, Error> {
        let label = without_password(&opts.url);
        if let Some(s) = &opts.schema {
            if !valid_schema(s) {
                return Err(Error::config(format!(
                    "database.schema {s:?}: use lowercase letters, digits and _ (at most 63)"
                )));
            }
        }
        let mut native_opts = PgConnectOptions::from_str(&opts.url)
            .map_err(db_err(format!("database url {label}")))?;
        if let Some(schema) = &opts.schema {
            // Create the schema before any pool puts it on the search path.
            let mut conn = native_opts
                .connect()
                .await
                .map_err(db_err(format!("cannot connect to database {label}")))?;
            // Look before creating: a least-privilege role owns its schema but may not
            // create schemas, and `CREATE SCHEMA IF NOT EXISTS` asks for that right.
            let exists: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM pg_namespace WHERE nspname = $1")
                    .bind(schema)
                    .fetch_optional(&mut conn)
                    .await
                    .map_err(db_err(format!("looking for schema {schema} in {label}")))?;
            if exists.is_none() {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut conn)
                    .await
                    .map_err(db_err(format!("creating schema {schema} in {label}")))?;
            }
            let _ = conn.close().await;
            native_opts = native_opts.options([("search_path", schema.as_str())]);
        }
        let native = PgPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(native_opts)
            .await
            .map_err(db_err(format!("cannot connect to database {label}")))?;
        let any_opts = AnyConnectOptions::from_str(&opts.url)
            .map_err(db_err(format!("database url {label}")))?;
        let schema = opts.schema.clone();
        let any = AnyPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .after_connect(move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    if let Some(schema) = schema {
                        // Checked by valid_schema: a plain identifier.
                        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}")))
                            .execute(conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(any_opts)
            .await
            .map_err(db_err(format!("cannot connect to database {label}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                any,
                native: Native::Postgres(native),
                label,
            }),
        })
    }

    /// The portable pool: `sqlx::query("SELECT name FROM items WHERE id = $1")
    /// .bind(id).fetch_all(db.pool())` runs on either backend.
    pub fn pool(&self) -> &AnyPool {
        &self.inner.any
    }

    /// The backend's own pool.
    pub fn native(&self) -> &Native {
        &self.inner.native
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self.inner.native {
            Native::Sqlite(_) => Backend::Sqlite,
            Native::Postgres(_) => Backend::Postgres,
        }
    }

    /// The database, for messages (a URL without its password, or a file path).
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Apply the migrations not yet applied, each in its own transaction. Replicas
    /// starting together are serialised: by an immediate (write) transaction on
    /// SQLite, by a transaction-scoped advisory lock on PostgreSQL.
    async fn migrate(&self, migrations: &[Migration]) -> Result<(), Error> {
        let mut sorted = migrations.to_vec();
        sorted.sort_by_key(|m| m.version);
        if sorted.windows(2).any(|w| w[0].version == w[1].version) {
            return Err(Error::config("two migrations share a version"));
        }
        let backend = self.backend();
        let mut conn = self
            .inner
            .any
            .acquire()
            .await
            .map_err(db_err("acquiring a connection"))?;
        let (begin, table) = match backend {
            Backend::Sqlite => (
                "BEGIN IMMEDIATE",
                "CREATE TABLE IF NOT EXISTS _shoal_migrations (
                    version INTEGER PRIMARY KEY,
                    name TEXT NOT NULL,
                    checksum TEXT NOT NULL,
                    applied_at_ms INTEGER NOT NULL
                )",
            ),
            Backend::Postgres => (
                "BEGIN; SELECT pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_migrations'))",
                "CREATE TABLE IF NOT EXISTS _shoal_migrations (
                    version BIGINT PRIMARY KEY,
                    name TEXT NOT NULL,
                    checksum TEXT NOT NULL,
                    applied_at_ms BIGINT NOT NULL
                )",
            ),
        };
        if backend == Backend::Postgres {
            // Two replicas creating the table at once would collide on the catalog.
            sqlx::raw_sql(begin)
                .execute(&mut *conn)
                .await
                .map_err(db_err("locking for migration"))?;
        }
        let created = sqlx::raw_sql(table).execute(&mut *conn).await;
        if backend == Backend::Postgres {
            let end = if created.is_ok() {
                "COMMIT"
            } else {
                "ROLLBACK"
            };
            sqlx::raw_sql(end)
                .execute(&mut *conn)
                .await
                .map_err(db_err("ending migration"))?;
        }
        created.map_err(db_err(match backend {
            Backend::Sqlite => "creating the migrations table (is this file a SQLite database?)",
            Backend::Postgres => "creating the migrations table",
        }))?;
        for m in &sorted {
            let sql = m.sql_for(backend);
            sqlx::raw_sql(begin)
                .execute(&mut *conn)
                .await
                .map_err(db_err("locking for migration"))?;
            let result = async {
                let applied: Option<(String,)> =
                    sqlx::query_as("SELECT checksum FROM _shoal_migrations WHERE version = $1")
                        .bind(m.version)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_err("reading applied migrations"))?;
                match applied {
                    Some((sum,)) if sum == checksum(sql) => Ok(()),
                    Some(_) => Err(Error::config(format!(
                        "migration {} ({}) was changed after it was applied; add a new migration instead",
                        m.version, m.name
                    ))),
                    None => {
                        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                            .execute(&mut *conn)
                            .await
                            .map_err(db_err(format!("migration {} ({})", m.version, m.name)))?;
                        sqlx::query("INSERT INTO _shoal_migrations (version, name, checksum, applied_at_ms) VALUES ($1, $2, $3, $4)")
                            .bind(m.version)
                            .bind(m.name)
                            .bind(checksum(sql))
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

    /// Run a platform part's own table script (`CREATE TABLE IF NOT EXISTS …`),
    /// the one for this backend, in one go on one connection. The PostgreSQL
    /// scripts open a transaction (and take an advisory lock in it, so two
    /// processes starting at once do not race); a failure rolls it back before the
    /// connection returns to the pool. `what` names the tables in the error.
    pub async fn ensure_tables(
        &self,
        sqlite: &'static str,
        postgres: &'static str,
        what: &str,
    ) -> Result<(), Error> {
        let sql = match self.backend() {
            Backend::Sqlite => sqlite,
            Backend::Postgres => postgres,
        };
        let mut conn = self.pool().acquire().await.map_err(db_err(format!(
            "acquiring a connection to {} to create {what}",
            self.label()
        )))?;
        if let Err(e) = sqlx::raw_sql(sql).execute(&mut *conn).await {
            if self.backend() == Backend::Postgres {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            }
            return Err(db_err(format!("creating {what} in {}", self.label()))(e));
        }
        Ok(())
    }

    /// Readiness: the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        let mut conn = self
            .inner
            .any
            .acquire()
            .await
            .map_err(db_err("acquiring a connection"))?;
        conn.ping().await.map_err(db_err("database ping"))
    }

    /// Close both pools, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.inner.any.close().await;
        match &self.inner.native {
            Native::Sqlite(p) => p.close().await,
            Native::Postgres(p) => p.close().await,
        }
    }
}

//! A real PostgreSQL server (`scripts/postgres`), and a fresh database per test.

use sqlx::Connection;
use std::sync::OnceLock;

/// The environment variable holding the admin URL of the test server. Not `SHOAL_*`:
/// services read those as configuration and refuse names they do not know.
pub const URL_VAR: &str = "POSTGRES_TEST_URL";

/// The admin (superuser) URL of the test server: from [`URL_VAR`] when set (as
/// `scripts/test` does), otherwise from `scripts/postgres start`, which installs and
/// starts the server if needed and leaves it running for the next test.
///
/// # Panics
/// When no server can be had: a test of the PostgreSQL backend must not pass
/// without one.
pub fn admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| crate::server_address(URL_VAR, "postgres"))
}

/// The URL of `database` on the test server, connecting as `user`.
pub fn url_for(user: &str, database: &str) -> String {
    let admin = admin_url();
    // admin is postgres://postgres@HOST:PORT/postgres
    let host = admin
        .split_once('@')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(host, _)| host)
        .unwrap_or_else(|| panic!("unexpected admin URL {admin}"));
    format!("postgres://{user}@{host}/{database}")
}

/// Run `sql` (one or more statements) as the superuser on `database`.
///
/// # Panics
/// When the server refuses it.
pub async fn admin_exec(database: &str, sql: &str) {
    let mut conn = sqlx::PgConnection::connect(&url_for("postgres", database))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
}

/// A new, empty database for one test, and its (superuser) URL. Databases are never
/// shared between tests, so tests run in parallel without seeing each other.
pub async fn fresh_database() -> String {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    admin_exec("postgres", &format!("CREATE DATABASE {name}")).await;
    url_for("postgres", &name)
}

/// The first column (as text) of every row `sql` returns on the database at `url`.
///
/// # Panics
/// When the server refuses it.
pub async fn query_strings(url: &str, sql: &str) -> Vec<String> {
    use sqlx::Row;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let _ = conn.close().await;
    rows.iter()
        .map(|r| {
            r.try_get::<String, _>(0)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
        .collect()
}

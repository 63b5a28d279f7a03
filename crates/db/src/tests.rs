//! The same tests on SQLite and on a real PostgreSQL server.

use super::*;
use shoal_testkit::postgres;

fn sqlite_url(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("shoal-db-{}", uuid::Uuid::new_v4()));
    dir.join(name).display().to_string()
}

static M: &[Migration] = &[
    Migration::new(
        1,
        "items",
        "CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL);",
    ),
    Migration::new(
        2,
        "seed",
        "INSERT INTO items VALUES ('a', 1); INSERT INTO items VALUES ('b', 2);",
    ),
];

async fn count(db: &Db) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM items")
        .fetch_one(db.pool())
        .await
        .unwrap();
    n
}

async fn migrations_apply_once_and_edits_are_refused(url: &str) {
    let opts = DbOptions::new(url);
    let db = Db::open(&opts, M).await.unwrap();
    db.close().await;
    // Applying again is a no-op (the seed rows are not doubled).
    let db = Db::open(&opts, M).await.unwrap();
    assert_eq!(count(&db).await, 2);
    db.ping().await.unwrap();
    // The portable API: `$n` placeholders, integers and text both ways.
    let (name, n): (String, i64) = sqlx::query_as("SELECT id, n FROM items WHERE n = $1")
        .bind(2i64)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!((name.as_str(), n), ("b", 2));
    db.close().await;
    let edited = [
        M[0],
        Migration::new(2, "seed", "INSERT INTO items VALUES ('c', 3);"),
    ];
    let err = Db::open(&opts, &edited).await.unwrap_err().to_string();
    assert!(err.contains("changed after it was applied"), "{err}");
}

async fn a_failing_migration_leaves_nothing_behind(url: &str) {
    let opts = DbOptions::new(url);
    let bad = [
        M[0],
        Migration::new(
            2,
            "broken",
            "INSERT INTO items VALUES ('a', 1); INSERT INTO nope VALUES (1);",
        ),
    ];
    let err = Db::open(&opts, &bad).await.unwrap_err().to_string();
    assert!(err.contains("migration 2 (broken)"), "{err}");
    let db = Db::open(&opts, M).await.unwrap();
    assert_eq!(count(&db).await, 2);
}

#[tokio::test]
async fn sqlite_migrations_apply_once_and_edits_are_refused() {
    migrations_apply_once_and_edits_are_refused(&sqlite_url("x.db")).await;
}

#[tokio::test]
async fn postgres_migrations_apply_once_and_edits_are_refused() {
    migrations_apply_once_and_edits_are_refused(&postgres::fresh_database().await).await;
}

#[tokio::test]
async fn sqlite_a_failing_migration_leaves_nothing_behind() {
    a_failing_migration_leaves_nothing_behind(&sqlite_url("f.db")).await;
}

#[tokio::test]
async fn postgres_a_failing_migration_leaves_nothing_behind() {
    a_failing_migration_leaves_nothing_behind(&postgres::fresh_database().await).await;
}

#[tokio::test]
async fn a_corrupt_file_is_refused_with_its_name() {
    let url = sqlite_url("bad.db");
    std::fs::create_dir_all(Path::new(&url).parent().unwrap()).unwrap();
    std::fs::write(&url, vec![0x42u8; 8192]).unwrap();
    let err = Db::open(&DbOptions::new(&url), M)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.db"), "{err}");
}

#[tokio::test]
async fn a_postgres_migration_has_its_own_sql_where_it_differs() {
    let url = postgres::fresh_database().await;
    let m = [Migration::new(
        1,
        "seq",
        "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT);",
    )
    .postgres("CREATE TABLE t (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY);")];
    let db = Db::open(&DbOptions::new(&url), &m).await.unwrap();
    assert_eq!(db.backend(), Backend::Postgres);
    sqlx::query("INSERT INTO t DEFAULT VALUES")
        .execute(db.pool())
        .await
        .unwrap();
}

/// Two services in one PostgreSQL database, each with its own role and schema: each
/// migrates its own `items` table, and neither can read the other's.
#[tokio::test]
async fn services_in_one_postgres_database_cannot_reach_each_others_tables() {
    let admin = postgres::fresh_database().await;
    let dbname = admin.rsplit('/').next().unwrap().to_string();
    let suffix = &dbname[2..10];
    let (orders, payments) = (format!("orders_{suffix}"), format!("payments_{suffix}"));
    for role in [&orders, &payments] {
        postgres::admin_exec(
            &dbname,
            &format!(
                "CREATE ROLE {role} LOGIN; CREATE SCHEMA {role} AUTHORIZATION {role};
                 REVOKE ALL ON SCHEMA public FROM PUBLIC;"
            ),
        )
        .await;
    }
    let open = |role: &str| {
        let mut o = DbOptions::new(postgres::url_for(role, &dbname));
        o.schema = Some(role.to_string());
        o
    };
    let a = Db::open(&open(&orders), M).await.unwrap();
    let b = Db::open(&open(&payments), M).await.unwrap();
    sqlx::query("INSERT INTO items VALUES ('only-orders', 9)")
        .execute(a.pool())
        .await
        .unwrap();
    assert_eq!(count(&a).await, 3);
    assert_eq!(count(&b).await, 2);
    let err = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {orders}.items"
    )))
    .execute(b.pool())
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("permission denied"), "{err}");
}

#[tokio::test]
async fn bad_postgres_settings_are_clear_errors() {
    let url = postgres::url_for("nobody_here", "postgres");
    let err = Db::open(&DbOptions::new(&url), M)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nobody_here"), "{err}");
    let mut o = DbOptions::new(postgres::admin_url());
    o.schema = Some("Robert'); DROP".into());
    let err = Db::open(&o, M).await.unwrap_err().to_string();
    assert!(err.contains("database.schema"), "{err}");
    let mut o = DbOptions::new(sqlite_url("s.db"));
    o.schema = Some("x".into());
    assert!(Db::open(&o, M).await.is_err());
}

#[test]
fn passwords_stay_out_of_messages() {
    assert_eq!(
        without_password("postgres://svc:s3cret@127.0.0.1:5432/orders"),
        "postgres://svc@127.0.0.1:5432/orders"
    );
    assert_eq!(without_password("sqlite://x.db"), "sqlite://x.db");
}

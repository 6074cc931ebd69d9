//! The throwaway PostgreSQL cluster: starts from the system's binaries, answers on
//! 127.0.0.1 only, is gone after drop, and a cluster left by a killed test is reaped.

use std::net::TcpStream;

use sqlx::Connection;
use storinator_testkit::pg::PgCluster;

async fn query_one(url: &str, sql: &str) -> String {
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    let v: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    v
}

#[tokio::test]
async fn a_cluster_serves_on_loopback_and_is_removed_on_drop() {
    let pg = PgCluster::start().expect("a throwaway PostgreSQL cluster");
    let url = pg.create_database("t1").unwrap();
    assert_eq!(
        query_one(&url, "SELECT current_database()::text").await,
        "t1"
    );
    assert_eq!(
        query_one(&url, "SELECT current_setting('listen_addresses')").await,
        "127.0.0.1"
    );
    let (dir, port) = (pg.dir().to_path_buf(), pg.port());
    drop(pg);
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server still listens on {port}"
    );
}

/// A database made from a template holds the template's data at that moment (the crash
/// drill's reference catalog is such a copy), and the two are independent afterwards.
#[tokio::test]
async fn a_database_made_from_a_template_is_a_copy_of_it() {
    let pg = PgCluster::start().unwrap();
    let url = pg.create_database("original").unwrap();
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    for sql in [
        "CREATE TABLE k (v TEXT NOT NULL)",
        "INSERT INTO k VALUES ('key')",
    ] {
        sqlx::query(sql).execute(&mut c).await.unwrap();
    }
    c.close().await.unwrap();

    let copy = pg.create_database_from("copy", "original").unwrap();
    assert_eq!(
        query_one(&copy, "SELECT string_agg(v, ',') FROM k").await,
        "key"
    );
    let mut c = sqlx::PgConnection::connect(&copy).await.unwrap();
    sqlx::query("INSERT INTO k VALUES ('more')")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    assert_eq!(
        query_one(&url, "SELECT string_agg(v, ',') FROM k").await,
        "key"
    );
}

/// A test process killed with SIGKILL can't stop its cluster; the next start does.
#[tokio::test]
async fn a_cluster_whose_maker_died_is_stopped_and_removed_by_the_next_start() {
    let orphan = PgCluster::start().unwrap();
    let (dir, port) = (orphan.dir().to_path_buf(), orphan.port());
    // A pid that is certainly gone: a child that has exited and been waited for.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(dir.join("owner.pid"), dead.to_string()).unwrap();
    std::mem::forget(orphan);

    let next = PgCluster::start().unwrap();
    assert!(
        !dir.exists(),
        "the orphan's folder {} is left",
        dir.display()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the orphan still listens on {port}"
    );
    // The new one works.
    assert_eq!(
        query_one(&next.url("postgres"), "SELECT current_user::text").await,
        storinator_testkit::pg::USER
    );
}

/// The port's premise (issue 13): one SQL text with numbered `$N` placeholders, even used out
/// of order and twice, binds the same on SQLite (sqlx binds `$N` by its number) and on
/// PostgreSQL, so the engine's queries need one text for both databases.
#[tokio::test]
async fn numbered_placeholders_bind_alike_on_sqlite_and_postgresql() {
    const CREATE: &str =
        "CREATE TABLE t (id BIGINT PRIMARY KEY, name TEXT NOT NULL, n BIGINT NOT NULL)";
    const INSERT: &str = "INSERT INTO t (n, name, id) VALUES ($3, $2, $1) \
                          ON CONFLICT (id) DO UPDATE SET n = t.n + $3";
    const SELECT: &str = "SELECT name || ':' || CAST(n AS TEXT) FROM t WHERE id = $1 AND $1 > 0";

    let pg = PgCluster::start().unwrap();
    let url = pg.create_database("placeholders").unwrap();
    let mut p = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut s = sqlx::SqliteConnection::connect("sqlite::memory:")
        .await
        .unwrap();
    sqlx::query(CREATE).execute(&mut p).await.unwrap();
    sqlx::query(CREATE).execute(&mut s).await.unwrap();
    for _ in 0..2 {
        sqlx::query(INSERT)
            .bind(7_i64)
            .bind("seven")
            .bind(5_i64)
            .execute(&mut p)
            .await
            .unwrap();
        sqlx::query(INSERT)
            .bind(7_i64)
            .bind("seven")
            .bind(5_i64)
            .execute(&mut s)
            .await
            .unwrap();
    }
    let on_pg: String = sqlx::query_scalar(SELECT)
        .bind(7_i64)
        .fetch_one(&mut p)
        .await
        .unwrap();
    let on_sqlite: String = sqlx::query_scalar(SELECT)
        .bind(7_i64)
        .fetch_one(&mut s)
        .await
        .unwrap();
    assert_eq!(on_pg, "seven:10");
    assert_eq!(on_sqlite, on_pg);
}

//! The job table on PostgreSQL, where what SQLite serialises runs side by side: several
//! processes' claims at once, and the write transactions (`begin_write`) that read before they
//! write. These always run on a throwaway PostgreSQL cluster (the rest of the job-table and
//! catalog suites run on it with `STORINATOR_TEST_DB=postgres`).

use std::collections::HashMap;
use std::sync::Arc;

use storinator_shared::catalog::{Pool, begin_write, open_pool};
use storinator_shared::{JobArgs, JobResult, Jobs};
use storinator_testkit::pg::PgCluster;

async fn database(pg: &PgCluster, name: &str) -> String {
    pg.create_database(name).unwrap()
}

fn backup(i: usize) -> JobArgs {
    JobArgs::Backup {
        path: format!("/srv/data/{i}"),
        encrypt: true,
    }
}

fn done() -> JobResult {
    JobResult::Backup {
        snapshot: "abc".into(),
        files: 1,
        dirs: 1,
        bytes: 10,
        bytes_stored: 5,
        new_chunks: 1,
        warnings: 0,
        duration_ms: 3,
    }
}

/// Two worker processes (a pool each), four claimers in each, claiming and finishing as fast
/// as they can: every job is claimed exactly once, by one claimer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_from_two_processes_at_once_take_each_job_exactly_once() {
    let pg = PgCluster::start().unwrap();
    let url = database(&pg, "claims").await;
    let one = Jobs::new(open_pool(&url).await.unwrap());
    let two = Jobs::new(open_pool(&url).await.unwrap());
    const JOBS: usize = 60;
    for i in 0..JOBS {
        one.enqueue(7, 70, &backup(i)).await.unwrap();
    }
    let mut claimers = Vec::new();
    for c in 0..8 {
        let jobs = if c % 2 == 0 { one.clone() } else { two.clone() };
        claimers.push(tokio::spawn(async move {
            let me = format!("claimer-{c}");
            let mut mine = Vec::new();
            while let Some((job, lease)) = jobs.claim(&me).await.unwrap() {
                mine.push(job.id);
                jobs.finish(&lease, &done()).await.unwrap();
            }
            mine
        }));
    }
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for c in claimers {
        for id in c.await.unwrap() {
            *seen.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "claimed more than once: {twice:?}");
    assert_eq!(seen.len(), JOBS, "every job claimed");
}

/// `begin_write` holds the write lock from its first statement: a read-then-write elsewhere
/// waits for it rather than acting on what it read before the other committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_transactions_wait_for_each_other() {
    let pg = PgCluster::start().unwrap();
    let url = database(&pg, "writes").await;
    let pool: Pool = open_pool(&url).await.unwrap();
    sqlx::query("CREATE TABLE counter (n BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO counter (n) VALUES (0)")
        .execute(&pool)
        .await
        .unwrap();
    // Twenty read-then-write increments at once: with the lock none is lost.
    let pool = Arc::new(pool);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = begin_write(&pool).await.unwrap();
            let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            tokio::task::yield_now().await;
            sqlx::query("UPDATE counter SET n = $1")
                .bind(n + 1)
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert_eq!(n, 20);
}

/// The database's own errors under PostgreSQL: a refused URL names itself, and a password in
/// it is not printed.
#[tokio::test]
async fn a_database_that_cannot_be_reached_is_named_without_its_password() {
    let e = open_pool("postgres://me:hunter2@127.0.0.1:1/nothing")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("127.0.0.1:1/nothing"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    let e = open_pool("mysql://x@y/z").await.unwrap_err().to_string();
    assert!(e.contains("mysql://x@y/z"), "{e}");
}

/// PostgreSQL's errors are told apart like SQLite's: a deadlock (one transaction is chosen to
/// fail; running it again succeeds) is worth another attempt, a broken constraint is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_retryable_and_a_constraint_is_not() {
    use storinator_shared::Error;
    let pg = PgCluster::start().unwrap();
    let url = database(&pg, "errors").await;
    let pool: Pool = open_pool(&url).await.unwrap();
    sqlx::query("CREATE TABLE t (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t (id, n) VALUES (1, 0), (2, 0)")
        .execute(&pool)
        .await
        .unwrap();
    let as_error = |source: sqlx::Error| Error::Db {
        context: "testing".into(),
        source,
    };
    let dup = sqlx::query("INSERT INTO t (id, n) VALUES (1, 0)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(!as_error(dup).is_retryable());

    // Two transactions take the two rows in opposite orders.
    let (go_a, wait_a) = tokio::sync::oneshot::channel::<()>();
    let (go_b, wait_b) = tokio::sync::oneshot::channel::<()>();
    let cross = |first: i64,
                 second: i64,
                 locked: tokio::sync::oneshot::Sender<()>,
                 other: tokio::sync::oneshot::Receiver<()>| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE t SET n = n + 1 WHERE id = $1")
                .bind(first)
                .execute(&mut *tx)
                .await?;
            let _ = locked.send(());
            let _ = other.await;
            sqlx::query("UPDATE t SET n = n + 1 WHERE id = $1")
                .bind(second)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        })
    };
    let a = cross(1, 2, go_b, wait_a);
    let b = cross(2, 1, go_a, wait_b);
    let results = [a.await.unwrap(), b.await.unwrap()];
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let e = as_error(failed.into_iter().next().unwrap());
    assert!(e.to_string().contains("deadlock"), "{e}");
    assert!(e.is_retryable(), "{e}");
}

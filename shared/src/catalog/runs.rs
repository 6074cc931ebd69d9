//! Runs and the locks they hold: who is writing to the repository right now.
//!
//! A run (a backup, a recover) registers itself before it writes anything; the root lock and
//! its unfinished packs name it. Deciding whether a run is still alive needs the file system
//! (its flock), so that lives in the engine (`engine::run`); the catalog only stores and fences.

use crate::catalog::Conn;
use sqlx::Row;

use super::{Catalog, db};
use crate::error::Error;

/// A run as registered in the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    pub id: String,
    /// Host name of the process running it.
    pub host: String,
    pub pid: u32,
    /// The file whose flock the run holds while it is alive (on `host`).
    pub lock_path: String,
    pub started_at: i64,
    /// Until when the run promises to be alive (renewed while it runs).
    pub lease_until: i64,
}

const RUN_COLUMNS: &str = "r.id, r.host, r.pid, r.lock_path, r.started_at, r.lease_until";

fn run_from_row(r: &crate::catalog::DbRow) -> RunRow {
    RunRow {
        id: r.get(0),
        host: r.get(1),
        pid: r.get::<i64, _>(2) as u32,
        lock_path: r.get(3),
        started_at: r.get(4),
        lease_until: r.get(5),
    }
}

impl Catalog {
    /// Registers a run (before it writes anything).
    pub async fn run_started(&self, run: &RunRow) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO runs (id, host, pid, lock_path, started_at, lease_until) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&run.id)
        .bind(&run.host)
        .bind(i64::from(run.pid))
        .bind(&run.lock_path)
        .bind(run.started_at)
        .bind(run.lease_until)
        .execute(&self.pool)
        .await
        .map_err(db("registering a run"))?;
        Ok(())
    }

    /// Extends a run's lease. False when the run is no longer registered (another process
    /// found it dead and reclaimed its work): the run must stop.
    pub async fn run_renewed(&self, id: &str, lease_until: i64) -> Result<bool, Error> {
        let done = sqlx::query("UPDATE runs SET lease_until = $1 WHERE id = $2")
            .bind(lease_until)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("renewing a run's lease"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Unregisters a run; the root locks it held go with it.
    pub async fn run_ended(&self, id: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM runs WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("unregistering a run"))?;
        Ok(())
    }

    /// Every registered run.
    pub async fn runs(&self) -> Result<Vec<RunRow>, Error> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs r ORDER BY r.started_at");
        let rows = sqlx::query(crate::catalog::sql(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing runs"))?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    /// Takes the lock of a backup root for `run_id`, unless another run holds it: then that
    /// run is returned. Taking a lock the run already holds succeeds.
    pub async fn try_lock_root(
        &self,
        owner: &str,
        root: &str,
        run_id: &str,
        now: i64,
    ) -> Result<Option<RunRow>, Error> {
        const WHAT: &str = "locking a backup root";
        let mut tx = crate::catalog::begin_write(&self.pool)
            .await
            .map_err(db(WHAT))?;
        sqlx::query(
            "INSERT INTO root_locks (owner, root, run_id, acquired_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (owner, root) DO NOTHING",
        )
        .bind(owner)
        .bind(root)
        .bind(run_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db(WHAT))?;
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM root_locks l JOIN runs r ON r.id = l.run_id \
             WHERE l.owner = ? AND l.root = ?"
        );
        let holder = sqlx::query(crate::catalog::sql(sql))
            .bind(owner)
            .bind(root)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db(WHAT))?
            .map(|r| run_from_row(&r));
        tx.commit().await.map_err(db(WHAT))?;
        Ok(holder.filter(|h| h.id != run_id))
    }

    /// Hands a root lock from a dead run to `to` (only if `from` still holds it).
    pub async fn take_over_root(
        &self,
        owner: &str,
        root: &str,
        from: &str,
        to: &str,
        now: i64,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE root_locks SET run_id = $1, acquired_at = $2 WHERE owner = $3 AND root = $4 AND run_id = $5",
        )
        .bind(to)
        .bind(now)
        .bind(owner)
        .bind(root)
        .bind(from)
        .execute(&self.pool)
        .await
        .map_err(db("taking over a backup root's lock"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Releases a root lock held by `run_id`.
    pub async fn unlock_root(&self, owner: &str, root: &str, run_id: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM root_locks WHERE owner = $1 AND root = $2 AND run_id = $3")
            .bind(owner)
            .bind(root)
            .bind(run_id)
            .execute(&self.pool)
            .await
            .map_err(db("unlocking a backup root"))?;
        Ok(())
    }
}

/// Fails unless `run_id` holds the lock of the root (inside a write transaction, so the answer
/// holds until it commits).
pub(super) async fn check_root_lock(
    tx: &mut Conn,
    owner: &str,
    root: &str,
    run_id: &str,
) -> Result<(), Error> {
    let holder: Option<String> =
        sqlx::query_scalar("SELECT run_id FROM root_locks WHERE owner = $1 AND root = $2")
            .bind(owner)
            .bind(root)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("checking a backup root's lock"))?;
    if holder.as_deref() == Some(run_id) {
        Ok(())
    } else {
        Err(Error::Changed(format!(
            "this run lost the lock of {root} (owner {owner}) before committing: another process declared it dead"
        )))
    }
}

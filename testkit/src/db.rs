//! Where the tests' catalogs and job tables live: SQLite files by default, or PostgreSQL
//! databases when `STORINATOR_TEST_DB=postgres` (the README's test command runs the engine's
//! and the job table's suites both ways).
//!
//! Under PostgreSQL, one throwaway cluster serves the whole test process (made at the first
//! use, stopped when the process exits; a killed process's cluster is reaped by the next
//! start, see [`crate::pg`]) and every SQLite file name a test asks for gets a database of its
//! own, the same one each time it is asked for again (a test that reopens its catalog reopens
//! the same data).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::pg::PgCluster;

/// The variable choosing the tests' database.
pub const VAR: &str = "STORINATOR_TEST_DB";

/// Which database the tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestDb {
    Sqlite,
    Postgres,
}

/// The database chosen by `STORINATOR_TEST_DB` (`sqlite`, the default, or `postgres`).
///
/// # Panics
/// On any other value, naming it: a typo must not run the suite on the wrong database.
pub fn chosen() -> TestDb {
    match std::env::var(VAR).as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => TestDb::Sqlite,
        Ok("postgres") => TestDb::Postgres,
        Ok(other) => panic!("{VAR}={other:?}: expected `sqlite` or `postgres`"),
    }
}

/// The `DATABASE_URL` a test should open for what would be the SQLite file `file`.
///
/// # Panics
/// Under PostgreSQL, when the cluster can't be started (the message says what to install) or
/// the database can't be made: a test must fail, not pass on the wrong database.
pub fn url_for(file: &Path) -> String {
    match chosen() {
        TestDb::Sqlite => storinator_shared::config::sqlite_url(file),
        TestDb::Postgres => postgres_url_for(file),
    }
}

fn postgres_url_for(file: &Path) -> String {
    static DATABASES: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);
    let mut known = DATABASES.lock().unwrap_or_else(|e| e.into_inner());
    let known = known.get_or_insert_with(HashMap::new);
    if let Some(url) = known.get(file) {
        return url.clone();
    }
    let name = format!("t{}", known.len() + 1);
    let url = with_cluster(|c| c.create_database(&name))
        .unwrap_or_else(|e| panic!("making a PostgreSQL database for {}: {e}", file.display()));
    known.insert(file.to_path_buf(), url.clone());
    url
}

/// The process's cluster, started at the first call and stopped when the process exits
/// (statics are never dropped, so an exit handler drops it).
static CLUSTER: Mutex<Option<PgCluster>> = Mutex::new(None);

fn with_cluster<T>(f: impl FnOnce(&PgCluster) -> T) -> T {
    extern "C" fn stop_at_exit() {
        if let Ok(mut held) = CLUSTER.lock() {
            drop(held.take());
        }
    }
    let mut held = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if held.is_none() {
        let cluster = PgCluster::start().unwrap_or_else(|e| {
            panic!("{VAR}=postgres, but the test cluster could not start: {e}")
        });
        *held = Some(cluster);
        // SAFETY: registers a plain `extern "C" fn` that captures nothing.
        unsafe {
            libc::atexit(stop_at_exit);
        }
    }
    f(held.as_ref().expect("started above"))
}

//! The database behind the catalog and the job table: SQLite by default (one file beside the
//! data), or PostgreSQL when `DATABASE_URL` is `postgres://…` (several hosts behind one bot).
//!
//! Both go through sqlx's `Any` driver, so every query is written once and runs on both. The
//! SQL they share is the common ground of the two dialects: `$N` placeholders (SQLite binds
//! `$1` by number too), `ON CONFLICT … DO NOTHING/UPDATE`, `RETURNING`, `CASE` instead of
//! SQLite's two-argument `max`/`min`, integers as BIGINT, blobs as BYTEA, text in byte order
//! (`COLLATE "C"` in the PostgreSQL schema, SQLite's default BINARY here). Booleans are
//! stored as 0/1 integers in both, so they are bound and read as `i64`.
//!
//! The few places where the dialects cannot meet ask [`Dialect`].

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::any::AnyPoolOptions;
use sqlx::{Connection, Executor, Row};

use crate::error::Error;

/// A pool of connections to the catalog's database, whichever it is.
pub type Pool = sqlx::AnyPool;
/// One connection (or a transaction's), for helpers that run inside a caller's transaction.
pub type Conn = sqlx::AnyConnection;
/// A row as read from either database.
pub type DbRow = sqlx::any::AnyRow;
/// A transaction on the pool.
pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// Which database a pool talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The dialect of a `DATABASE_URL`, or an error naming it.
    pub fn of_url(url: &str) -> Result<Dialect, Error> {
        if url.starts_with("sqlite:") {
            Ok(Dialect::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Dialect::Postgres)
        } else {
            Err(Error::Invalid(format!(
                "invalid DATABASE_URL {url:?}: neither sqlite: nor postgres://\nhint: sqlite://path/to/storinator.db, or postgres://user@host/database"
            )))
        }
    }

    /// The dialect of an open connection.
    pub fn of_conn(conn: &Conn) -> Dialect {
        match conn.backend_name() {
            "SQLite" => Dialect::Sqlite,
            _ => Dialect::Postgres,
        }
    }

    /// The dialect of an open pool.
    pub fn of(pool: &Pool) -> Dialect {
        match pool.connect_options().database_url.scheme() {
            "sqlite" => Dialect::Sqlite,
            _ => Dialect::Postgres,
        }
    }
}

/// Opens the database at `url` (creating a SQLite file if needed: its folder and file private
/// to this user, WAL mode, a busy timeout, foreign keys on) and brings its schema up to date.
pub async fn open_pool(url: &str) -> Result<Pool, Error> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::of_url(url)?;
    let (url, folder) = match dialect {
        Dialect::Sqlite => sqlite_prepare(url)?,
        Dialect::Postgres => (url.to_string(), None),
    };
    let opening = |source| Error::Db {
        context: format!("opening {}", redact(&url)),
        source,
    };
    if dialect == Dialect::Postgres {
        // One plain connection first: a server that is down or refuses us fails here at once
        // with its own answer, where the pool would retry quietly for its whole timeout.
        let conn = sqlx::AnyConnection::connect(&url).await.map_err(opening)?;
        let _ = conn.close().await;
    }
    let pool = AnyPoolOptions::new()
        .max_connections(match dialect {
            // SQLite has one writer at a time: more connections only wait on its lock.
            Dialect::Sqlite => 4,
            Dialect::Postgres => 8,
        })
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if dialect == Dialect::Sqlite {
                    // Per connection: WAL lets readers run beside the one writer; NORMAL
                    // syncs at checkpoints (a crash may lose the last commits, never corrupt);
                    // a writer waits up to 30 s for the lock instead of failing at once.
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA busy_timeout = 30000; PRAGMA foreign_keys = ON;",
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .connect_with(connect_options(&url).map_err(opening)?)
        .await
        .map_err(opening)?;
    // sqlx takes a lock around migrations on PostgreSQL (an advisory lock) but none on
    // SQLite, where two processes opening an old catalog at once (the bot and the worker,
    // started together after an upgrade) would both migrate it, and the later one fail.
    let guard = match folder {
        Some(folder) => Some(lock_folder(folder).await?),
        None => None,
    };
    let migrated = match dialect {
        Dialect::Sqlite => sqlx::migrate!("../migrations").run(&pool).await,
        Dialect::Postgres => sqlx::migrate!("../migrations/postgres").run(&pool).await,
    };
    drop(guard);
    migrated
        .map_err(|e| Error::Invalid(format!("migrating the catalog at {}: {e}", redact(&url))))?;
    Ok(pool)
}

/// The options of `url`'s connections. sqlx warns of every statement slower than a second,
/// on the terminal of whoever runs a command. A statement that waited for SQLite's write lock
/// while a big backup commits (20 s for a million files) is expected there, and the warning
/// would only alarm: slow statements are logged at debug level (`-vvv`, or `RUST_LOG=sqlx=debug`).
fn connect_options(url: &str) -> Result<sqlx::any::AnyConnectOptions, sqlx::Error> {
    use sqlx::ConnectOptions;
    Ok(sqlx::any::AnyConnectOptions::from_str(url)?
        .log_slow_statements(log::LevelFilter::Debug, std::time::Duration::from_secs(1)))
}

/// Waits for an exclusive lock on `folder` (an flock, which the kernel drops with the process)
/// and returns what holds it. The catalog's folder, not its file: closing any other handle
/// on a SQLite file drops SQLite's own locks on it.
async fn lock_folder(folder: PathBuf) -> Result<std::fs::File, Error> {
    tokio::task::spawn_blocking(move || {
        let dir = std::fs::File::open(&folder).map_err(|e| data_dir_error(&folder, e))?;
        dir.lock().map_err(|e| data_dir_error(&folder, e))?;
        Ok(dir)
    })
    .await
    .map_err(|e| Error::Invalid(format!("locking the catalog's folder: {e}")))?
}

/// Begins a transaction that will write after it reads: it holds the database's write lock
/// from its first statement, so what it read is still true when it writes.
///
/// SQLite: `BEGIN IMMEDIATE` (a deferred transaction whose snapshot went stale is refused the
/// upgrade to a write at once, without waiting). PostgreSQL: a transaction-scoped advisory
/// lock taken first, which serialises these transactions the same way (each later statement
/// of a READ COMMITTED transaction sees everything committed before it).
pub async fn begin_write(pool: &Pool) -> Result<Tx, sqlx::Error> {
    match Dialect::of(pool) {
        Dialect::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
        Dialect::Postgres => {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(WRITE_LOCK)
                .execute(&mut *tx)
                .await?;
            Ok(tx)
        }
    }
}

/// The advisory lock key of [`begin_write`] ("stor" in ASCII): any constant works, as long as
/// every writer uses the same one.
const WRITE_LOCK: i64 = 0x7374_6f72;

/// Reads a column holding a 0/1 flag.
pub fn flag(row: &DbRow, column: usize) -> bool {
    row.get::<i64, _>(column) != 0
}

/// Hides a password in a URL meant for an error message.
fn redact(url: &str) -> String {
    match sqlx::any::AnyConnectOptions::from_str(url) {
        Ok(opts) if opts.database_url.password().is_some() => {
            let mut u = opts.database_url;
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Makes the SQLite file's folder (0700) and the file (0600) before sqlx opens it, and returns
/// the URL sqlx should open (created if missing) and the folder (none for a database in
/// memory), locked while the migrations run.
fn sqlite_prepare(url: &str) -> Result<(String, Option<PathBuf>), Error> {
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .map_err(|e| Error::Invalid(format!("invalid DATABASE_URL {url:?}: {e}")))?;
    let file = opts.get_filename().to_path_buf();
    let in_memory = file.as_os_str() == ":memory:" || file.as_os_str().is_empty();
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        // The catalog lists every backed-up path: its folder and file are the owner's alone.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| data_dir_error(parent, e))?;
    }
    if !in_memory {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(data_dir_error(&file, e)),
        }
    }
    let folder = (!in_memory).then(|| match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    });
    if url.contains('?') || in_memory {
        Ok((url.to_string(), folder))
    } else {
        Ok((format!("{url}?mode=rwc"), folder))
    }
}

/// An I/O error on the data directory or the catalog, naming the setting that chose them.
pub(super) fn data_dir_error(path: &Path, e: std::io::Error) -> Error {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        "\nhint: STORINATOR_DATA_DIR (or DATABASE_URL) must name a folder this user may write"
    } else {
        ""
    };
    Error::Invalid(format!("{}: {e}{hint}", path.display()))
}

/// A query built at run time, its placeholders in the form both databases read: every `?N`
/// becomes `$N`, and a bare `?` the next number after the largest so far (SQLite's own rule,
/// so the text means what it meant to SQLite). Quoted text is left alone.
pub fn sql(text: impl Into<String>) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(numbered(&text.into()))
}

/// The text [`sql`] would run: for a statement run many times, number it once, outside the
/// loop.
pub fn numbered(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut chars = text.chars().peekable();
    let mut largest = 0u32;
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            out.push(c);
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                out.push(c);
            }
            '?' | '$' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = match digits.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) if c == '?' => largest + 1,
                    Err(_) => {
                        out.push(c);
                        continue;
                    }
                };
                largest = largest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::numbered;

    /// A statement that waits for the write lock is not announced on the user's terminal: the
    /// catalog's connections log slow statements at debug level, which the CLI shows from
    /// `-vvv` on, and the default filters leave out.
    #[tokio::test]
    async fn slow_statements_are_logged_at_debug_level_only() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let pool = super::open_pool(&url).await.unwrap();
        let settings = &pool.connect_options().log_settings;
        assert_eq!(settings.slow_statements_level, log::LevelFilter::Debug);
        // Still measured, so that RUST_LOG=sqlx=debug shows them.
        assert_eq!(
            settings.slow_statements_duration,
            std::time::Duration::from_secs(1)
        );
    }

    #[test]
    fn placeholders_are_numbered_the_way_sqlite_numbers_them() {
        assert_eq!(numbered("a = ? AND b = ?"), "a = $1 AND b = $2");
        assert_eq!(
            numbered("a = ?2 AND b = ? AND c = ?1"),
            "a = $2 AND b = $3 AND c = $1"
        );
        assert_eq!(numbered("x = $1 OR y = ?"), "x = $1 OR y = $2");
        assert_eq!(numbered("p LIKE '?%' AND q = ?"), "p LIKE '?%' AND q = $1");
        assert_eq!(numbered("\"a?\" = ?"), "\"a?\" = $1");
        assert_eq!(numbered("no placeholders"), "no placeholders");
    }
}

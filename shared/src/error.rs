//! Error types of the engine. Binaries wrap these in `anyhow` at their edges.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors from a storage backend, classified so callers know whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {name} is not in storage")]
    NotFound { name: String },
    /// Telegram's FLOOD_WAIT_X / FLOOD_PREMIUM_WAIT_X: sleep, then retry; never fail a job.
    #[error("rate limited by storage: retry after {seconds} seconds")]
    FloodWait { seconds: u32 },
    /// A dropped connection, a timeout, an expired upload part: worth another try.
    #[error("transient storage error: {0}")]
    Transient(String),
    #[error("storage error: {0}")]
    Fatal(String),
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        // Not `source`: the message already includes it, and error reporters print sources again.
        error: std::io::Error,
    },
}

impl StorageError {
    pub fn io(path: impl AsRef<Path>, error: std::io::Error) -> Self {
        StorageError::Io {
            path: path.as_ref().to_path_buf(),
            error,
        }
    }

    /// True when the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::FloodWait { .. } | StorageError::Transient(_) => true,
            StorageError::Io { error, .. } => io_is_transient(error),
            _ => false,
        }
    }

    /// How long the server asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            StorageError::FloodWait { seconds } => Some(Duration::from_secs(u64::from(*seconds))),
            _ => None,
        }
    }
}

/// True for I/O failures that may go away by themselves (an interrupted call, a busy or full
/// device, a network file system timing out). A missing file or a refused permission does
/// not: retrying it only hides the real cause.
pub fn io_is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::Interrupted
            | K::WouldBlock
            | K::TimedOut
            | K::ResourceBusy
            | K::StorageFull
            | K::QuotaExceeded
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::StaleNetworkFileHandle
    )
}

/// Errors from sealing, opening and key handling. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("blob is truncated")]
    Truncated,
    #[error("blob has an unknown format (bad magic)")]
    BadMagic,
    #[error("unsupported blob version {0}")]
    UnsupportedVersion(u8),
    /// Structurally invalid blob (unknown flags, reserved byte set, bad length or padding).
    #[error("blob is malformed: {0}")]
    Malformed(&'static str),
    #[error("authentication failed: blob was modified or the key is wrong")]
    MacMismatch,
    #[error("checksum mismatch: blob is corrupted")]
    ChecksumMismatch,
    /// A format-1 unencrypted blob (a bare checksum, which anyone can compute) where nothing
    /// authenticated vouches for its content.
    #[error(
        "blob is unauthenticated (format 1, unencrypted: a checksum anyone can forge) and nothing authenticated vouches for it"
    )]
    Unauthenticated,
    #[error("blob holds other data than its id says")]
    WrongId,
    #[error("key object is malformed: {0}")]
    BadKeyObject(String),
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("plaintext exceeds limit of {0} bytes")]
    TooLarge(usize),
    #[error("invalid id: {0}")]
    BadId(String),
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

/// Errors reading a pack's trailer.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack {pack} has no valid trailer: {reason}")]
    BadTrailer { pack: String, reason: String },
    #[error("pack {pack} trailer failed authentication: {source}")]
    Crypto { pack: String, source: CryptoError },
    #[error(
        "pack {pack} is unauthenticated (format 1, unencrypted): its table of contents carries only a checksum anyone can forge"
    )]
    Unauthenticated { pack: String },
}

/// A stored snapshot object or listing line that does not decode or breaks the format's rules.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("snapshot object is malformed: {0}")]
    Snapshot(String),
    #[error("listing line {line} is malformed: {reason}")]
    Listing { line: usize, reason: String },
}

/// Errors of the engine (catalog, backup, restore, verify, recover).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("catalog error while {context}: {source}")]
    Db {
        context: String,
        source: sqlx::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        // Not `source`: the message already includes it, and error reporters print sources again.
        error: std::io::Error,
    },
    #[error(
        "no key in the catalog\nhint: run `storinator-worker init` first, or `storinator-worker recover` on a new machine"
    )]
    NoKey,
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error(
        "a key already exists (id {key_id}); refusing to create another\nhint: use `storinator-worker key passwd` to change the passphrase"
    )]
    KeyExists { key_id: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
    /// Another live run holds the lock this one needs.
    #[error(
        "{what} is being backed up by another run ({holder})\nhint: wait for it to finish; a crashed run's lock is taken over automatically"
    )]
    Locked { what: String, holder: String },
    /// The catalog changed under this run (a pack went missing, a lock was lost): running it
    /// again will succeed.
    #[error("{0}\nhint: run it again")]
    Changed(String),
    #[error("restore would overwrite {} existing file(s) that differ, first: {}\nhint: pass --overwrite to replace them", paths.len(), paths.first().map(|p| p.display().to_string()).unwrap_or_default())]
    Conflicts { paths: Vec<PathBuf> },
    #[error("restore of {} item(s) failed (the others were restored), first: {}: {}", failures.len(), failures[0].0, failures[0].1)]
    RestoreFailed { failures: Vec<(String, String)> },
}

impl Error {
    pub fn io(path: impl AsRef<Path>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            error,
        }
    }

    /// True when trying the whole job again later may succeed (storage hiccups).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Storage(e) => e.is_retryable(),
            Error::Db { source, .. } => db_is_transient(source),
            Error::Io { error, .. } => io_is_transient(error),
            Error::Locked { .. } | Error::Changed(_) => true,
            _ => false,
        }
    }
}

/// True for database failures another attempt may not meet: a timeout, an I/O hiccup,
/// PostgreSQL's serialization failures and connection troubles, or SQLite's "database is busy
/// / locked" (which the busy timeout does not always absorb, e.g.
/// when a read transaction must be upgraded after another writer committed).
fn db_is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(d)
            if d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some() =>
        {
            // SQLSTATE: a serialization failure or deadlock (the transaction may be run again),
            // a lost connection, too many connections or a server shutting down.
            d.code().is_some_and(|c| {
                c == "40001"
                    || c == "40P01"
                    || c.starts_with("08")
                    || c.starts_with("53")
                    || c.starts_with("57P")
            })
        }
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)), // SQLITE_BUSY, SQLITE_LOCKED
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker retries a job only on errors that may go away: storage hiccups and rate
    /// limits. Everything else fails the job at once.
    #[test]
    fn transient_and_fatal_errors_are_told_apart() {
        let transient = [
            Error::Storage(StorageError::Transient("connection reset".into())),
            Error::Storage(StorageError::FloodWait { seconds: 3 }),
            Error::Db {
                context: "claiming".into(),
                source: sqlx::Error::PoolTimedOut,
            },
        ];
        for e in &transient {
            assert!(e.is_retryable(), "{e} should be retried");
        }
        let fatal = [
            Error::Storage(StorageError::Fatal("chat not found".into())),
            Error::Storage(StorageError::NotFound {
                name: "a.enc".into(),
            }),
            Error::Storage(StorageError::io(
                "/spool/x",
                std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            )),
            Error::Crypto(CryptoError::MacMismatch),
            Error::WrongPassphrase,
            Error::NoKey,
            Error::Cancelled,
            Error::Invalid("cannot back up /x: not a directory".into()),
            Error::io(
                "/srv/data",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ),
            Error::Conflicts { paths: vec![] },
        ];
        for e in &fatal {
            assert!(!e.is_retryable(), "{e} should not be retried");
        }
    }

    #[test]
    fn transient_io_is_retryable_and_a_missing_file_is_not() {
        use std::io::{Error as IoError, ErrorKind};
        let busy = Error::io("/x", IoError::from(ErrorKind::StorageFull));
        assert!(busy.is_retryable());
        let gone = Error::io("/spool/p.partial", IoError::from(ErrorKind::NotFound));
        assert!(!gone.is_retryable());
        assert!(gone.to_string().starts_with("/spool/p.partial: "), "{gone}");
        let timed_out = StorageError::io("/nfs/p", IoError::from(ErrorKind::TimedOut));
        assert!(timed_out.is_retryable());
        assert!(Error::Storage(timed_out).is_retryable());
        assert!(!StorageError::io("/p", IoError::from(ErrorKind::PermissionDenied)).is_retryable());
        assert!(Error::Changed("x".into()).is_retryable());
    }
}

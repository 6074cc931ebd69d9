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
        matches!(
            self,
            StorageError::FloodWait { .. } | StorageError::Transient(_)
        )
    }

    /// How long the server asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            StorageError::FloodWait { seconds } => Some(Duration::from_secs(u64::from(*seconds))),
            _ => None,
        }
    }
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
            Error::Db { source, .. } => {
                matches!(source, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_))
            }
            _ => false,
        }
    }
}

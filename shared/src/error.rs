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
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StorageError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.as_ref().to_path_buf(),
            source,
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

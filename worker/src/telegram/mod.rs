//! Telegram storage on grammers (issue 3).

use std::sync::Arc;

use storinator_shared::{Config, Storage};

/// Opens the Telegram storage backend.
pub async fn open_storage(_cfg: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    anyhow::bail!(
        "STORINATOR_STORAGE=telegram is not available in this build yet\nhint: use STORINATOR_STORAGE=dir:/path"
    )
}

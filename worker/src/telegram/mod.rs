//! Telegram storage on grammers (issue 3): the storage backend, its rate-aware scheduler,
//! the session file and the interactive login.
//!
//! Wiring from the CLI:
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use storinator_worker::telegram::{TelegramConfig, TelegramStorage, login_interactive};
//! let cfg = TelegramConfig::from_config(&storinator_shared::Config::from_env()?)?;
//! // `storinator-worker login`:
//! login_interactive(&cfg, &cfg.session_path).await?;
//! // STORINATOR_STORAGE=telegram:
//! let storage = TelegramStorage::connect(cfg).await?;
//! let estimate = storage.estimate(10 << 30, 6); // bytes to upload, packs
//! # let _ = estimate; Ok(()) }
//! ```
//! Against the loopback Telegram (tests, demo): run `loopback-telegram --session <path>`
//! (storinator-testkit) and point `STORINATOR_SESSION_FILE` at that path.

mod chat;
mod download;
pub mod errors;
mod login;
mod pipe;
mod salts;
pub mod scheduler;
pub mod session;
mod storage;
mod transfer;
mod upload;
pub mod window;

use std::path::PathBuf;
use std::time::Duration;

pub use login::{Question, login_interactive, login_with};
pub use scheduler::{Estimate, Scheduler, SchedulerConfig, SchedulerStats, estimate_with};
pub use session::FileSession;
pub use storage::{StorageChat, TelegramStorage, plan_windows, random_id_for};

/// Everything the Telegram backend needs. The CLI fills it from the environment:
/// `TELEGRAM_API_ID`, `TELEGRAM_API_HASH`, `STORINATOR_SESSION_FILE` (default
/// `<data dir>/worker.session`), `STORINATOR_STORAGE_CHAT` (empty or `me` = Saved Messages,
/// else a channel the account created or administers, as `-100<id>`, `<id>` or `@username`;
/// never a title),
/// `STORINATOR_MESSAGE_RATE` (message-class calls per minute, default 100),
/// `STORINATOR_PART_CONCURRENCY` (the part window's bound, default 32),
/// `STORINATOR_TELEGRAM_TIMEOUT_SECS` (default 60),
/// `STORINATOR_TELEGRAM_PREMIUM` (`1` lifts the upload limit to 4000 MiB).
#[derive(Clone, Debug)]
pub struct TelegramConfig {
    pub api_id: i32,
    pub api_hash: String,
    pub session_path: PathBuf,
    pub storage_chat: Option<String>,
    /// Where the engine writes packs before they are uploaded.
    pub spool_dir: PathBuf,
    pub message_calls_per_minute: u32,
    /// Most file parts in flight at once (the part window's bound).
    pub part_concurrency: usize,
    /// Upper bound on any single request (grammers has none of its own).
    pub request_timeout: Duration,
    /// Attempts per call for transient failures (flood waits do not count).
    pub max_attempts: u32,
    pub premium: bool,
    /// Gzip part uploads the way grammers does by default. Off: parts are encrypted data and
    /// do not compress; this exists to measure what that would cost (see the tg_bench example).
    pub compress_parts: bool,
}

impl TelegramConfig {
    /// Defaults for everything but the credentials and paths.
    pub fn new(
        api_id: i32,
        api_hash: impl Into<String>,
        session_path: PathBuf,
        spool_dir: PathBuf,
    ) -> Self {
        TelegramConfig {
            api_id,
            api_hash: api_hash.into(),
            session_path,
            storage_chat: None,
            spool_dir,
            message_calls_per_minute: 100,
            part_concurrency: scheduler::DEFAULT_PART_WINDOW,
            request_timeout: Duration::from_secs(60),
            max_attempts: 8,
            premium: false,
            compress_parts: false,
        }
    }
}

impl TelegramConfig {
    /// The Telegram settings of the worker's configuration; credentials are required.
    pub fn from_config(cfg: &storinator_shared::Config) -> anyhow::Result<TelegramConfig> {
        let t = &cfg.telegram;
        let api_id = t.api_id.ok_or_else(|| {
            anyhow::anyhow!(
                "missing TELEGRAM_API_ID: required when STORINATOR_STORAGE=telegram (get it at https://my.telegram.org)\nhint: every variable is described in .env.example"
            )
        })?;
        let api_hash = t.api_hash.as_ref().map(|h| h.expose().to_string()).ok_or_else(|| {
            anyhow::anyhow!(
                "missing TELEGRAM_API_HASH: required when STORINATOR_STORAGE=telegram (get it at https://my.telegram.org)\nhint: every variable is described in .env.example"
            )
        })?;
        let mut c = TelegramConfig::new(api_id, api_hash, t.session_path.clone(), cfg.spool_dir());
        c.storage_chat = t.storage_chat.clone();
        c.message_calls_per_minute = t.message_calls_per_minute;
        c.part_concurrency = t.part_concurrency;
        c.request_timeout = Duration::from_secs(t.request_timeout_secs);
        c.premium = t.premium;
        Ok(c)
    }
}

/// Opens the Telegram storage backend configured in `cfg` (the session must be signed in:
/// `storinator-worker login`).
pub async fn open_storage(
    cfg: &storinator_shared::Config,
) -> anyhow::Result<std::sync::Arc<dyn storinator_shared::Storage>> {
    let tcfg = TelegramConfig::from_config(cfg)?;
    if !tcfg.session_path.exists() {
        anyhow::bail!(
            "no Telegram session at {}\nhint: run `storinator-worker login` first",
            tcfg.session_path.display()
        );
    }
    let storage = TelegramStorage::connect(tcfg).await?;
    Ok(std::sync::Arc::new(storage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_comes_from_the_shared_settings_and_names_missing_credentials() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let cfg = storinator_shared::Config::from_lookup(vars(&[
            ("STORINATOR_DATA_DIR", "/data"),
            ("TELEGRAM_API_ID", "123"),
            ("TELEGRAM_API_HASH", "00112233445566778899aabbccddeeff"),
            ("STORINATOR_MESSAGE_RATE", "30"),
            ("STORINATOR_STORAGE_CHAT", "-1001500000000"),
            ("STORINATOR_TELEGRAM_PREMIUM", "1"),
        ]))
        .unwrap();
        let t = TelegramConfig::from_config(&cfg).unwrap();
        assert_eq!(
            (t.api_id, t.api_hash.as_str()),
            (123, "00112233445566778899aabbccddeeff")
        );
        assert_eq!(t.message_calls_per_minute, 30);
        assert_eq!(t.session_path, PathBuf::from("/data/worker.session"));
        assert_eq!(t.spool_dir, PathBuf::from("/data/spool"));
        assert_eq!(t.storage_chat.as_deref(), Some("-1001500000000"));
        assert!(t.premium);

        let cfg = storinator_shared::Config::from_lookup(vars(&[(
            "TELEGRAM_API_HASH",
            "00112233445566778899aabbccddeeff",
        )]))
        .unwrap();
        let e = TelegramConfig::from_config(&cfg).unwrap_err().to_string();
        assert!(
            e.starts_with("missing TELEGRAM_API_ID") && e.contains(".env.example"),
            "{e}"
        );
    }
}

//! Telegram storage on grammers (issue 3): the storage backend, its rate-aware scheduler,
//! the session file and the interactive login.
//!
//! Wiring from the CLI:
//! ```no_run
//! # async fn f(data_dir: &std::path::Path) -> anyhow::Result<()> {
//! use storinator_worker::telegram::{TelegramConfig, TelegramStorage, login_interactive};
//! let cfg = TelegramConfig::from_vars(|k| std::env::var(k).ok(), data_dir)?;
//! // `storinator-worker login`:
//! login_interactive(&cfg, &cfg.session_path).await?;
//! // STORINATOR_STORAGE=telegram:
//! let storage = TelegramStorage::connect(cfg).await?;
//! let estimate = storage.estimate(10 << 30, 6); // bytes to upload, packs
//! # let _ = estimate; Ok(()) }
//! ```
//! Against the loopback Telegram (tests, demo): run `loopback-telegram --session <path>`
//! (storinator-testkit) and point `STORINATOR_TELEGRAM_SESSION` at that path.

mod login;
pub mod scheduler;
pub mod session;
mod storage;

use std::path::PathBuf;
use std::time::Duration;

pub use login::{login_interactive, login_with};
pub use scheduler::{Estimate, Scheduler, SchedulerConfig, SchedulerStats, estimate_with};
pub use session::FileSession;
pub use storage::{StorageChat, TelegramStorage, plan_windows, random_id_for};

/// Everything the Telegram backend needs. The CLI fills it from the environment:
/// `TELEGRAM_API_ID`, `TELEGRAM_API_HASH`, `STORINATOR_TELEGRAM_SESSION` (default
/// `<data dir>/telegram.session`), `STORINATOR_STORAGE_CHAT` (empty or `me` = Saved Messages,
/// else a channel as `-100<id>`, `<id>` or its title as known to the session),
/// `STORINATOR_MESSAGE_RATE` (message-class calls per minute, default 100),
/// `STORINATOR_PART_CONCURRENCY` (default 4), `STORINATOR_TELEGRAM_TIMEOUT_SECS` (default 60),
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

/// A bad or missing configuration value, naming the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set")]
    Missing { var: &'static str },
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

impl TelegramConfig {
    /// Reads the variables listed on [`TelegramConfig`] through `get` (e.g. `std::env::var`
    /// after dotenvy), with paths defaulting under `data_dir`.
    pub fn from_vars(
        get: impl Fn(&str) -> Option<String>,
        data_dir: &std::path::Path,
    ) -> Result<Self, ConfigError> {
        fn parse<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            var: &'static str,
        ) -> Result<Option<T>, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            match get(var).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|e: T::Err| ConfigError::Invalid {
                        var,
                        value: v.clone(),
                        reason: e.to_string(),
                    }),
            }
        }
        let api_id: i32 = parse(&get, "TELEGRAM_API_ID")?.ok_or(ConfigError::Missing {
            var: "TELEGRAM_API_ID",
        })?;
        let api_hash = get("TELEGRAM_API_HASH")
            .filter(|v| !v.trim().is_empty())
            .ok_or(ConfigError::Missing {
                var: "TELEGRAM_API_HASH",
            })?;
        let session = get("STORINATOR_TELEGRAM_SESSION")
            .filter(|v| !v.trim().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| data_dir.join("telegram.session"));
        let mut cfg = TelegramConfig::new(api_id, api_hash.trim(), session, data_dir.join("spool"));
        cfg.storage_chat = get("STORINATOR_STORAGE_CHAT").filter(|v| !v.trim().is_empty());
        if let Some(rate) = parse::<u32>(&get, "STORINATOR_MESSAGE_RATE")? {
            if rate == 0 {
                return Err(ConfigError::Invalid {
                    var: "STORINATOR_MESSAGE_RATE",
                    value: "0".into(),
                    reason: "must be at least 1 call per minute".into(),
                });
            }
            cfg.message_calls_per_minute = rate;
        }
        if let Some(n) = parse::<usize>(&get, "STORINATOR_PART_CONCURRENCY")? {
            cfg.part_concurrency = n.clamp(1, 16);
        }
        if let Some(secs) = parse::<u64>(&get, "STORINATOR_TELEGRAM_TIMEOUT_SECS")? {
            cfg.request_timeout = Duration::from_secs(secs.max(1));
        }
        if let Some(p) = parse::<u8>(&get, "STORINATOR_TELEGRAM_PREMIUM")? {
            cfg.premium = p != 0;
        }
        Ok(cfg)
    }

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
            part_concurrency: 4,
            request_timeout: Duration::from_secs(60),
            max_attempts: 8,
            premium: false,
            compress_parts: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn config_from_vars_names_the_bad_variable() {
        let vars: HashMap<&str, &str> = [
            ("TELEGRAM_API_ID", "123"),
            ("TELEGRAM_API_HASH", "abc"),
            ("STORINATOR_MESSAGE_RATE", "30"),
            ("STORINATOR_STORAGE_CHAT", "-1001500000000"),
        ]
        .into();
        let get = |k: &str| vars.get(k).map(|v| v.to_string());
        let cfg = TelegramConfig::from_vars(get, std::path::Path::new("/data")).unwrap();
        assert_eq!(cfg.api_id, 123);
        assert_eq!(cfg.message_calls_per_minute, 30);
        assert_eq!(cfg.session_path, PathBuf::from("/data/telegram.session"));
        assert_eq!(cfg.storage_chat.as_deref(), Some("-1001500000000"));

        let bad = |k: &str| match k {
            "TELEGRAM_API_ID" => Some("twelve".to_string()),
            _ => Some("x".to_string()),
        };
        let e = TelegramConfig::from_vars(bad, std::path::Path::new("/d")).unwrap_err();
        assert!(e.to_string().starts_with("TELEGRAM_API_ID="), "{e}");
        let none = |_: &str| None;
        let e = TelegramConfig::from_vars(none, std::path::Path::new("/d")).unwrap_err();
        assert_eq!(e.to_string(), "TELEGRAM_API_ID is not set");
    }
}

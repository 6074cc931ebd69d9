//! Typed configuration, read once from the environment (and `.env` through dotenvy).
//!
//! Every variable is documented in `.env.example`. A bad value is an error that names the
//! variable; nothing is read from the environment after start-up.

use std::path::{Path, PathBuf};

/// A configuration problem, naming the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("missing {var}: {reason}\nhint: every variable is described in .env.example")]
    Missing { var: &'static str, reason: String },
    #[error("cannot read {var} file {}: {error}", path.display())]
    File {
        var: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Where packs go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageSpec {
    /// The storage chat of the worker's Telegram account.
    Telegram,
    /// A local directory (tests, demos, or a second copy on a NAS).
    Dir(PathBuf),
}

/// A secret string whose Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Largest pack Telegram accepts from a non-Premium account is 2000 MiB; packs stay below it
/// with room for the trailer.
pub const PACK_SIZE_CEILING: u64 = 2000 * 1024 * 1024 - 1024 * 1024;
/// The same for Premium accounts (4000 MiB uploads).
pub const PREMIUM_PACK_SIZE_CEILING: u64 = 4000 * 1024 * 1024 - 1024 * 1024;
/// Default pack size cap: 1.9 GiB.
pub const DEFAULT_PACK_SIZE: u64 = 1945 * 1024 * 1024;
/// Smallest cap we accept (tests use small caps to make files span packs).
pub const MIN_PACK_SIZE: u64 = 64 * 1024;

/// Settings of the worker and the engine.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database_url: String,
    pub storage: StorageSpec,
    pub passphrase: Option<Secret>,
    pub pack_size: u64,
    /// zstd level for chunk data, `None` for no compression.
    pub compression: Option<i32>,
    pub allowed_users: Vec<i64>,
    pub backup_roots: Vec<PathBuf>,
    pub telegram: TelegramSettings,
}

/// Telegram settings of the worker (the userbot).
#[derive(Clone, Debug, Default)]
pub struct TelegramSettings {
    pub api_id: Option<i32>,
    pub api_hash: Option<Secret>,
    /// `None`: Saved Messages.
    pub storage_chat: Option<String>,
    pub session_path: PathBuf,
    /// Message-class calls allowed per minute (sendMedia, getMessages, ...).
    pub message_calls_per_minute: u32,
    /// Upload/download part requests in flight at most (the part window's bound).
    pub part_concurrency: usize,
    /// Upper bound on any single Telegram request.
    pub request_timeout_secs: u64,
    /// A Premium account may upload 4000 MiB documents.
    pub premium: bool,
}

impl Config {
    /// Loads `.env` (if present) and reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let _ = dotenvy::dotenv();
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the configuration through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let data_dir = match var("STORINATOR_DATA_DIR") {
            Some(d) => PathBuf::from(d),
            None => default_data_dir(var("XDG_DATA_HOME"), var("HOME")),
        };
        let database_url = match var("DATABASE_URL") {
            Some(url) => {
                if !url.starts_with("sqlite:") {
                    return Err(ConfigError::Invalid {
                        var: "DATABASE_URL",
                        value: url,
                        reason: "only SQLite is supported (sqlite://path/to/file.db)".into(),
                    });
                }
                url
            }
            None => sqlite_url(&data_dir.join("storinator.db")),
        };
        let storage = match var("STORINATOR_STORAGE").as_deref() {
            None | Some("telegram") => StorageSpec::Telegram,
            Some(s) if s.starts_with("dir:") && s.len() > 4 => {
                StorageSpec::Dir(PathBuf::from(&s[4..]))
            }
            Some(s) => {
                return Err(ConfigError::Invalid {
                    var: "STORINATOR_STORAGE",
                    value: s.into(),
                    reason: "expected `telegram` or `dir:<path>`".into(),
                });
            }
        };
        let passphrase = match (
            var("STORINATOR_PASSPHRASE"),
            var("STORINATOR_PASSPHRASE_FILE"),
        ) {
            (Some(p), _) => Some(Secret::new(p)),
            (None, Some(file)) => Some(Secret::new(read_passphrase_file(
                "STORINATOR_PASSPHRASE_FILE",
                Path::new(&file),
            )?)),
            (None, None) => None,
        };
        let premium = match var("STORINATOR_TELEGRAM_PREMIUM").as_deref() {
            None | Some("0") | Some("false") => false,
            Some("1") | Some("true") => true,
            Some(v) => {
                return Err(ConfigError::Invalid {
                    var: "STORINATOR_TELEGRAM_PREMIUM",
                    value: v.into(),
                    reason: "expected 1 or 0".into(),
                });
            }
        };
        let pack_size = match var("STORINATOR_PACK_SIZE") {
            None => DEFAULT_PACK_SIZE,
            Some(v) => {
                let n = parse_size(&v).map_err(|reason| ConfigError::Invalid {
                    var: "STORINATOR_PACK_SIZE",
                    value: v.clone(),
                    reason,
                })?;
                check_pack_size(n, premium).map_err(|reason| ConfigError::Invalid {
                    var: "STORINATOR_PACK_SIZE",
                    value: v,
                    reason,
                })?
            }
        };
        let compression = match var("STORINATOR_COMPRESSION") {
            None => Some(1),
            Some(v) => parse_compression(&v).map_err(|reason| ConfigError::Invalid {
                var: "STORINATOR_COMPRESSION",
                value: v,
                reason,
            })?,
        };
        let allowed_users = match var("STORINATOR_ALLOWED_USERS") {
            None => Vec::new(),
            Some(v) => parse_list(&v, |s| {
                s.parse::<i64>()
                    .map_err(|_| format!("{s:?} is not a Telegram user id"))
            })
            .map_err(|reason| ConfigError::Invalid {
                var: "STORINATOR_ALLOWED_USERS",
                value: v,
                reason,
            })?,
        };
        let backup_roots = match var("STORINATOR_BACKUP_ROOTS") {
            None => Vec::new(),
            Some(v) => parse_list(&v, |s| {
                let p = PathBuf::from(s);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(format!("{s:?} is not an absolute path"))
                }
            })
            .map_err(|reason| ConfigError::Invalid {
                var: "STORINATOR_BACKUP_ROOTS",
                value: v,
                reason,
            })?,
        };
        let api_id = match var("TELEGRAM_API_ID") {
            None => None,
            Some(v) => Some(v.parse::<i32>().map_err(|_| ConfigError::Invalid {
                var: "TELEGRAM_API_ID",
                value: v,
                reason: "expected the number shown at my.telegram.org".into(),
            })?),
        };
        let message_calls_per_minute = match var("STORINATOR_MESSAGE_RATE") {
            None => 100,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=6000).contains(&n) => n,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "STORINATOR_MESSAGE_RATE",
                        value: v,
                        reason: "expected message-class calls per minute, 1 to 6000".into(),
                    });
                }
            },
        };
        let part_concurrency = match var("STORINATOR_PART_CONCURRENCY") {
            None => 32,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=128).contains(&n) => n,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "STORINATOR_PART_CONCURRENCY",
                        value: v,
                        reason: "expected 1 to 128 parts in flight".into(),
                    });
                }
            },
        };
        let request_timeout_secs = match var("STORINATOR_TELEGRAM_TIMEOUT_SECS") {
            None => 60,
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (1..=3600).contains(&n) => n,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "STORINATOR_TELEGRAM_TIMEOUT_SECS",
                        value: v,
                        reason: "expected seconds, 1 to 3600".into(),
                    });
                }
            },
        };
        let telegram = TelegramSettings {
            api_id,
            api_hash: var("TELEGRAM_API_HASH").map(Secret::new),
            storage_chat: var("STORINATOR_STORAGE_CHAT"),
            session_path: var("STORINATOR_SESSION_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("worker.session")),
            message_calls_per_minute,
            part_concurrency,
            request_timeout_secs,
            premium,
        };
        Ok(Config {
            data_dir,
            database_url,
            storage,
            passphrase,
            pack_size,
            compression,
            allowed_users,
            backup_roots,
            telegram,
        })
    }

    /// Where packs wait before upload when the storage backend has no spool of its own.
    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }
}

fn default_data_dir(xdg: Option<String>, home: Option<String>) -> PathBuf {
    match (xdg, home) {
        (Some(x), _) => PathBuf::from(x).join("t-storinator"),
        (None, Some(h)) => PathBuf::from(h).join(".local/share/t-storinator"),
        (None, None) => PathBuf::from("./storinator-data"),
    }
}

/// `sqlite://` URL for a file path.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Reads a passphrase file: the first line, without its line ending.
pub fn read_passphrase_file(var: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::File {
        var,
        path: path.into(),
        error,
    })?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(ConfigError::Invalid {
            var,
            value: path.display().to_string(),
            reason: "the file's first line is empty".into(),
        });
    }
    Ok(line)
}

fn parse_list<T>(v: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(f)
        .collect()
}

/// Checks a pack size cap against Telegram's ceiling (higher for Premium accounts).
pub fn check_pack_size(n: u64, premium: bool) -> Result<u64, String> {
    if n < MIN_PACK_SIZE {
        Err(format!("pack size must be at least {MIN_PACK_SIZE} bytes"))
    } else if premium && n > PREMIUM_PACK_SIZE_CEILING {
        Err(format!(
            "pack size must not exceed {PREMIUM_PACK_SIZE_CEILING} bytes (Premium's 4000 MiB upload limit less room)"
        ))
    } else if !premium && n > PACK_SIZE_CEILING {
        Err(format!(
            "pack size must not exceed {PACK_SIZE_CEILING} bytes (Telegram's 2000 MiB upload limit less room)"
        ))
    } else {
        Ok(n)
    }
}

/// Parses `off`, `zstd` or `zstd:<level>`.
pub fn parse_compression(v: &str) -> Result<Option<i32>, String> {
    match v {
        "off" | "none" => Ok(None),
        "zstd" | "on" => Ok(Some(1)),
        _ => match v.strip_prefix("zstd:").map(str::parse::<i32>) {
            Some(Ok(level)) if (1..=19).contains(&level) => Ok(Some(level)),
            _ => Err("expected `off`, `zstd` or `zstd:<level 1-19>`".into()),
        },
    }
}

/// Parses sizes like `1900MiB`, `1.9GiB`, `64k`, `1048576`.
pub fn parse_size(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| "expected a size like 64MiB or 1.9GiB".to_string())?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?}; use B, KiB, MiB or GiB"
            ));
        }
    };
    let bytes = num * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err("size out of range".into());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_sane() {
        let c = cfg(&[("HOME", "/home/u")]).unwrap();
        assert_eq!(
            c.data_dir,
            PathBuf::from("/home/u/.local/share/t-storinator")
        );
        assert_eq!(
            c.database_url,
            "sqlite:///home/u/.local/share/t-storinator/storinator.db"
        );
        assert_eq!(c.storage, StorageSpec::Telegram);
        assert_eq!(c.pack_size, DEFAULT_PACK_SIZE);
        assert_eq!(c.telegram.message_calls_per_minute, 100);
        assert!(c.passphrase.is_none());
    }

    #[test]
    fn parses_values() {
        let c = cfg(&[
            ("STORINATOR_DATA_DIR", "/d"),
            ("STORINATOR_STORAGE", "dir:/backups"),
            ("STORINATOR_PACK_SIZE", "64MiB"),
            ("STORINATOR_COMPRESSION", "zstd:3"),
            ("STORINATOR_ALLOWED_USERS", "12, 34"),
            ("STORINATOR_BACKUP_ROOTS", "/srv,/home"),
            ("STORINATOR_PASSPHRASE", "pw"),
        ])
        .unwrap();
        assert_eq!(c.storage, StorageSpec::Dir("/backups".into()));
        assert_eq!(c.pack_size, 64 << 20);
        assert_eq!(c.compression, Some(3));
        assert_eq!(c.allowed_users, vec![12, 34]);
        assert_eq!(
            c.backup_roots,
            vec![PathBuf::from("/srv"), PathBuf::from("/home")]
        );
        assert_eq!(c.passphrase.unwrap().expose(), "pw");
        assert_eq!(c.database_url, "sqlite:///d/storinator.db");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("STORINATOR_PACK_SIZE", "3GiB"),
            ("STORINATOR_PACK_SIZE", "lots"),
            ("STORINATOR_STORAGE", "s3:bucket"),
            ("STORINATOR_ALLOWED_USERS", "12,bob"),
            ("STORINATOR_BACKUP_ROOTS", "relative/path"),
            ("STORINATOR_COMPRESSION", "zstd:99"),
            ("TELEGRAM_API_ID", "abc"),
            ("DATABASE_URL", "postgres://x"),
            ("STORINATOR_MESSAGE_RATE", "0"),
        ] {
            let err = cfg(&[(k, v)]).unwrap_err().to_string();
            assert!(err.contains(k), "{k}: {err}");
        }
        let premium = cfg(&[
            ("STORINATOR_PACK_SIZE", "3GiB"),
            ("STORINATOR_TELEGRAM_PREMIUM", "1"),
        ])
        .unwrap();
        assert_eq!(premium.pack_size, 3 << 30);
        let err = cfg(&[("STORINATOR_PASSPHRASE_FILE", "/nonexistent/pw")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("STORINATOR_PASSPHRASE_FILE") && err.contains("/nonexistent/pw"),
            "{err}"
        );
    }

    #[test]
    fn passphrase_never_debug_printed() {
        let c = cfg(&[("STORINATOR_PASSPHRASE", "hunter2")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1.9GiB").unwrap(), (1.9 * 1073741824.0) as u64);
        assert_eq!(parse_size("512k").unwrap(), 512 * 1024);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("1.9 parsecs").is_err());
    }
}

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
    /// `.env` exists but can't be read or parsed: running on defaults instead would put the
    /// data somewhere the user never chose.
    #[error("cannot read {}: {reason}\nhint: fix its permissions or contents, or remove it", path.display())]
    EnvFile { path: PathBuf, reason: String },
}

impl ConfigError {
    /// The variable (or file) at fault.
    pub fn var(&self) -> &'static str {
        match self {
            ConfigError::Invalid { var, .. }
            | ConfigError::Missing { var, .. }
            | ConfigError::File { var, .. } => var,
            ConfigError::EnvFile { .. } => ".env",
        }
    }
}

/// Loads `.env` from the current directory into the environment (variables already set win).
/// A missing file is fine; one that exists but can't be read or parsed is an error naming it.
pub fn load_dotenv() -> Result<(), ConfigError> {
    load_dotenv_in(Path::new("."))
}

/// [`load_dotenv`] from `dir`.
pub fn load_dotenv_in(dir: &Path) -> Result<(), ConfigError> {
    load_env_file(&dir.join(".env"))
}

/// Loads an environment file (`KEY=value` lines) into the environment; variables already set
/// win. A missing file is fine; one that exists but can't be read or parsed is an error naming
/// it. The worker reads `.env`, the bot its own `bot.env`.
pub fn load_env_file(path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    let abs = std::path::absolute(path).unwrap_or(path.to_path_buf());
    dotenvy::from_path(path).map_err(|e| ConfigError::EnvFile {
        path: abs,
        reason: match e {
            dotenvy::Error::Io(io) => io.to_string(),
            other => other.to_string(),
        },
    })
}

/// Values shown as examples in `.env.example` and the README: they look valid, so they are
/// refused by name rather than failing later with a confusing network error.
const EXAMPLE_VALUES: &[(&str, &str)] = &[
    ("TELEGRAM_API_ID", "1234567"),
    ("TELEGRAM_API_HASH", "0123456789abcdef0123456789abcdef"),
    (
        "TELOXIDE_TOKEN",
        "123456789:AAExampleExampleExampleExampleExample",
    ),
    ("STORINATOR_PASSPHRASE", "a-long-random-passphrase"),
    (
        "STORINATOR_PASSPHRASE",
        "correct-horse-battery-staple-violet-42",
    ),
];

/// Refuses a value copied from the examples.
pub fn refuse_example(var: &'static str, value: &str) -> Result<(), ConfigError> {
    if EXAMPLE_VALUES.iter().any(|(k, v)| *k == var && *v == value) {
        return Err(ConfigError::Invalid {
            var,
            value: value.into(),
            reason: "this is the example value from .env.example; put in your own".into(),
        });
    }
    Ok(())
}

/// Checks the shape of a bot token from @BotFather: `<bot id>:<secret>`, the secret 30 or
/// more letters, digits, `_` or `-`.
pub fn check_bot_token(token: &str) -> Result<(), ConfigError> {
    refuse_example("TELOXIDE_TOKEN", token)?;
    let ok = match token.split_once(':') {
        Some((id, secret)) => {
            !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_digit())
                && secret.len() >= 30
                && secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            var: "TELOXIDE_TOKEN",
            value: "(hidden)".into(),
            reason: "expected the token @BotFather gave, like 123456789:AA… (digits, a colon, then 30 or more letters, digits, _ or -)".into(),
        })
    }
}

/// Where one lane keeps its packs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageSpec {
    /// A Telegram account's storage chat: the account's session file, and the chat (`None`:
    /// its Saved Messages).
    Telegram {
        session: PathBuf,
        chat: Option<String>,
    },
    /// A local directory (tests, demos, or a copy on a NAS).
    Dir(PathBuf),
}

/// One lane of `STORINATOR_STORAGE`: a name (what the catalog records for each copy, and what
/// alerts call it) and where it keeps packs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneSpec {
    pub name: String,
    pub spec: StorageSpec,
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
    /// `STORINATOR_STORAGE`: one lane (the default: the worker's account and
    /// `STORINATOR_STORAGE_CHAT`) or several.
    pub lanes: Vec<LaneSpec>,
    /// `STORINATOR_COPIES` (default 1): each pack is stored in this many lanes.
    pub copies: usize,
    pub passphrase: Option<Secret>,
    pub pack_size: u64,
    /// zstd level for chunk data, `None` for no compression.
    pub compression: Option<i32>,
    pub allowed_users: Vec<i64>,
    pub backup_roots: Vec<PathBuf>,
    /// `STORINATOR_RESTORE_ROOTS` (default: the backup roots): where restores from the chat
    /// may write. The worker enforces them on the handle it writes through.
    pub restore_roots: Vec<PathBuf>,
    /// `STORINATOR_HOST` (default the machine's hostname): the storage host this worker
    /// serves; the bot routes the jobs of this host's roots to its workers.
    pub host: String,
    pub telegram: TelegramSettings,
    pub unattended: UnattendedSettings,
}

/// Schedules, alerts and the scrub.
#[derive(Clone, Debug)]
pub struct UnattendedSettings {
    /// `STORINATOR_TIMEZONE` (IANA name; default the host's zone): schedules and the times
    /// shown in chat are in this zone.
    pub timezone: jiff::tz::TimeZone,
    /// `STORINATOR_SCHEDULE_JITTER` (a duration like `10m`; default none): a scheduled job
    /// waits a random time up to this long after its slot, to spread load.
    pub jitter_ms: i64,
    /// `STORINATOR_HEALTHCHECK_URL`: pinged (HTTP GET) after each scheduled backup, with
    /// `/fail` appended after a failure (healthchecks.io and Uptime Kuma push monitors).
    pub healthcheck_url: Option<String>,
    /// `STORINATOR_SCRUB_BYTES_PER_DAY` (default 1 GiB): pack bytes the daily scrub reads.
    pub scrub_bytes_per_day: u64,
    /// `STORINATOR_SCRUB_AT` (`HH:MM`, default `04:00`; `off` disables): when the daily scrub
    /// runs, in the schedule time zone.
    pub scrub_at: Option<(u8, u8)>,
}

impl Default for UnattendedSettings {
    fn default() -> Self {
        UnattendedSettings {
            timezone: jiff::tz::TimeZone::UTC,
            jitter_ms: 0,
            healthcheck_url: None,
            scrub_bytes_per_day: DEFAULT_SCRUB_BYTES_PER_DAY,
            scrub_at: Some((4, 0)),
        }
    }
}

/// The daily scrub's default budget: 1 GiB.
pub const DEFAULT_SCRUB_BYTES_PER_DAY: u64 = 1 << 30;

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
        load_dotenv()?;
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the configuration through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let (data_dir, database_url) = database_location(&get)?;
        let passphrase = match (
            var("STORINATOR_PASSPHRASE"),
            var("STORINATOR_PASSPHRASE_FILE"),
        ) {
            (Some(p), _) => {
                refuse_example("STORINATOR_PASSPHRASE", &p)?;
                Some(Secret::new(p))
            }
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
        let roots = |name: &'static str| -> Result<Option<Vec<PathBuf>>, ConfigError> {
            let Some(v) = var(name) else { return Ok(None) };
            parse_list(&v, |s| {
                let p = PathBuf::from(s);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(format!("{s:?} is not an absolute path"))
                }
            })
            .map(Some)
            .map_err(|reason| ConfigError::Invalid {
                var: name,
                value: v,
                reason,
            })
        };
        let backup_roots = roots("STORINATOR_BACKUP_ROOTS")?.unwrap_or_default();
        let host = match var("STORINATOR_HOST") {
            Some(h) => {
                check_host_name(&h).map_err(|reason| ConfigError::Invalid {
                    var: "STORINATOR_HOST",
                    value: h.clone(),
                    reason,
                })?;
                h
            }
            None => {
                let h = machine_hostname();
                check_host_name(&h).map_err(|reason| ConfigError::Invalid {
                    var: "STORINATOR_HOST",
                    value: h.clone(),
                    reason: format!(
                        "unset, and the machine's hostname is not usable: {reason}\nhint: set STORINATOR_HOST"
                    ),
                })?;
                h
            }
        };
        let restore_roots =
            roots("STORINATOR_RESTORE_ROOTS")?.unwrap_or_else(|| backup_roots.clone());
        let api_id = match var("TELEGRAM_API_ID") {
            None => None,
            Some(v) => {
                refuse_example("TELEGRAM_API_ID", &v)?;
                match v.parse::<i32>() {
                    Ok(n) if n > 0 => Some(n),
                    _ => {
                        return Err(ConfigError::Invalid {
                            var: "TELEGRAM_API_ID",
                            value: v,
                            reason: "expected the number shown at my.telegram.org".into(),
                        });
                    }
                }
            }
        };
        let api_hash = match var("TELEGRAM_API_HASH") {
            None => None,
            Some(v) => {
                refuse_example("TELEGRAM_API_HASH", &v)?;
                if v.len() != 32 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ConfigError::Invalid {
                        var: "TELEGRAM_API_HASH",
                        value: "(hidden)".into(),
                        reason: "expected the 32 hexadecimal digits shown at my.telegram.org"
                            .into(),
                    });
                }
                Some(Secret::new(v))
            }
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
            api_hash,
            storage_chat: var("STORINATOR_STORAGE_CHAT"),
            session_path: var("STORINATOR_SESSION_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("worker.session")),
            message_calls_per_minute,
            part_concurrency,
            request_timeout_secs,
            premium,
        };
        let unattended = unattended_settings(&var)?;
        let raw = var("STORINATOR_STORAGE").unwrap_or_else(|| "telegram".into());
        let lanes = parse_lanes(&raw, &telegram).map_err(|reason| ConfigError::Invalid {
            var: "STORINATOR_STORAGE",
            value: raw.clone(),
            reason,
        })?;
        let copies = match var("STORINATOR_COPIES") {
            None => 1,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 && n <= lanes.len() => n,
                Ok(n) if n > lanes.len() => {
                    return Err(ConfigError::Invalid {
                        var: "STORINATOR_COPIES",
                        value: v,
                        reason: format!(
                            "{n} copies need {n} lanes, and STORINATOR_STORAGE names {}\nhint: name more lanes in STORINATOR_STORAGE, comma-separated (see .env.example)",
                            lanes.len()
                        ),
                    });
                }
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "STORINATOR_COPIES",
                        value: v,
                        reason: "expected the number of copies of each pack, 1 or more".into(),
                    });
                }
            },
        };
        Ok(Config {
            data_dir,
            database_url,
            lanes,
            copies,
            passphrase,
            pack_size,
            compression,
            allowed_users,
            backup_roots,
            restore_roots,
            host,
            telegram,
            unattended,
        })
    }

    /// Where files restored for the chat (`/get`) wait until the bot has sent them.
    pub fn outbox_dir(&self) -> PathBuf {
        outbox_dir_of(&self.data_dir)
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }
}

/// The machine's hostname (what snapshots record, and the default `STORINATOR_HOST`).
pub fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Longest host name accepted (a DNS name's limit).
pub const MAX_HOST_NAME: usize = 253;

/// Checks a storage host's name: 1 to 253 ASCII letters, digits, `.`, `-` or `_`, starting
/// with a letter or digit (so `web1:/srv` is never mistaken for a path, nor a path for a host).
pub fn check_host_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a host name\nhint: 1 to {MAX_HOST_NAME} letters, digits, '.', '-' or '_', starting with a letter or digit"
        ))
    }
}

/// Where files restored for the chat (`/get`) wait until the bot has sent them, under a data
/// directory (the bot knows only the data directory, not the rest of the worker's settings).
pub fn outbox_dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("outbox")
}

/// Parses `STORINATOR_STORAGE`: comma-separated lanes, each `[<name>=]<where>`, `<where>` one
/// of
///
/// - `telegram`: the worker's account (`STORINATOR_SESSION_FILE`) and its storage chat
///   (`STORINATOR_STORAGE_CHAT`, default Saved Messages);
/// - `telegram:<chat>`: another chat of that account (`-100…`, `@username` or `me`);
/// - `telegram:<session file>[:<chat>]`: another account, by the absolute path of its session
///   file (`storinator-worker login --lane <name>` writes it), and its Saved Messages or
///   `<chat>`;
/// - `dir:<path>`: a local directory.
///
/// With several lanes each is named (`<name>=<where>`, the name 1 to 32 letters, digits, `-`
/// or `_`); a single lane may go unnamed (today's `telegram` or `dir:<path>`). Names are what
/// the catalog records for every copy: keep them when editing the list. Packs stored before
/// lanes existed belong to the first lane, so list the one that held them first.
pub fn parse_lanes(raw: &str, telegram: &TelegramSettings) -> Result<Vec<LaneSpec>, String> {
    let mut lanes: Vec<LaneSpec> = Vec::new();
    let mut unnamed: Option<String> = None;
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, spec) = match item.split_once('=') {
            Some((n, rest)) if !n.contains(':') && !n.contains('/') => {
                let n = n.trim();
                let ok = (1..=32).contains(&n.len())
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !ok {
                    return Err(format!(
                        "lane name {n:?} must be 1 to 32 letters, digits, - or _"
                    ));
                }
                (n.to_string(), rest.trim())
            }
            _ => {
                unnamed.get_or_insert_with(|| item.to_string());
                (item.to_string(), item)
            }
        };
        let spec = parse_lane(spec, telegram)?;
        if let Some(other) = lanes.iter().find(|l| l.name == name) {
            return Err(format!("two lanes are named {:?}", other.name));
        }
        if let Some(other) = lanes.iter().find(|l| same_place(&l.spec, &spec)) {
            return Err(format!(
                "lanes {:?} and {name:?} are the same storage: copies there would not be independent",
                other.name
            ));
        }
        lanes.push(LaneSpec { name, spec });
    }
    if lanes.is_empty() {
        return Err("no lane: expected `telegram`, `dir:<path>` or a comma-separated list".into());
    }
    if let Some(item) = unnamed.filter(|_| lanes.len() > 1) {
        return Err(format!(
            "lane {item:?} has no name; with several lanes each needs one, as in `<name>={item}`\nhint: the catalog records each pack's lane by name, so keep the names when editing the list"
        ));
    }
    Ok(lanes)
}

fn parse_lane(spec: &str, telegram: &TelegramSettings) -> Result<StorageSpec, String> {
    let default_session = || telegram.session_path.clone();
    if spec == "telegram" {
        return Ok(StorageSpec::Telegram {
            session: default_session(),
            chat: telegram.storage_chat.clone(),
        });
    }
    if let Some(path) = spec.strip_prefix("dir:").filter(|p| !p.is_empty()) {
        return Ok(StorageSpec::Dir(PathBuf::from(path)));
    }
    let Some(rest) = spec.strip_prefix("telegram:").filter(|r| !r.is_empty()) else {
        return Err(format!(
            "{spec:?} is not a lane; expected `telegram`, `telegram:<chat>`, `telegram:<session file>[:<chat>]` or `dir:<path>`"
        ));
    };
    if !rest.starts_with('/') {
        return Ok(StorageSpec::Telegram {
            session: default_session(),
            chat: Some(rest.to_string()),
        });
    }
    // An absolute session path, perhaps followed by `:<chat>` (chats never contain `/`).
    let (session, chat) = match rest.rsplit_once(':') {
        Some((path, chat)) if !chat.contains('/') && !path.is_empty() => {
            (path, Some(chat.to_string()).filter(|c| !c.is_empty()))
        }
        _ => (rest, None),
    };
    Ok(StorageSpec::Telegram {
        session: PathBuf::from(session),
        chat,
    })
}

/// Whether two lanes would store in the same place (the same account's same chat, the same
/// folder).
fn same_place(a: &StorageSpec, b: &StorageSpec) -> bool {
    let chat = |c: &Option<String>| {
        let c = c.as_deref().unwrap_or("").trim().to_ascii_lowercase();
        if ["", "me", "self", "saved"].contains(&c.as_str()) {
            String::new()
        } else {
            c.strip_prefix("-100").map(str::to_string).unwrap_or(c)
        }
    };
    match (a, b) {
        (
            StorageSpec::Telegram {
                session: s1,
                chat: c1,
            },
            StorageSpec::Telegram {
                session: s2,
                chat: c2,
            },
        ) => s1 == s2 && chat(c1) == chat(c2),
        (StorageSpec::Dir(d1), StorageSpec::Dir(d2)) => d1 == d2,
        _ => false,
    }
}

/// The data directory and the database URL, from `STORINATOR_DATA_DIR` and `DATABASE_URL`
/// only (the bot derives its database from this too, and reads nothing else of the worker's).
pub fn database_location(
    get: impl Fn(&str) -> Option<String>,
) -> Result<(PathBuf, String), ConfigError> {
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
            let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
            if !url.starts_with("sqlite:") && !postgres {
                return Err(ConfigError::Invalid {
                    var: "DATABASE_URL",
                    value: url,
                    reason: "expected sqlite://path/to/file.db or postgres://user@host/database"
                        .into(),
                });
            }
            url
        }
        None => sqlite_url(&data_dir.join("storinator.db")),
    };
    Ok((data_dir, database_url))
}

/// The worker's secrets: the bot must never hold them (design invariant 9).
pub const WORKER_SECRETS: &[&str] = &[
    "STORINATOR_PASSPHRASE",
    "STORINATOR_PASSPHRASE_FILE",
    "STORINATOR_NEW_PASSPHRASE",
    "TELEGRAM_API_HASH",
];

/// Reads the settings of schedules, alerts and the scrub (the bot reads them too: none is a
/// secret).
pub fn unattended_settings(
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<UnattendedSettings, ConfigError> {
    let invalid = |var: &'static str, value: String, reason: String| ConfigError::Invalid {
        var,
        value,
        reason,
    };
    let timezone = match var("STORINATOR_TIMEZONE") {
        None => jiff::tz::TimeZone::system(),
        Some(name) => jiff::tz::TimeZone::get(&name).map_err(|e| {
            invalid(
                "STORINATOR_TIMEZONE",
                name.clone(),
                format!("not a time zone this host knows ({e}); expected an IANA name like Europe/Berlin"),
            )
        })?,
    };
    let jitter_ms = match var("STORINATOR_SCHEDULE_JITTER") {
        None => 0,
        Some(v) => parse_duration_ms(&v)
            .map_err(|r| invalid("STORINATOR_SCHEDULE_JITTER", v.clone(), r))?,
    };
    let healthcheck_url = match var("STORINATOR_HEALTHCHECK_URL") {
        None => None,
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u),
        Some(u) => {
            return Err(invalid(
                "STORINATOR_HEALTHCHECK_URL",
                u,
                "expected an http:// or https:// URL".into(),
            ));
        }
    };
    let scrub_bytes_per_day = match var("STORINATOR_SCRUB_BYTES_PER_DAY") {
        None => DEFAULT_SCRUB_BYTES_PER_DAY,
        Some(v) => match parse_size(&v) {
            Ok(n) if n > 0 => n,
            Ok(_) => {
                return Err(invalid(
                    "STORINATOR_SCRUB_BYTES_PER_DAY",
                    v,
                    "the budget must be more than 0 bytes".into(),
                ));
            }
            Err(r) => return Err(invalid("STORINATOR_SCRUB_BYTES_PER_DAY", v, r)),
        },
    };
    let scrub_at = match var("STORINATOR_SCRUB_AT").as_deref() {
        None => Some((4, 0)),
        Some("off") => None,
        Some(v) => {
            Some(parse_hh_mm(v).map_err(|r| invalid("STORINATOR_SCRUB_AT", v.to_string(), r))?)
        }
    };
    Ok(UnattendedSettings {
        timezone,
        jitter_ms,
        healthcheck_url,
        scrub_bytes_per_day,
        scrub_at,
    })
}

/// Parses `HH:MM` (24-hour clock).
pub fn parse_hh_mm(v: &str) -> Result<(u8, u8), String> {
    let bad = || format!("{v:?} is not a time of day; expected HH:MM, like 03:30");
    let (h, m) = v.trim().split_once(':').ok_or_else(bad)?;
    let h: u8 = h.parse().map_err(|_| bad())?;
    let m: u8 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 || v.trim().len() > 5 {
        return Err(bad());
    }
    Ok((h, m))
}

/// Parses durations like `90s`, `10m`, `2h`, `1d` (a bare number is seconds).
pub fn parse_duration_ms(v: &str) -> Result<i64, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{v:?} is not a duration; expected something like 90s, 10m or 2h"))?;
    let unit_ms = match unit.trim() {
        "" | "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown duration unit {other:?}; use s, m, h or d")),
    };
    n.checked_mul(unit_ms)
        .filter(|ms| *ms <= 7 * 86_400_000)
        .ok_or_else(|| format!("{v:?} is too long (at most 7 days)"))
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

/// Parses a percentage from 0 to 100 (`30`, `12.5`, `30%`): `prune --repack-below` and the
/// chat's `/prune repack-below`.
pub fn parse_percent(v: &str) -> Result<f64, String> {
    v.trim()
        .trim_end_matches('%')
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=100.0).contains(p))
        .ok_or_else(|| format!("{v:?} is not a percentage from 0 to 100"))
}

/// Who may act on the whole installation from the chat (`/prune`: packs are shared by every
/// owner, so freeing them is not one user's business): `STORINATOR_ADMIN_USERS` when set,
/// each of them an allowed user; unset, the only allowed user of a one-user installation,
/// and nobody when several people share it (the server's CLI still can).
pub fn admin_users(admins: Option<&str>, allowed: &[i64]) -> Result<Vec<i64>, String> {
    let Some(raw) = admins.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(if allowed.len() == 1 {
            allowed.to_vec()
        } else {
            Vec::new()
        });
    };
    let list = parse_list(raw, |s| {
        s.parse::<i64>()
            .map_err(|_| format!("{s:?} is not a Telegram user id"))
    })?;
    if let Some(stranger) = list.iter().find(|id| !allowed.contains(id)) {
        return Err(format!(
            "user {stranger} is not in STORINATOR_ALLOWED_USERS\nhint: an admin must be an allowed user too"
        ));
    }
    Ok(list)
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
        assert_eq!(
            c.lanes,
            vec![LaneSpec {
                name: "telegram".into(),
                spec: StorageSpec::Telegram {
                    session: "/home/u/.local/share/t-storinator/worker.session".into(),
                    chat: None,
                },
            }]
        );
        assert_eq!(c.copies, 1);
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
        assert_eq!(c.lanes.len(), 1);
        assert_eq!(c.lanes[0].spec, StorageSpec::Dir("/backups".into()));
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
    fn pack_size_floor_and_ceilings() {
        let size = |v: &str, premium: bool| {
            let mut vars = vec![("STORINATOR_PACK_SIZE", v)];
            if premium {
                vars.push(("STORINATOR_TELEGRAM_PREMIUM", "1"));
            }
            cfg(&vars).map(|c| c.pack_size)
        };
        // The 64 KiB floor, for everyone.
        assert_eq!(size("64KiB", false).unwrap(), 64 * 1024);
        assert_eq!(size("64KiB", true).unwrap(), 64 * 1024);
        for premium in [false, true] {
            let err = size("65535", premium).unwrap_err().to_string();
            assert!(
                err.contains("STORINATOR_PACK_SIZE") && err.contains("at least 65536"),
                "{err}"
            );
        }
        // 1999 MiB without Premium, 3999 MiB with it; a byte more is refused.
        assert_eq!(size("1999MiB", false).unwrap(), 1999 << 20);
        let err = size(&((1999u64 << 20) + 1).to_string(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("STORINATOR_PACK_SIZE") && err.contains("2000 MiB"),
            "{err}"
        );
        assert_eq!(size("3999MiB", true).unwrap(), 3999 << 20);
        let err = size(&((3999u64 << 20) + 1).to_string(), true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("STORINATOR_PACK_SIZE") && err.contains("4000 MiB"),
            "{err}"
        );
        assert!(size("4000MiB", true).is_err());
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
            ("DATABASE_URL", "mysql://x"),
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
    fn example_values_and_malformed_credentials_are_refused() {
        for (k, v) in [
            ("TELEGRAM_API_ID", "1234567"),
            ("TELEGRAM_API_ID", "-5"),
            ("TELEGRAM_API_HASH", "0123456789abcdef0123456789abcdef"),
            ("TELEGRAM_API_HASH", "abc"),
            ("STORINATOR_PASSPHRASE", "a-long-random-passphrase"),
        ] {
            let err = cfg(&[(k, v)]).unwrap_err();
            assert_eq!(err.var(), k, "{err}");
        }
        let err = cfg(&[("TELEGRAM_API_ID", "1234567")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("example value"), "{err}");
        // Secrets are not echoed back.
        let err = cfg(&[("TELEGRAM_API_HASH", "secretsecret")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secretsecret"), "{err}");
        assert!(cfg(&[("TELEGRAM_API_HASH", "00112233445566778899aabbccddeeff")]).is_ok());

        assert!(check_bot_token("123456789:AAExampleExampleExampleExampleExample").is_err());
        assert!(check_bot_token("123456:TEST").is_err());
        assert!(check_bot_token("abc:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw").is_err());
        let e = check_bot_token("110201543 AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw").unwrap_err();
        assert!(!e.to_string().contains("AAHdq"), "{e}");
        assert!(check_bot_token("110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw").is_ok());
    }

    #[test]
    fn an_unreadable_env_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        // No .env: fine.
        load_dotenv_in(d.path()).unwrap();
        // A .env that can't be read (a folder here: root reads files of any mode).
        std::fs::create_dir(d.path().join(".env")).unwrap();
        let e = load_dotenv_in(d.path()).unwrap_err();
        assert_eq!(e.var(), ".env");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("cannot read {}", d.path().join(".env").display())),
            "{text}"
        );
        // One that can't be parsed.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".env"), "STORINATOR_X='unclosed\n").unwrap();
        let e = load_dotenv_in(d.path()).unwrap_err();
        assert!(e.to_string().contains(".env"), "{e}");
    }

    #[test]
    fn lanes_and_copies() {
        let c = cfg(&[
            ("STORINATOR_DATA_DIR", "/d"),
            ("STORINATOR_STORAGE_CHAT", "-1001500000000"),
            (
                "STORINATOR_STORAGE",
                "main=telegram, b=telegram:/d/b.session, c=telegram:/d/c.session:@their_chan, me=telegram:me, nas=dir:/mnt/nas",
            ),
            ("STORINATOR_COPIES", "2"),
        ])
        .unwrap();
        let tg = |session: &str, chat: Option<&str>| StorageSpec::Telegram {
            session: session.into(),
            chat: chat.map(str::to_string),
        };
        let got: Vec<(&str, &StorageSpec)> =
            c.lanes.iter().map(|l| (l.name.as_str(), &l.spec)).collect();
        assert_eq!(
            got,
            vec![
                ("main", &tg("/d/worker.session", Some("-1001500000000"))),
                ("b", &tg("/d/b.session", None)),
                ("c", &tg("/d/c.session", Some("@their_chan"))),
                ("me", &tg("/d/worker.session", Some("me"))),
                ("nas", &StorageSpec::Dir("/mnt/nas".into())),
            ]
        );
        assert_eq!(c.copies, 2);
        for (storage, copies, wants) in [
            ("telegram", "2", "2 copies need 2 lanes"),
            ("a=telegram,b=telegram:/x.session", "0", "1 or more"),
            ("a=telegram,b=telegram:/x.session", "two", "1 or more"),
            ("a=telegram,b=s3:bucket", "1", "\"s3:bucket\" is not a lane"),
            ("a=telegram,a=dir:/x", "1", "two lanes are named \"a\""),
            ("a=telegram,b=telegram:me", "1", "are the same storage"),
            ("x=dir:/x,y=dir:/x", "1", "are the same storage"),
            ("a=telegram,dir:/x", "1", "lane \"dir:/x\" has no name"),
            ("a=telegram,,", "3", "3 copies need 3 lanes"),
            ("bad name=dir:/x", "1", "lane name"),
        ] {
            let err = cfg(&[
                ("STORINATOR_STORAGE", storage),
                ("STORINATOR_COPIES", copies),
            ])
            .unwrap_err()
            .to_string();
            assert!(err.contains(wants), "{storage} / {copies}: {err}");
            assert!(err.contains("STORINATOR_"), "{err}");
        }
    }

    #[test]
    fn passphrase_never_debug_printed() {
        let c = cfg(&[("STORINATOR_PASSPHRASE", "hunter2")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn unattended_settings_are_read_and_checked() {
        let c = cfg(&[
            ("STORINATOR_TIMEZONE", "Europe/Berlin"),
            ("STORINATOR_SCHEDULE_JITTER", "10m"),
            ("STORINATOR_HEALTHCHECK_URL", "http://127.0.0.1:9/ping/abc"),
            ("STORINATOR_SCRUB_BYTES_PER_DAY", "64MiB"),
            ("STORINATOR_SCRUB_AT", "05:30"),
        ])
        .unwrap();
        let u = &c.unattended;
        assert_eq!(u.timezone.iana_name(), Some("Europe/Berlin"));
        assert_eq!(u.jitter_ms, 600_000);
        assert_eq!(
            u.healthcheck_url.as_deref(),
            Some("http://127.0.0.1:9/ping/abc")
        );
        assert_eq!(u.scrub_bytes_per_day, 64 << 20);
        assert_eq!(u.scrub_at, Some((5, 30)));
        let d = cfg(&[]).unwrap().unattended;
        assert_eq!(d.scrub_bytes_per_day, 1 << 30);
        assert_eq!(d.jitter_ms, 0);
        assert_eq!(
            cfg(&[("STORINATOR_SCRUB_AT", "off")])
                .unwrap()
                .unattended
                .scrub_at,
            None
        );
        for (k, v) in [
            ("STORINATOR_TIMEZONE", "Mars/Olympus_Mons"),
            ("STORINATOR_SCHEDULE_JITTER", "soon"),
            ("STORINATOR_SCHEDULE_JITTER", "30d"),
            ("STORINATOR_HEALTHCHECK_URL", "ftp://x"),
            ("STORINATOR_SCRUB_BYTES_PER_DAY", "0"),
            ("STORINATOR_SCRUB_AT", "25:00"),
        ] {
            let err = cfg(&[(k, v)]).unwrap_err().to_string();
            assert!(err.contains(k) && err.contains(v), "{k}: {err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1.9GiB").unwrap(), (1.9 * 1073741824.0) as u64);
        assert_eq!(parse_size("512k").unwrap(), 512 * 1024);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("1.9 parsecs").is_err());
    }
}

//! The bot's settings, read once from the environment (and `.env`) at start-up.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// A configuration problem, naming the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("{} {var}: {message}\nhint: every variable of the bot is described in bot.env.example", if *missing { "missing" } else { "invalid" })]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
    /// Not set at all (rather than set to something wrong).
    pub missing: bool,
}

fn bad(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
        missing: false,
    }
}

fn missing(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
        missing: true,
    }
}

/// The engine's configuration errors, in the bot's words.
fn shared(e: storinator_shared::ConfigError) -> ConfigError {
    use storinator_shared::ConfigError as E;
    let (missing, message) = match &e {
        E::Missing { reason, .. } => (true, reason.clone()),
        E::Invalid { reason, value, .. } if value == "(hidden)" => (false, reason.clone()),
        E::Invalid { reason, value, .. } => (false, format!("{value:?}: {reason}")),
        E::File { path, error, .. } => (false, format!("{}: {error}", path.display())),
        E::EnvFile { .. } => (false, e.to_string()),
    };
    ConfigError {
        var: e.var(),
        message,
        missing,
    }
}

/// Everything the bot needs to run.
#[derive(Clone, Debug)]
pub struct BotConfig {
    /// `TELOXIDE_TOKEN`.
    pub token: String,
    /// `TELOXIDE_API_URL`: a Bot API server other than api.telegram.org (tests, local server).
    pub api_url: Option<reqwest::Url>,
    /// `STORINATOR_ALLOWED_USERS`: Telegram user ids that may command the bot.
    pub allowed_users: BTreeSet<u64>,
    /// `STORINATOR_ADMIN_USERS`: allowed users who may act on the whole installation
    /// (`/prune`); unset, the only allowed user of a one-user installation (see
    /// [`storinator_shared::config::admin_users`]).
    pub admin_users: BTreeSet<u64>,
    /// `STORINATOR_BACKUP_ROOTS`, canonicalised: `/backup` only accepts folders inside these.
    pub backup_roots: Vec<PathBuf>,
    /// `STORINATOR_RESTORE_ROOTS` (default: the backup roots), canonicalised: where `/restore
    /// ... to <dir>` may write.
    pub restore_roots: Vec<PathBuf>,
    /// `DATABASE_URL` (default `sqlite://<STORINATOR_DATA_DIR>/storinator.db`).
    pub database_url: String,
    /// `STORINATOR_BOT_EDIT_INTERVAL_MS` (default 3000): least time between two edits in one
    /// chat. Telegram allows about one message per second per chat; progress edits stay well
    /// below that.
    pub edit_interval: Duration,
    /// `STORINATOR_BOT_TICK_MS` (default 1000): how often the job table is read for news.
    pub tick: Duration,
    /// `STORINATOR_BOT_POLL_TIMEOUT_S` (default 10): long-poll timeout of `getUpdates`. It
    /// also bounds how long shutdown waits for the poll in flight.
    pub poll_timeout: Duration,
    /// Where the worker leaves files restored for `/get` (`<STORINATOR_DATA_DIR>/outbox`): the
    /// bot sends only files from there, and deletes them once sent.
    pub outbox_dir: PathBuf,
    /// The message rates the bot keeps to (Telegram's; tests run them faster).
    pub limits: crate::outbox::Limits,
    /// A stranger is answered at most once in this time (default 5 minutes).
    pub stranger_interval: Duration,
    /// `STORINATOR_TIMEZONE` (the worker's rule): schedules and the times shown in chat.
    pub timezone: jiff::tz::TimeZone,
    /// `STORINATOR_SCRUB_BYTES_PER_DAY`: the scrub's daily budget, for `/scrub`'s cycle.
    pub scrub_bytes_per_day: u64,
}

/// A variable by name, trimmed, empty counting as unset.
fn var_any(get: &impl Fn(&str) -> Option<String>, k: &str) -> Option<String> {
    get(k)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The bot's own environment file, read from the directory it starts in. Not `.env`: that one
/// is the worker's and holds its secrets.
pub const BOT_ENV_FILE: &str = "bot.env";

impl BotConfig {
    /// Read `bot.env` (if present in the current directory) and the process environment.
    pub fn from_env() -> Result<BotConfig, ConfigError> {
        storinator_shared::config::load_env_file(std::path::Path::new(BOT_ENV_FILE))
            .map_err(shared)?;
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Build from any variable lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<BotConfig, ConfigError> {
        let var = |k: &'static str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        // Least privilege (design invariant 9): an internet-facing bot that is handed the
        // passphrase or the Telegram API hash is a deployment mistake; refuse to start rather
        // than hold them.
        for secret in storinator_shared::config::WORKER_SECRETS {
            if var(secret).is_some() {
                return Err(bad(
                    secret,
                    "is set in the bot's environment, but only the worker may hold it; the bot gets its token, the allowed users, the roots and the database, from an environment file of its own (see bot.env.example)",
                ));
            }
        }
        let token = var("TELOXIDE_TOKEN")
            .ok_or_else(|| missing("TELOXIDE_TOKEN", "the bot's token from @BotFather"))?;
        storinator_shared::config::check_bot_token(&token).map_err(shared)?;
        let api_url = var("TELOXIDE_API_URL")
            .map(|u| {
                reqwest::Url::parse(&u)
                    .map_err(|e| bad("TELOXIDE_API_URL", format!("{u:?} is not a URL: {e}")))
            })
            .transpose()?;

        let users = var("STORINATOR_ALLOWED_USERS").ok_or_else(|| {
            missing(
                "STORINATOR_ALLOWED_USERS",
                "comma-separated Telegram user ids",
            )
        })?;
        let mut allowed_users = BTreeSet::new();
        for part in users.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let id = part.parse::<u64>().map_err(|_| {
                bad(
                    "STORINATOR_ALLOWED_USERS",
                    format!("{part:?} is not a Telegram user id"),
                )
            })?;
            allowed_users.insert(id);
        }
        if allowed_users.is_empty() {
            return Err(bad("STORINATOR_ALLOWED_USERS", "lists no user ids"));
        }
        let allowed: Vec<i64> = allowed_users.iter().map(|u| *u as i64).collect();
        let admin_users = storinator_shared::config::admin_users(
            var("STORINATOR_ADMIN_USERS").as_deref(),
            &allowed,
        )
        .map_err(|e| bad("STORINATOR_ADMIN_USERS", e))?
        .into_iter()
        .map(|u| u as u64)
        .collect();

        let roots = |name: &'static str, raw: String| -> Result<Vec<PathBuf>, ConfigError> {
            let mut out = Vec::new();
            for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let p = PathBuf::from(part);
                if !p.is_absolute() {
                    return Err(bad(name, format!("{part:?} is not an absolute path")));
                }
                let canon = p
                    .canonicalize()
                    .map_err(|e| bad(name, format!("{part:?}: {e}")))?;
                if !canon.is_dir() {
                    return Err(bad(name, format!("{part:?} is not a directory")));
                }
                out.push(canon);
            }
            if out.is_empty() {
                return Err(bad(name, "lists no paths"));
            }
            Ok(out)
        };
        let backup_roots = roots(
            "STORINATOR_BACKUP_ROOTS",
            var("STORINATOR_BACKUP_ROOTS")
                .ok_or_else(|| missing("STORINATOR_BACKUP_ROOTS", "comma-separated folders"))?,
        )?;
        let restore_roots = match var("STORINATOR_RESTORE_ROOTS") {
            Some(raw) => roots("STORINATOR_RESTORE_ROOTS", raw)?,
            None => backup_roots.clone(),
        };

        // The worker's rules (same defaults, same validation): both must open one database
        // and see schedules in one time zone. Only those variables are read, nothing else of
        // the worker's configuration (no passphrase, no passphrase file).
        let (data_dir, database_url) =
            storinator_shared::config::database_location(&get).map_err(shared)?;
        let outbox_dir = storinator_shared::config::outbox_dir_of(&data_dir);
        let unattended =
            storinator_shared::config::unattended_settings(&|k: &str| var_any(&get, k))
                .map_err(shared)?;
        let timezone = unattended.timezone;
        let scrub_bytes_per_day = unattended.scrub_bytes_per_day;

        let millis = |name: &'static str, default: u64| -> Result<Duration, ConfigError> {
            match var(name) {
                None => Ok(Duration::from_millis(default)),
                Some(v) => v
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| bad(name, format!("{v:?} is not a number of milliseconds"))),
            }
        };
        let edit_interval = millis("STORINATOR_BOT_EDIT_INTERVAL_MS", 3000)?;
        let tick = millis("STORINATOR_BOT_TICK_MS", 1000)?.max(Duration::from_millis(10));
        let poll_timeout = match var("STORINATOR_BOT_POLL_TIMEOUT_S") {
            None => Duration::from_secs(10),
            Some(v) => v.parse::<u64>().map(Duration::from_secs).map_err(|_| {
                bad(
                    "STORINATOR_BOT_POLL_TIMEOUT_S",
                    format!("{v:?} is not a number of seconds"),
                )
            })?,
        };

        Ok(BotConfig {
            token,
            api_url,
            allowed_users,
            admin_users,
            backup_roots,
            restore_roots,
            database_url,
            edit_interval,
            tick,
            poll_timeout,
            outbox_dir,
            limits: crate::outbox::Limits::telegram(),
            stranger_interval: Duration::from_secs(300),
            timezone,
            scrub_bytes_per_day,
        })
    }

    pub fn is_allowed(&self, user_id: u64) -> bool {
        self.allowed_users.contains(&user_id)
    }

    /// May act on the whole installation (every owner's packs): `/prune`.
    pub fn is_admin(&self, user_id: u64) -> bool {
        self.is_allowed(user_id) && self.admin_users.contains(&user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const TOKEN: &str = "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw";

    #[test]
    fn a_missing_token_says_missing() {
        let e = BotConfig::from_lookup(lookup(&[])).unwrap_err();
        assert!(e.to_string().starts_with("missing TELOXIDE_TOKEN: "), "{e}");
        let e = BotConfig::from_lookup(lookup(&[(
            "TELOXIDE_TOKEN",
            "123456789:AAExampleExampleExampleExampleExample",
        )]))
        .unwrap_err();
        assert!(e.to_string().contains("example value"), "{e}");
    }

    #[test]
    fn reads_a_full_config() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        let cfg = BotConfig::from_lookup(lookup(&[
            ("TELOXIDE_TOKEN", TOKEN),
            ("TELOXIDE_API_URL", "http://127.0.0.1:9/"),
            ("STORINATOR_ALLOWED_USERS", "7, 8"),
            ("STORINATOR_BACKUP_ROOTS", &root),
            ("STORINATOR_DATA_DIR", "/var/lib/st/"),
            ("STORINATOR_BOT_EDIT_INTERVAL_MS", "50"),
        ]))
        .unwrap();
        assert!(cfg.is_allowed(7) && cfg.is_allowed(8) && !cfg.is_allowed(9));
        assert_eq!(cfg.backup_roots, vec![dir.path().canonicalize().unwrap()]);
        assert_eq!(cfg.restore_roots, cfg.backup_roots);
        assert_eq!(cfg.database_url, "sqlite:///var/lib/st/storinator.db");
        assert_eq!(cfg.edit_interval, Duration::from_millis(50));
        // Two users and no STORINATOR_ADMIN_USERS: nobody may prune from the chat.
        assert!(!cfg.is_admin(7) && !cfg.is_admin(8));
    }

    /// `/prune` acts on every owner's packs: only admins, who must be allowed users; a
    /// one-user installation's user is its admin.
    #[test]
    fn admins_are_allowed_users_and_default_to_a_sole_user() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        let cfg = |users: &str, admins: Option<&str>| {
            let mut vars = vec![
                ("TELOXIDE_TOKEN", TOKEN),
                ("STORINATOR_ALLOWED_USERS", users),
                ("STORINATOR_BACKUP_ROOTS", root.as_str()),
            ];
            if let Some(a) = admins {
                vars.push(("STORINATOR_ADMIN_USERS", a));
            }
            BotConfig::from_lookup(lookup(&vars))
        };
        let c = cfg("7,8", Some("8")).unwrap();
        assert!(c.is_admin(8) && !c.is_admin(7) && !c.is_admin(9));
        assert!(cfg("7", None).unwrap().is_admin(7));
        assert!(!cfg("7", Some(" ")).unwrap().is_admin(8));
        let e = cfg("7,8", Some("9")).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "invalid STORINATOR_ADMIN_USERS: user 9 is not in STORINATOR_ALLOWED_USERS"
            ),
            "{e}"
        );
        let e = cfg("7,8", Some("bob")).unwrap_err().to_string();
        assert!(e.contains("\"bob\" is not a Telegram user id"), "{e}");
    }

    /// Design invariant 9: the bot never holds the passphrase or the API hash. Handed one, it
    /// refuses to start and names it; and it reads no passphrase file.
    #[test]
    fn the_worker_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        let pass_file = dir.path().join("passphrase");
        std::fs::write(&pass_file, "secret\n").unwrap();
        let pass_file = pass_file.display().to_string();
        for secret in storinator_shared::config::WORKER_SECRETS {
            let value = if secret.ends_with("_FILE") {
                pass_file.as_str()
            } else {
                "hunter2"
            };
            let e = BotConfig::from_lookup(lookup(&[
                (
                    "TELOXIDE_TOKEN",
                    "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
                ),
                ("STORINATOR_ALLOWED_USERS", "7"),
                ("STORINATOR_BACKUP_ROOTS", &root),
                (secret, value),
            ]))
            .unwrap_err();
            assert_eq!(e.var, *secret);
            assert!(e.to_string().contains("only the worker may hold it"), "{e}");
            assert!(!e.to_string().contains("hunter2") && !e.to_string().contains("secret\n"));
        }
        // The lookup is asked for nothing else of the worker's.
        let asked = std::sync::Mutex::new(Vec::new());
        BotConfig::from_lookup(|k| {
            asked.lock().unwrap().push(k.to_string());
            match k {
                "TELOXIDE_TOKEN" => Some("110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".into()),
                "STORINATOR_ALLOWED_USERS" => Some("7".into()),
                "STORINATOR_BACKUP_ROOTS" => Some(root.clone()),
                _ => None,
            }
        })
        .unwrap();
        for k in asked.lock().unwrap().iter() {
            assert!(
                !k.contains("STORAGE") && !k.contains("API_ID") && !k.contains("SESSION"),
                "the bot asked for {k}"
            );
        }
    }

    #[test]
    fn errors_name_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        let base = [
            ("TELOXIDE_TOKEN", TOKEN),
            ("STORINATOR_ALLOWED_USERS", "7"),
            ("STORINATOR_BACKUP_ROOTS", root.as_str()),
        ];
        let with = |k: &'static str, v: &'static str| {
            let mut pairs: Vec<(&str, &str)> =
                base.iter().copied().filter(|(n, _)| *n != k).collect();
            pairs.push((k, v));
            BotConfig::from_lookup(lookup(&pairs)).unwrap_err().var
        };
        assert_eq!(with("TELOXIDE_TOKEN", ""), "TELOXIDE_TOKEN");
        assert_eq!(with("TELOXIDE_TOKEN", "123456:TEST"), "TELOXIDE_TOKEN");
        assert_eq!(
            with("STORINATOR_ALLOWED_USERS", "7,bob"),
            "STORINATOR_ALLOWED_USERS"
        );
        assert_eq!(
            with("STORINATOR_BACKUP_ROOTS", "relative/dir"),
            "STORINATOR_BACKUP_ROOTS"
        );
        assert_eq!(
            with("STORINATOR_BACKUP_ROOTS", "/no/such/dir/x"),
            "STORINATOR_BACKUP_ROOTS"
        );
        assert_eq!(with("TELOXIDE_API_URL", "not a url"), "TELOXIDE_API_URL");
        assert_eq!(
            with("STORINATOR_BOT_EDIT_INTERVAL_MS", "soon"),
            "STORINATOR_BOT_EDIT_INTERVAL_MS"
        );
    }
}

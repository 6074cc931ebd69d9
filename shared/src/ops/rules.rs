//! Who may back up what: the checks `/backup` and `/schedule` make before a job row is written,
//! and that a schedule makes again each time it fires (the configuration may have changed
//! since the schedule was created). One implementation for the bot and the worker.

use std::path::{Path, PathBuf};

use crate::config::Config;

/// True when `path` lies in one of `roots` (both canonical).
pub fn is_within(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

/// `/srv, /home`: the roots as messages name them.
pub fn roots_list(roots: &[PathBuf]) -> String {
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Check a folder to back up: absolute, existing, a directory, and inside an allowed root
/// after resolving `..` and symlinks. Returns the canonical path.
pub fn check_backup_path(path: &str, roots: &[PathBuf]) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!(
            "{path:?} is not an absolute path (it must start with /)"
        ));
    }
    let canon = match p.canonicalize() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("{path} does not exist"));
        }
        Err(e) => return Err(format!("{path}: {e}")),
    };
    // The root check is made on the canonical path, so `..` and symlinks can't leave a root;
    // it comes before the kind checks so nothing is revealed about paths outside the roots.
    if !is_within(&canon, roots) {
        return Err(format!(
            "{path} is outside the folders I may back up ({})",
            roots_list(roots)
        ));
    }
    if !canon.is_dir() {
        return Err(format!("{path} is not a folder"));
    }
    Ok(canon)
}

/// What a schedule must still satisfy when it fires.
#[derive(Clone, Debug, Default)]
pub struct FireRules {
    /// Canonical backup roots. Chat users' schedules must stay inside them; when the worker
    /// was given none, only the folder's existence is checked (the bot checked the roots when
    /// the schedule was made).
    pub backup_roots: Vec<PathBuf>,
    /// Telegram users still allowed to use the bot; empty: not checked here.
    pub allowed_users: Vec<i64>,
    /// A scheduled job waits a random time up to this long after its slot.
    pub jitter_ms: i64,
    /// The host of the daemon that fires schedules: it fires only its host's schedules and
    /// those of no host (`None`: every schedule, a daemon of no particular host).
    pub host: Option<String>,
}

impl FireRules {
    /// The rules from the worker's configuration (roots canonicalised where they exist).
    pub fn from_config(cfg: &Config) -> FireRules {
        FireRules {
            backup_roots: cfg
                .backup_roots
                .iter()
                .map(|r| r.canonicalize().unwrap_or_else(|_| r.clone()))
                .collect(),
            allowed_users: cfg.allowed_users.clone(),
            jitter_ms: cfg.unattended.jitter_ms,
            host: Some(cfg.host.clone()),
        }
    }

    /// Whether `owner` may still back up `path`; the reason when not.
    pub fn check(&self, owner: &str, path: &str) -> Result<(), String> {
        if let Some(id) = owner.strip_prefix("tg:") {
            let id: i64 = id
                .parse()
                .map_err(|_| format!("owner {owner:?} is not a Telegram user"))?;
            if !self.allowed_users.is_empty() && !self.allowed_users.contains(&id) {
                return Err(format!(
                    "user {id} is no longer in STORINATOR_ALLOWED_USERS"
                ));
            }
            if !self.backup_roots.is_empty() {
                return check_backup_path(path, &self.backup_roots).map(|_| ());
            }
        }
        let p = Path::new(path);
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(format!("{path} is not a folder")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(format!("{path} does not exist"))
            }
            Err(e) => Err(format!("{path}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fire_rules_recheck_user_and_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        let root = root.canonicalize().unwrap();
        let data = root.join("data").display().to_string();
        let outside = dir.path().join("outside").display().to_string();
        let rules = FireRules {
            backup_roots: vec![root.clone()],
            allowed_users: vec![7],
            jitter_ms: 0,
            host: None,
        };
        assert!(rules.check("tg:7", &data).is_ok());
        assert!(
            rules
                .check("tg:8", &data)
                .unwrap_err()
                .contains("no longer")
        );
        assert!(
            rules
                .check("tg:7", &outside)
                .unwrap_err()
                .contains("outside")
        );
        // The CLI's own schedules are not bound to the chat's roots.
        assert!(rules.check("local", &outside).is_ok());
        std::fs::remove_dir(root.join("data")).unwrap();
        assert!(
            rules
                .check("tg:7", &data)
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(
            rules
                .check("local", &data)
                .unwrap_err()
                .contains("does not exist")
        );
    }
}

//! Parsing of command arguments and the checks that happen before any job row is written.

use std::path::{Component, Path, PathBuf};

/// Arguments of `/backup <path> [unencrypted]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupArgs {
    pub path: String,
    pub encrypt: bool,
}

/// Arguments of `/restore <path> [to <dir>] [snapshot <id>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreArgs {
    pub path: String,
    pub to: Option<String>,
    pub snapshot: Option<String>,
}

/// Strip one pair of surrounding double quotes (for paths that contain a keyword).
fn unquote(s: &str) -> &str {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        &s[1..s.len() - 1]
    } else {
        s
    }
}

/// `/backup <path> [unencrypted]`. Paths may contain spaces; a folder whose name really ends
/// in " unencrypted" can be given in double quotes.
pub fn parse_backup(raw: &str) -> Result<BackupArgs, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("Which folder? Usage: /backup <path> [unencrypted]".into());
    }
    let (path, encrypt) = match raw.rsplit_once(char::is_whitespace) {
        Some((head, flag))
            if !raw.ends_with('"') && matches!(flag, "unencrypted" | "--unencrypted" | "plain") =>
        {
            (head.trim(), false)
        }
        _ => (raw, true),
    };
    Ok(BackupArgs {
        path: unquote(path).to_string(),
        encrypt,
    })
}

/// `/restore <path> [to <dir>] [snapshot <id>]`. The keywords are found from the right, so a
/// path may contain spaces; quote a path that itself contains " to " or " snapshot ".
pub fn parse_restore(raw: &str) -> Result<RestoreArgs, String> {
    const USAGE: &str = "Usage: /restore <path> [to <dir>] [snapshot <id>]";
    let mut rest = raw.trim().to_string();
    if rest.is_empty() {
        return Err(format!("What should I restore? {USAGE}"));
    }
    let mut snapshot = None;
    let mut to = None;
    // Either order of the two optional clauses is accepted: peel off whichever keyword comes
    // last, then look again.
    loop {
        let snap_at = snapshot
            .is_none()
            .then(|| keyword_at(&rest, "snapshot"))
            .flatten();
        let to_at = to.is_none().then(|| keyword_at(&rest, "to")).flatten();
        match (snap_at, to_at) {
            (Some(s), t) if t.is_none_or(|t| s > t) => {
                let (head, id) = split_at_keyword(&rest, s, "snapshot");
                let id = id.trim();
                if id.is_empty() || id.contains(char::is_whitespace) {
                    return Err(format!("A snapshot id is one word. {USAGE}"));
                }
                snapshot = Some(id.to_string());
                rest = head;
            }
            (_, Some(t)) => {
                let (head, dir) = split_at_keyword(&rest, t, "to");
                let dir = unquote(&dir).to_string();
                if dir.is_empty() {
                    return Err(format!("Restore to which folder? {USAGE}"));
                }
                to = Some(dir);
                rest = head;
            }
            _ => break,
        }
    }
    let path = unquote(&rest).to_string();
    if path.is_empty() {
        return Err(format!("What should I restore? {USAGE}"));
    }
    Ok(RestoreArgs { path, to, snapshot })
}

/// `/forget <path> keep daily 7 weekly 4 …`: the path and the policy's text (from the last
/// ` keep ` outside double quotes). Quote a path that itself contains " keep ".
pub fn parse_forget(raw: &str) -> Result<(String, String), String> {
    const USAGE: &str = "Usage: /forget <path> keep daily 7 weekly 4 monthly 12\n(rules: last, hourly, daily, weekly, monthly, yearly N; within 30d)";
    let raw = raw.trim();
    let Some(at) = keyword_at(&format!("{raw} "), "keep") else {
        return Err(format!("Keep which snapshots? {USAGE}"));
    };
    let (path, policy) = split_at_keyword(&format!("{raw} "), at, "keep");
    let path = unquote(&path).to_string();
    if path.is_empty() {
        return Err(format!("Which folder? {USAGE}"));
    }
    Ok((path, format!("keep {}", policy.trim())))
}

/// `/prune [repack-below <percent>] [max-repack <size>]`, the CLI's `--repack-below` and
/// `--max-repack` (either spelling, with or without `--`, in any order): the options, or the
/// answer naming the input at fault.
pub fn parse_prune(raw: &str) -> Result<(Option<u64>, f64), String> {
    const USAGE: &str = "Usage: /prune [repack-below 50] [max-repack 200MB]";
    let mut max_repack = None;
    let mut repack_below = None;
    let mut words = raw.split_whitespace();
    while let Some(word) = words.next() {
        let option = word
            .trim_start_matches("--")
            .replace('_', "-")
            .to_lowercase();
        // `repack-below=30` as well as `repack-below 30`.
        let (option, inline) = match option.split_once('=') {
            Some((o, v)) => (o.to_string(), Some(v.to_string())),
            None => (option, None),
        };
        let known = matches!(option.as_str(), "repack-below" | "max-repack");
        if !known {
            return Err(format!("🧹 {word:?} is not an option of /prune. {USAGE}"));
        }
        let Some(value) = inline.or_else(|| words.next().map(str::to_string)) else {
            return Err(format!("🧹 {option} needs a value. {USAGE}"));
        };
        if option == "repack-below" {
            let p = storinator_shared::config::parse_percent(&value)
                .map_err(|e| format!("🧹 repack-below: {e}. {USAGE}"))?;
            if repack_below.replace(p).is_some() {
                return Err(format!("🧹 repack-below is given twice. {USAGE}"));
            }
        } else {
            let b = storinator_shared::config::parse_size(&value)
                .map_err(|e| format!("🧹 max-repack {value:?}: {e}. {USAGE}"))?;
            if max_repack.replace(b).is_some() {
                return Err(format!("🧹 max-repack is given twice. {USAGE}"));
            }
        }
    }
    // The CLI's default otherwise.
    let repack_below =
        repack_below.unwrap_or(storinator_shared::PruneOptions::default().repack_below);
    Ok((max_repack, repack_below))
}

/// Byte index of the last ` <keyword> ` that is not inside double quotes and has a
/// non-empty head before it.
fn keyword_at(s: &str, keyword: &str) -> Option<usize> {
    let needle = format!(" {keyword} ");
    let mut in_quotes = false;
    let mut found = None;
    for (i, b) in s.bytes().enumerate() {
        if b == b'"' {
            in_quotes = !in_quotes;
        } else if !in_quotes
            // Bytes, not `s[i..]`: `i` may fall inside a multi-byte character. A match starts
            // with a space, so `s[..i]` is then cut at a character boundary.
            && s.as_bytes()[i..].starts_with(needle.as_bytes())
            && !s[..i].trim().is_empty()
        {
            found = Some(i);
        }
    }
    found
}

fn split_at_keyword(s: &str, at: usize, keyword: &str) -> (String, String) {
    let head = s[..at].trim().to_string();
    (head, s[at + keyword.len() + 2..].to_string())
}

/// Parse a job id as users type it: `12` or `#12`.
pub fn parse_job_id(raw: &str) -> Result<i64, String> {
    let t = raw.trim().trim_start_matches('#');
    t.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        format!(
            "{:?} is not a job id. Usage: /cancel <job id> (see /jobs)",
            raw.trim()
        )
    })
}

use storinator_shared::ops::rules::{is_within, roots_list};

/// Check a folder the user wants backed up (one implementation with the worker's check when
/// a schedule fires): absolute, existing, a directory, and inside an allowed root after
/// resolving `..` and symlinks. Returns the canonical path.
pub use storinator_shared::ops::rules::check_backup_path;

/// Normalise the path a user asks to restore: absolute, repeated and trailing slashes
/// collapsed, and no `.` or `..` component (refused rather than resolved: a restore without
/// `to` writes next to this path, so it must mean exactly what it says).
pub fn normalize_restore_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{path:?} is not an absolute path (it must start with /)"
        ));
    }
    let mut parts = Vec::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if c == "." || c == ".." {
            return Err(format!(
                "{path}: \".\" and \"..\" are not allowed in a path"
            ));
        }
        parts.push(c);
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Check a restore target: absolute, no `..`, and inside an allowed root once its nearest
/// existing ancestor is resolved (the target itself may not exist yet). Returns the path with
/// that ancestor canonicalised.
pub fn check_restore_target(dir: &str, roots: &[PathBuf]) -> Result<PathBuf, String> {
    let p = Path::new(dir);
    if !p.is_absolute() {
        return Err(format!(
            "{dir:?} is not an absolute path (it must start with /)"
        ));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{dir}: \"..\" is not allowed in a restore target"));
    }
    let mut existing = p.to_path_buf();
    let mut tail = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                tail.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return Err(format!("{dir}: no existing parent folder")),
        }
    }
    let mut canon = existing.canonicalize().map_err(|e| format!("{dir}: {e}"))?;
    if !canon.is_dir() {
        return Err(format!("{dir}: {} is not a folder", existing.display()));
    }
    for name in tail.iter().rev() {
        canon.push(name);
    }
    if !is_within(&canon, roots) {
        return Err(format!(
            "{dir} is outside the folders I may restore into ({})",
            roots_list(roots)
        ));
    }
    Ok(canon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_args_mirror_the_cli_and_name_bad_input() {
        assert_eq!(parse_prune("").unwrap(), (None, 50.0));
        assert_eq!(
            parse_prune("repack-below 30 max-repack 200MB").unwrap(),
            (Some(200 << 20), 30.0)
        );
        assert_eq!(
            parse_prune("--max-repack=1G --repack-below 12.5%").unwrap(),
            (Some(1 << 30), 12.5)
        );
        for (raw, needle) in [
            (
                "repack-below 130",
                "repack-below: \"130\" is not a percentage from 0 to 100",
            ),
            ("repack-below lots", "\"lots\" is not a percentage"),
            (
                "max-repack 12parsecs",
                "max-repack \"12parsecs\": unknown size unit",
            ),
            ("max-repack", "max-repack needs a value"),
            ("now", "\"now\" is not an option of /prune"),
            (
                "repack-below 10 repack-below 20",
                "repack-below is given twice",
            ),
        ] {
            let e = parse_prune(raw).unwrap_err();
            assert!(e.contains(needle), "{raw}: {e}");
            assert!(e.contains("Usage: /prune"), "{raw}: {e}");
        }
    }

    #[test]
    fn backup_args() {
        assert_eq!(
            parse_backup("/srv/my data").unwrap(),
            BackupArgs {
                path: "/srv/my data".into(),
                encrypt: true
            }
        );
        assert_eq!(
            parse_backup("/srv/my data unencrypted").unwrap(),
            BackupArgs {
                path: "/srv/my data".into(),
                encrypt: false
            }
        );
        assert_eq!(
            parse_backup("\"/srv/x unencrypted\"").unwrap(),
            BackupArgs {
                path: "/srv/x unencrypted".into(),
                encrypt: true
            }
        );
        assert!(parse_backup("  ").is_err());
    }

    #[test]
    fn restore_args() {
        let r = parse_restore("/srv/data/my photos to /tmp/out dir snapshot ab12").unwrap();
        assert_eq!(r.path, "/srv/data/my photos");
        assert_eq!(r.to.as_deref(), Some("/tmp/out dir"));
        assert_eq!(r.snapshot.as_deref(), Some("ab12"));
        let r = parse_restore("/srv/a snapshot ab12 to /tmp/o").unwrap();
        assert_eq!(
            (r.path.as_str(), r.to.as_deref(), r.snapshot.as_deref()),
            ("/srv/a", Some("/tmp/o"), Some("ab12"))
        );
        let r = parse_restore("\"/srv/back to school\"").unwrap();
        assert_eq!(r.path, "/srv/back to school");
        assert_eq!(r.to, None);
        let r = parse_restore("/srv/x").unwrap();
        assert_eq!((r.to, r.snapshot), (None, None));
        assert!(parse_restore("").is_err());
        assert!(parse_restore("/srv/x snapshot two words").is_err());
        // Found by fuzzing: multi-byte characters before a keyword once panicked.
        let r = parse_restore("/srv/é to /tmp/ü").unwrap();
        assert_eq!(
            (r.path.as_str(), r.to.as_deref()),
            ("/srv/é", Some("/tmp/ü"))
        );
    }

    #[test]
    fn forget_args() {
        let (p, k) = parse_forget("/srv/my data keep daily 7 weekly 4").unwrap();
        assert_eq!(
            (p.as_str(), k.as_str()),
            ("/srv/my data", "keep daily 7 weekly 4")
        );
        let (p, k) = parse_forget("\"/srv/keep it\" keep last 3").unwrap();
        assert_eq!((p.as_str(), k.as_str()), ("/srv/keep it", "keep last 3"));
        // The policy's own parser judges what follows `keep`, even nothing.
        let (_, k) = parse_forget("/srv/x keep").unwrap();
        assert_eq!(k, "keep ");
        assert!(parse_forget("/srv/x").unwrap_err().contains("Keep which"));
        assert!(parse_forget("").is_err());
        assert!(parse_forget("keep daily 7").is_err());
    }

    #[test]
    fn job_ids() {
        assert_eq!(parse_job_id("#12").unwrap(), 12);
        assert_eq!(parse_job_id(" 7 ").unwrap(), 7);
        assert!(parse_job_id("x").is_err());
        assert!(parse_job_id("").is_err());
        assert!(parse_job_id("-3").is_err());
    }

    #[test]
    fn backup_paths_stay_inside_roots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("file"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        let roots = vec![root.canonicalize().unwrap()];
        let s = |p: &Path| p.display().to_string();

        assert_eq!(
            check_backup_path(&s(&root.join("sub")), &roots).unwrap(),
            roots[0].join("sub")
        );
        assert!(check_backup_path(&s(&root), &roots).is_ok());
        let e = check_backup_path(&s(&root.join("sub/../../outside")), &roots).unwrap_err();
        assert!(e.contains("outside the folders"), "{e}");
        let e = check_backup_path(&s(&root.join("escape")), &roots).unwrap_err();
        assert!(e.contains("outside the folders"), "{e}");
        let e = check_backup_path(&s(&root.join("missing")), &roots).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let e = check_backup_path(&s(&root.join("file")), &roots).unwrap_err();
        assert!(e.contains("not a folder"), "{e}");
        assert!(check_backup_path("relative", &roots).is_err());
        // A sibling whose name extends the root's is not inside it.
        std::fs::create_dir_all(d.path().join("rootx")).unwrap();
        assert!(check_backup_path(&s(&d.path().join("rootx")), &roots).is_err());
    }

    #[test]
    fn restore_paths_are_normalised_and_refuse_dots() {
        assert_eq!(normalize_restore_path("/srv//data/").unwrap(), "/srv/data");
        assert_eq!(normalize_restore_path("/").unwrap(), "/");
        for bad in ["/srv/../etc/x", "/srv/./x", "/..", "srv/x", ""] {
            assert!(normalize_restore_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn restore_targets_stay_inside_roots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(d.path(), root.join("up")).unwrap();
        let roots = vec![root.canonicalize().unwrap()];
        let s = |p: &Path| p.display().to_string();
        assert_eq!(
            check_restore_target(&s(&root.join("new/dir")), &roots).unwrap(),
            roots[0].join("new/dir")
        );
        assert!(check_restore_target(&s(&root.join("a/../../x")), &roots).is_err());
        assert!(check_restore_target(&s(&root.join("up/elsewhere")), &roots).is_err());
        assert!(check_restore_target("/", &roots).is_err());
    }
}

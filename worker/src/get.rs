//! `/get`: one file restored to a private place, verified by the restore (its SHA-256 must
//! match the backup before it is renamed into place), and handed on: files up to the Bot
//! API's 50 MB wait in the outbox for the bot to send; larger ones go out through the
//! worker's own account to its Saved Messages, and are deleted here right after.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use storinator_shared::engine::restore::resolve;
use storinator_shared::{
    BOT_UPLOAD_LIMIT, CancelFlag, EntryKind, Error, JobId, JobResult, Progress, Repo,
    RestoreOptions, human_bytes,
};

use crate::daemon::DaemonConfig;

/// Creates `dir` (and the outbox above it) readable by its owner only.
fn private_dir(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Removes a job's outbox folder, whatever it holds.
fn clean(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", dir.display());
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    repo: &Repo,
    cfg: &DaemonConfig,
    job: JobId,
    owner: &str,
    path: &str,
    snapshot: Option<&str>,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<JobResult, Error> {
    let r = resolve(&repo.catalog, owner, path, snapshot).await?;
    let entry = repo
        .catalog
        .entries_under(r.root_id, r.snapshot.seq, &r.prefix)
        .await?
        .into_iter()
        .find(|e| e.path == r.prefix)
        .ok_or_else(|| {
            Error::NotFound(format!("{path} is not in snapshot {}", r.snapshot.short_id))
        })?;
    if entry.kind != EntryKind::File {
        return Err(Error::Invalid(format!(
            "{path} is not a file\nhint: /restore restores folders"
        )));
    }
    let name = r.prefix.rsplit('/').next().unwrap_or(&r.prefix).to_string();
    if entry.size > BOT_UPLOAD_LIMIT && cfg.courier.is_none() {
        return Err(Error::Invalid(format!(
            "{name} is {}, over the Bot API's 50 MB; larger files are sent by the worker's Telegram account, which directory storage does not have\nhint: /restore it instead",
            human_bytes(entry.size)
        )));
    }
    let dir: PathBuf = cfg.outbox_dir.join(job.to_string());
    // A previous attempt's leftovers go first: the restore must not meet a stale file.
    clean(&dir);
    private_dir(&dir)?;
    let opts = RestoreOptions {
        path: path.to_string(),
        to: dir.clone(),
        snapshot: Some(r.snapshot.short_id.clone()),
        owner: owner.to_string(),
        overwrite: false,
        // The worker's own private folder; the copy is for sending, so it gets no recorded
        // owner (and no setuid/setgid bits).
        within: Some(vec![cfg.outbox_dir.clone()]),
        same_owner: Some(false),
    };
    let restored = repo.restore(&opts, progress, cancel).await;
    if let Err(e) = restored {
        clean(&dir);
        return Err(e);
    }
    let file = dir.join(&name);
    let sha256 = entry.sha256.map(hex::encode).unwrap_or_default();
    if entry.size <= BOT_UPLOAD_LIMIT {
        return Ok(JobResult::Get {
            name,
            size: entry.size,
            sha256,
            file: Some(file.display().to_string()),
            snapshot: r.snapshot.short_id,
        });
    }
    let courier = cfg.courier.as_ref().expect("checked above");
    let caption = format!("{path} (snapshot {})", r.snapshot.short_id);
    let sent = courier
        .send_to_saved_messages(&file, &name, &caption)
        .await
        .map_err(Error::from);
    clean(&dir);
    sent?;
    Ok(JobResult::Get {
        name,
        size: entry.size,
        sha256,
        file: None,
        snapshot: r.snapshot.short_id,
    })
}

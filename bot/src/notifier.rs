//! The part of the bot that watches the job table and talks without being asked: progress
//! edits, the final edit and a short new message when a job ends (an edit makes no sound; the
//! new message notifies), stall warnings, restore-conflict prompts.
//!
//! Everything it has told the user is recorded in the job table (`shown_at`,
//! `final_notified`, `stall_notified`), so a restarted bot neither repeats nor misses a
//! notice. Pacing is the outbox's job; the notifier only keeps each progress message to one
//! edit per `edit_interval`, and never has two deliveries for one job under way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::Digest;
use teloxide::ApiError;
use teloxide::RequestError;
use teloxide::prelude::*;
use teloxide::types::{InlineKeyboardMarkup, MessageId};
use tokio::time::Instant;

use storinator_shared::{Job, JobId, JobResult, JobState};

use crate::outbox::{Out, Persistence};
use crate::{App, Busy, render};

#[derive(Default)]
struct State {
    /// The text each job's progress message shows, as far as this process knows.
    shown: HashMap<JobId, String>,
    /// When each job's progress message may be edited again.
    next_edit: HashMap<JobId, Instant>,
}

#[derive(Clone)]
pub(crate) struct Notifier {
    app: Arc<App>,
    state: Arc<Mutex<State>>,
}

impl Notifier {
    pub(crate) fn new(app: Arc<App>) -> Self {
        Notifier {
            app,
            state: Arc::default(),
        }
    }

    pub(crate) async fn run(self) {
        let mut tick = tokio::time::interval(self.app.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.pass().await {
                tracing::warn!("notifier: {e:#}");
            }
        }
    }

    fn claim(&self, job: JobId) -> Option<Busy> {
        Busy::claim(&self.app, job)
    }

    /// The job as it is now: the list it came from may predate a delivery that just ended
    /// on another thread (which recorded the progress message or the notice).
    async fn fresh(&self, job: &Job) -> Option<Job> {
        match self.app.jobs.get(job.id).await {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(job = job.id, "re-reading a job: {e}");
                None
            }
        }
    }

    /// One look at the job table; deliveries run as tasks of their own, so one slow chat
    /// never holds up the others.
    pub(crate) async fn pass(&self) -> anyhow::Result<()> {
        let jobs = &self.app.jobs;
        for job in jobs.finished_unnotified().await? {
            if let Some(busy) = self.claim(job.id) {
                let me = self.clone();
                tokio::spawn(async move {
                    if let Some(job) = me.fresh(&job).await.filter(|j| !j.final_notified)
                        && let Err(e) = me.finished(&job).await
                    {
                        tracing::warn!(job = job.id, "final notice: {e:#}");
                    }
                    drop(busy);
                });
            }
        }
        let now = Instant::now();
        for job in jobs.needing_progress_edit().await? {
            let due = {
                let s = self.state.lock().unwrap();
                s.next_edit.get(&job.id).is_none_or(|t| *t <= now)
            };
            if !due {
                continue;
            }
            if let Some(busy) = self.claim(job.id) {
                let me = self.clone();
                tokio::spawn(async move {
                    let job = me
                        .fresh(&job)
                        .await
                        .filter(|j| !j.state.is_final() && j.updated_at > j.shown_at);
                    if let Some(job) = job
                        && let Err(e) = me.progress(&job).await
                    {
                        tracing::warn!(job = job.id, "progress edit: {e:#}");
                    }
                    drop(busy);
                });
            }
        }
        for job in jobs.stalled_unnotified().await? {
            if let Some(busy) = self.claim(job.id) {
                let me = self.clone();
                tokio::spawn(async move {
                    let Some(job) = me.fresh(&job).await.filter(|j| !j.stall_notified) else {
                        return;
                    };
                    let chat = ChatId(job.chat_id);
                    let sent = me
                        .app
                        .outbox
                        .send(
                            chat,
                            Out::Text {
                                text: render::stall_notice(&job),
                                markup: None,
                            },
                            Persistence::Normal,
                        )
                        .await;
                    match sent {
                        Ok(_) => {
                            if let Err(e) = me.app.jobs.mark_stall_notified(job.id).await {
                                tracing::warn!(job = job.id, "recording a stall notice: {e}");
                            }
                        }
                        Err(e) => tracing::warn!(job = job.id, "stall notice: {e}"),
                    }
                    drop(busy);
                });
            }
        }
        Ok(())
    }

    /// Shows `text` in the job's progress message: an edit, or a new message if there is
    /// none (or it is gone). `Ok(false)`: not now, try again later.
    async fn show(&self, job: &Job, text: &str, persistence: Persistence) -> anyhow::Result<bool> {
        let known = self.state.lock().unwrap().shown.get(&job.id).cloned();
        if known.as_deref() == Some(text) {
            return Ok(true);
        }
        let chat = ChatId(job.chat_id);
        let outbox = &self.app.outbox;
        let edited = match job.progress_message_id {
            Some(mid) => {
                let op = Out::Edit {
                    message: MessageId(mid),
                    text: crate::clip(text.to_string()),
                    markup: None,
                };
                match outbox.send(chat, op, persistence).await {
                    Ok(_) => true,
                    Err(RequestError::Api(
                        ApiError::MessageToEditNotFound | ApiError::MessageCantBeEdited,
                    )) => false,
                    Err(e) => return Err(e.into()),
                }
            }
            None => false,
        };
        if !edited {
            let op = Out::Text {
                text: crate::clip(text.to_string()),
                markup: None,
            };
            if let Some(m) = outbox.send(chat, op, persistence).await? {
                self.app.jobs.set_progress_message(job.id, m.id.0).await?;
            }
        }
        self.state
            .lock()
            .unwrap()
            .shown
            .insert(job.id, text.to_string());
        Ok(true)
    }

    async fn progress(&self, job: &Job) -> anyhow::Result<()> {
        self.state
            .lock()
            .unwrap()
            .next_edit
            .insert(job.id, Instant::now() + self.app.cfg.edit_interval);
        if self
            .show(job, &render::progress(job), Persistence::Normal)
            .await?
        {
            self.app.jobs.mark_shown(job.id, job.updated_at).await?;
        }
        Ok(())
    }

    /// Checks a file the worker left for `/get`: inside the outbox, a regular file (not a
    /// link), with the content the restore verified.
    fn outgoing_file(&self, file: &str, sha256: &str) -> Result<std::path::PathBuf, String> {
        let path = std::path::PathBuf::from(file);
        let outbox = &self.app.cfg.outbox_dir;
        if !path.starts_with(outbox) || path.components().any(|c| c.as_os_str() == "..") {
            return Err(format!("it is not in {}", outbox.display()));
        }
        let meta = std::fs::symlink_metadata(&path).map_err(|e| e.to_string())?;
        if !meta.file_type().is_file() {
            return Err("it is not a regular file".into());
        }
        let mut hasher = sha2::Sha256::new();
        let mut f = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hex::encode(hasher.finalize()) != sha256 {
            return Err("its SHA-256 differs from the backup's".into());
        }
        Ok(path)
    }

    /// Deletes a sent (or refused) file and the job's folder in the outbox.
    fn remove_outgoing(&self, file: &str) {
        let path = std::path::Path::new(file);
        let outbox = &self.app.cfg.outbox_dir;
        let Some(dir) = path
            .parent()
            .filter(|d| d.starts_with(outbox) && *d != outbox)
        else {
            return;
        };
        if let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }

    /// The final edit, then the short new message; a message Telegram refuses for good (the
    /// user blocked the bot, the chat is gone) is given up with a warning, anything else is
    /// retried until it is delivered.
    async fn finished(&self, job: &Job) -> anyhow::Result<()> {
        let chat = ChatId(job.chat_id);
        if let Err(e) = self
            .show(job, &render::final_text(job), Persistence::Final)
            .await
        {
            tracing::warn!(job = job.id, "the final edit was refused: {e:#}");
        }
        let text = render::final_notice(job);
        let markup: Option<InlineKeyboardMarkup> = match &job.result {
            Some(JobResult::Conflicts { count, .. }) if job.state == JobState::Failed => {
                Some(crate::conflict_keyboard(job.id, *count))
            }
            _ => None,
        };
        let op = match &job.result {
            Some(JobResult::Get {
                name,
                sha256,
                file: Some(file),
                ..
            }) if job.state == JobState::Done => match self.outgoing_file(file, sha256) {
                Ok(path) => Out::Document {
                    path,
                    name: name.clone(),
                    caption: text,
                },
                Err(why) => {
                    tracing::warn!(job = job.id, "not sending {file}: {why}");
                    Out::Text {
                        text: format!(
                            "❌ {}: the restored copy of {name} did not pass its check ({why}); nothing was sent.",
                            render::title(job)
                        ),
                        markup: None,
                    }
                }
            },
            _ => Out::Text { text, markup },
        };
        let sent = self.app.outbox.send(chat, op, Persistence::Final).await;
        if let Some(JobResult::Get { file: Some(f), .. }) = &job.result {
            self.remove_outgoing(f);
        }
        if let Err(e) = sent {
            tracing::warn!(job = job.id, "the final notice was refused: {e}");
        }
        self.app.jobs.mark_final_notified(job.id).await?;
        let mut s = self.state.lock().unwrap();
        s.shown.remove(&job.id);
        s.next_edit.remove(&job.id);
        Ok(())
    }
}

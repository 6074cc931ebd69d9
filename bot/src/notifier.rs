//! The part of the bot that watches the job table and talks without being asked: progress
//! edits, completion summaries, failure notices, stall warnings, restore-conflict prompts.
//!
//! Everything it has told the user is recorded in the job table (`shown_at`,
//! `final_notified`, `stall_notified`), so a restarted bot neither repeats nor misses a notice.
//! Telegram's limits are respected per chat: at most one edit per `edit_interval`, and after a
//! 429 nothing is sent to that chat until `retry_after` has passed.

use std::sync::Arc;

use teloxide::ApiError;
use teloxide::RequestError;
use teloxide::payloads::EditMessageTextSetters;
use teloxide::prelude::*;
use teloxide::types::{InlineKeyboardButton, InlineKeyboardMarkup, MessageId};

use storinator_shared::{Job, JobResult, JobState};

use crate::{App, render, send_text};

/// How an edit went.
enum Edit {
    /// The message shows the text (including "message is not modified").
    Done,
    /// Not now (paced, rate limited, or a transient error): try again on a later tick.
    Later,
    /// The message is gone or can't be edited: send a new one instead.
    Gone,
}

pub(crate) struct Notifier {
    bot: Bot,
    app: Arc<App>,
}

impl Notifier {
    pub(crate) fn new(bot: Bot, app: Arc<App>) -> Self {
        Notifier { bot, app }
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

    /// One look at the job table.
    pub(crate) async fn pass(&self) -> anyhow::Result<()> {
        let jobs = &self.app.jobs;
        for job in jobs.finished_unnotified().await? {
            self.finished(&job).await?;
        }
        for job in jobs.needing_progress_edit().await? {
            self.progress(&job).await?;
        }
        for job in jobs.stalled_unnotified().await? {
            if self.app.chat_blocked(job.chat_id) {
                continue;
            }
            match send_text(
                &self.bot,
                ChatId(job.chat_id),
                render::stall_notice(&job),
                None,
            )
            .await
            {
                Ok(_) => jobs.mark_stall_notified(job.id).await?,
                Err(e) => self.app.note_error(job.chat_id, &e),
            }
        }
        Ok(())
    }

    async fn edit(
        &self,
        chat_id: i64,
        message_id: i32,
        text: &str,
        markup: Option<InlineKeyboardMarkup>,
    ) -> Edit {
        if !self.app.may_edit(chat_id) {
            return Edit::Later;
        }
        let mut req = self.bot.edit_message_text(
            ChatId(chat_id),
            MessageId(message_id),
            crate::clip(text.to_string()),
        );
        if let Some(m) = markup {
            req = req.reply_markup(m);
        }
        let res = req.await;
        self.app.edited(chat_id);
        match res {
            Ok(_) | Err(RequestError::Api(ApiError::MessageNotModified)) => Edit::Done,
            Err(RequestError::Api(
                ApiError::MessageToEditNotFound | ApiError::MessageCantBeEdited,
            )) => Edit::Gone,
            Err(e) => {
                self.app.note_error(chat_id, &e);
                Edit::Later
            }
        }
    }

    /// Show `text` as the job's progress message: edit it, or send a new one if there is none
    /// (or it is gone). True when the user now sees the text.
    async fn show(&self, job: &Job, text: &str) -> anyhow::Result<bool> {
        if self.app.last_shown(job.id).as_deref() == Some(text) {
            return Ok(true);
        }
        let outcome = match job.progress_message_id {
            Some(mid) => self.edit(job.chat_id, mid, text, None).await,
            None => Edit::Gone,
        };
        match outcome {
            Edit::Done => {}
            Edit::Later => return Ok(false),
            Edit::Gone => {
                if self.app.chat_blocked(job.chat_id) {
                    return Ok(false);
                }
                match send_text(&self.bot, ChatId(job.chat_id), text.to_string(), None).await {
                    Ok(m) => self.app.jobs.set_progress_message(job.id, m.id.0).await?,
                    Err(e) => {
                        self.app.note_error(job.chat_id, &e);
                        return Ok(false);
                    }
                }
            }
        }
        self.app.set_last_shown(job.id, text.to_string());
        Ok(true)
    }

    async fn progress(&self, job: &Job) -> anyhow::Result<()> {
        if self.show(job, &render::progress(job)).await? {
            self.app.jobs.mark_shown(job.id, job.updated_at).await?;
        }
        Ok(())
    }

    async fn finished(&self, job: &Job) -> anyhow::Result<()> {
        if !self.show(job, &render::final_text(job)).await? {
            return Ok(());
        }
        // The progress message now shows the outcome; failures also get a message of their
        // own so the user is notified (an edit makes no sound).
        if job.state == JobState::Failed {
            if self.app.chat_blocked(job.chat_id) {
                return Ok(());
            }
            let (text, markup) = match &job.result {
                Some(JobResult::Conflicts { count, sample }) => (
                    render::conflict_prompt(job, *count, sample),
                    Some(InlineKeyboardMarkup::new(vec![vec![
                        InlineKeyboardButton::callback(
                            format!("Overwrite {count} files"),
                            format!("ow:{}", job.id),
                        ),
                        InlineKeyboardButton::callback("Keep existing", format!("keep:{}", job.id)),
                    ]])),
                ),
                _ => (render::failure_notice(job), None),
            };
            if let Err(e) = send_text(&self.bot, ChatId(job.chat_id), text, markup).await {
                self.app.note_error(job.chat_id, &e);
                return Ok(());
            }
        }
        self.app.jobs.mark_final_notified(job.id).await?;
        self.app.forget_shown(job.id);
        Ok(())
    }
}

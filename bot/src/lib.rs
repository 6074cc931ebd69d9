//! T-Storinator's chat front end: a teloxide bot that turns chat commands into rows of the job
//! table and shows the worker's progress back in the chat.
//!
//! `main.rs` is a thin wrapper over [`run`]; tests and the demo run the bot in-process against
//! the fake Bot API server (`TELOXIDE_API_URL` / [`BotConfig::api_url`]).

pub mod alerts;
pub mod args;
pub mod catalog;
pub mod config;
pub mod db;
mod notifier;
pub mod render;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use teloxide::RequestError;
use teloxide::dispatching::UpdateHandler;
use teloxide::error_handlers::LoggingErrorHandler;
use teloxide::payloads::{EditMessageTextSetters, SendMessageSetters};
use teloxide::prelude::*;
use teloxide::types::{InlineKeyboardMarkup, Me, MessageId};
use teloxide::update_listeners::Polling;
use teloxide::utils::command::{BotCommands, ParseError};
use tokio::time::Instant;

use storinator_shared::ops::alerts::{AlertPolicy, Alerts, ScrubStatus};
use storinator_shared::ops::schedules::{NewSchedule, ScheduleError, format_local};
use storinator_shared::{
    CancelOutcome, JobArgs, JobError, JobId, JobResult, JobState, Jobs, Schedules,
};

pub use catalog::{CatalogView, EntryLine, SnapshotLine, SqlCatalogView};
pub use config::{BotConfig, ConfigError};

// The bot's commands (also the menu set with `setMyCommands`). Not a doc comment: the derive
// would take it as the help text's heading.
#[derive(BotCommands, Clone, Debug, PartialEq, Eq)]
#[command(
    rename_rule = "lowercase",
    description = "T-Storinator keeps encrypted, deduplicated backups of your server's folders in Telegram."
)]
pub enum Command {
    #[command(description = "introduction")]
    Start,
    #[command(description = "this help")]
    Help,
    #[command(description = "back up a folder: /backup <path> [unencrypted]")]
    Backup(String),
    #[command(description = "restore: /restore <path> [to <dir>] [snapshot <id>]")]
    Restore(String),
    #[command(description = "list your snapshots: /snapshots [path]")]
    Snapshots(String),
    #[command(description = "list a backed-up folder: /ls <path> [snapshot <id>]")]
    Ls(String),
    #[command(description = "what is running now")]
    Status,
    #[command(description = "your recent jobs")]
    Jobs,
    #[command(description = "stop a job: /cancel <job id>")]
    Cancel(String),
    #[command(description = "check that every stored pack is present and intact")]
    Verify(String),
    #[command(
        description = "back up on a schedule: /schedule <path> <when> [keep daily 7 weekly 4] — when: hourly, daily [HH:MM], weekly <day> [HH:MM], every <N>h, \"<cron>\""
    )]
    Schedule(String),
    #[command(description = "your schedules: next run, last result, last snapshot")]
    Schedules,
    #[command(description = "remove a schedule: /unschedule <id>")]
    Unschedule(String),
    #[command(description = "pause a schedule: /pause <id>")]
    Pause(String),
    #[command(description = "resume a schedule: /resume <id>")]
    Resume(String),
    #[command(description = "the weekly digest: /digest (show it now), /digest off, /digest on")]
    Digest(String),
    #[command(description = "the scrub: when each pack was last read back (/scrub now runs one)")]
    Scrub(String),
}

/// Per-chat pacing of Telegram calls.
#[derive(Default, Clone, Copy)]
struct Pace {
    next_edit: Option<Instant>,
    blocked_until: Option<Instant>,
}

/// State shared by the handlers and the notifier.
pub(crate) struct App {
    pub(crate) cfg: BotConfig,
    pub(crate) jobs: Jobs,
    pub(crate) alerts: Alerts,
    catalog: Arc<dyn CatalogView>,
    pace: Mutex<HashMap<i64, Pace>>,
    shown: Mutex<HashMap<JobId, String>>,
    /// Conflict prompts already answered (guards against a double tap enqueuing twice).
    answered: Mutex<HashSet<JobId>>,
}

impl App {
    fn chat_blocked(&self, chat_id: i64) -> bool {
        let pace = self.pace.lock().unwrap();
        pace.get(&chat_id)
            .and_then(|p| p.blocked_until)
            .is_some_and(|t| Instant::now() < t)
    }

    fn may_edit(&self, chat_id: i64) -> bool {
        let pace = self.pace.lock().unwrap();
        let p = pace.get(&chat_id).copied().unwrap_or_default();
        let now = Instant::now();
        p.blocked_until.is_none_or(|t| now >= t) && p.next_edit.is_none_or(|t| now >= t)
    }

    fn edited(&self, chat_id: i64) {
        let mut pace = self.pace.lock().unwrap();
        pace.entry(chat_id).or_default().next_edit = Some(Instant::now() + self.cfg.edit_interval);
    }

    /// Remember a failed call: a 429 blocks the chat for `retry_after`, anything else for a
    /// short while so a persistent error doesn't turn into a hot loop.
    fn note_error(&self, chat_id: i64, e: &RequestError) {
        let wait = match e {
            RequestError::RetryAfter(s) => s.duration(),
            _ => Duration::from_secs(2),
        };
        tracing::warn!(
            chat_id,
            "telegram call failed: {e}; pausing this chat for {wait:?}"
        );
        let mut pace = self.pace.lock().unwrap();
        pace.entry(chat_id).or_default().blocked_until = Some(Instant::now() + wait);
    }

    fn last_shown(&self, job: JobId) -> Option<String> {
        self.shown.lock().unwrap().get(&job).cloned()
    }

    fn set_last_shown(&self, job: JobId, text: String) {
        self.shown.lock().unwrap().insert(job, text);
    }

    fn forget_shown(&self, job: JobId) {
        self.shown.lock().unwrap().remove(&job);
    }
}

/// Send a message, waiting out up to two 429s.
pub(crate) async fn send_text(
    bot: &Bot,
    chat: ChatId,
    text: String,
    markup: Option<InlineKeyboardMarkup>,
) -> Result<Message, RequestError> {
    let text = clip(text);
    let mut tries = 0;
    loop {
        let mut req = bot.send_message(chat, text.clone());
        if let Some(m) = &markup {
            req = req.reply_markup(m.clone());
        }
        match req.await {
            Err(RequestError::RetryAfter(s)) if tries < 2 => {
                tries += 1;
                tokio::time::sleep(s.duration()).await;
            }
            other => return other,
        }
    }
}

/// Telegram refuses texts over 4096 characters; long listings are cut with a note.
pub(crate) fn clip(text: String) -> String {
    const LIMIT: usize = 4000;
    if text.chars().count() <= LIMIT {
        return text;
    }
    let mut out: String = text.chars().take(LIMIT).collect();
    if let Some(nl) = out.rfind('\n') {
        out.truncate(nl);
    }
    out.push_str("\n… (cut: too long for one message)");
    out
}

fn owner(user_id: u64) -> String {
    format!("tg:{user_id}")
}

fn help_text() -> String {
    format!(
        "{}\n\nPaths may contain spaces; put a path in double quotes if it contains the words \" to \" or \" snapshot \". Job ids are shown in every progress message.",
        Command::descriptions()
    )
}

type HandlerResult = anyhow::Result<()>;

/// The dptree handler tree: messages and callback queries, each checked for authorization
/// before anything else.
fn handler() -> UpdateHandler<anyhow::Error> {
    dptree::entry()
        .branch(Update::filter_message().endpoint(on_message))
        .branch(Update::filter_callback_query().endpoint(on_callback))
}

async fn on_message(bot: Bot, msg: Message, me: Me, app: Arc<App>) -> HandlerResult {
    let chat = msg.chat.id;
    let Some(user) = msg.from.as_ref() else {
        return Ok(());
    };
    let user_id = user.id.0;
    if !app.cfg.is_allowed(user_id) {
        tracing::warn!(
            user_id,
            chat_id = chat.0,
            "refused a message from an unauthorized user"
        );
        send_text(
            &bot,
            chat,
            format!("⛔ Sorry, you are not allowed to use this bot. (Your Telegram user id is {user_id}; the bot's owner can add it to STORINATOR_ALLOWED_USERS.)"),
            None,
        )
        .await?;
        return Ok(());
    }
    let Some(text) = msg.text() else {
        send_text(
            &bot,
            chat,
            format!("I only understand commands.\n\n{}", help_text()),
            None,
        )
        .await?;
        return Ok(());
    };
    if !text.starts_with('/') {
        send_text(
            &bot,
            chat,
            format!("I only understand commands.\n\n{}", help_text()),
            None,
        )
        .await?;
        return Ok(());
    }
    let reply = match Command::parse(text, me.username()) {
        Ok(cmd) => command(&bot, &app, user_id, chat, cmd).await?,
        Err(ParseError::UnknownCommand(c)) => {
            Some(format!("Unknown command {c}.\n\n{}", help_text()))
        }
        Err(ParseError::WrongBotName(_)) => None,
        Err(e) if text.starts_with('/') => Some(format!(
            "I couldn't read that command ({e}).\n\n{}",
            help_text()
        )),
        Err(_) => Some(format!("I only understand commands.\n\n{}", help_text())),
    };
    if let Some(reply) = reply {
        send_text(&bot, chat, reply, None).await?;
    }
    Ok(())
}

/// Run a command. Returns the text to answer with, if the command did not answer itself.
async fn command(
    bot: &Bot,
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    cmd: Command,
) -> anyhow::Result<Option<String>> {
    let uid = user_id as i64;
    Ok(Some(match cmd {
        Command::Start => format!(
            "👋 Hi! I back up folders of this server into Telegram, encrypted and deduplicated.\nTry /backup {}\n\n{}",
            app.cfg.backup_roots[0].display(),
            help_text()
        ),
        Command::Help => help_text(),
        Command::Backup(raw) => {
            let a = match args::parse_backup(&raw) {
                Ok(a) => a,
                Err(e) => return Ok(Some(e)),
            };
            let path = match args::check_backup_path(&a.path, &app.cfg.backup_roots) {
                Ok(p) => p,
                Err(e) => {
                    tracing::info!(user_id, path = a.path, "backup refused: {e}");
                    return Ok(Some(format!("🚫 Can't back up: {e}")));
                }
            };
            let path = path
                .to_str()
                .context("backup path is not UTF-8")?
                .to_string();
            start_job(
                bot,
                app,
                uid,
                chat,
                JobArgs::Backup {
                    path,
                    encrypt: a.encrypt,
                },
            )
            .await?;
            return Ok(None);
        }
        Command::Restore(raw) => {
            let a = match args::parse_restore(&raw) {
                Ok(a) => a,
                Err(e) => return Ok(Some(e)),
            };
            let path = match args::normalize_restore_path(&a.path) {
                Ok(p) => p,
                Err(e) => {
                    return Ok(Some(format!(
                        "🚫 {e}. Usage: /restore <path> [to <dir>] [snapshot <id>]"
                    )));
                }
            };
            let to = match &a.to {
                // In place: the folder it came from must be one restores may write into.
                None => {
                    let parent = std::path::Path::new(&path)
                        .parent()
                        .and_then(|p| p.to_str())
                        .unwrap_or("/");
                    if let Err(e) = args::check_restore_target(parent, &app.cfg.restore_roots) {
                        return Ok(Some(format!(
                            "🚫 Can't restore {path} in place: {e}. Add `to <dir>`."
                        )));
                    }
                    None
                }
                Some(dir) => match args::check_restore_target(dir, &app.cfg.restore_roots) {
                    Ok(p) => Some(
                        p.to_str()
                            .context("restore target is not UTF-8")?
                            .to_string(),
                    ),
                    Err(e) => return Ok(Some(format!("🚫 Can't restore there: {e}"))),
                },
            };
            // Users restore only their own backups: the path must lie in one of their roots.
            // (The worker also restores only from the requesting owner's snapshots.)
            match app.catalog.snapshots(&owner(user_id), Some(&path)).await {
                Ok(snaps) => {
                    let covered = snaps
                        .iter()
                        .any(|s| path == s.root || path.starts_with(&format!("{}/", s.root)));
                    if !covered {
                        return Ok(Some(format!(
                            "🚫 You have no backup containing {path}. /snapshots lists yours."
                        )));
                    }
                }
                Err(e) => tracing::warn!("catalog lookup for restore failed: {e:#}"),
            }
            let args = JobArgs::Restore {
                path,
                to,
                snapshot: a.snapshot,
                overwrite: false,
            };
            start_job(bot, app, uid, chat, args).await?;
            return Ok(None);
        }
        Command::Verify(raw) => {
            // Verification covers every pack in storage; a path would suggest otherwise.
            if !raw.trim().is_empty() {
                return Ok(Some(
                    "Usage: /verify (no arguments): it checks every stored pack, for all backups."
                        .into(),
                ));
            }
            start_job(bot, app, uid, chat, JobArgs::Verify { path: None }).await?;
            // The continuous check's state, while the full one runs.
            let status = ScrubStatus::load(
                &storinator_shared::Catalog::from_pool(app.jobs.pool().clone()),
                app.cfg.scrub_bytes_per_day,
            )
            .await?;
            let lines = status.lines(app.alerts.tz(), 0);
            format!("🧽 Scrub: {}\n{}", lines[1], lines[0])
        }
        Command::Schedule(raw) => schedule(app, user_id, chat, &raw).await?,
        Command::Schedules => {
            let list = app.alerts.statuses(&owner(user_id)).await?;
            if list.is_empty() {
                "You have no schedules. /schedule <path> daily 03:00 adds one.".into()
            } else {
                let tz = app.alerts.tz();
                let mut lines = vec![format!("🗓 Your schedules ({}):", list.len())];
                lines.extend(list.iter().map(|st| alerts::schedule_line(st, tz)));
                lines.join("\n")
            }
        }
        Command::Unschedule(raw) => {
            schedule_change(app, user_id, &raw, "unschedule", |s, id, o| {
                Box::pin(async move { s.remove(id, &o).await })
            })
            .await?
        }
        Command::Pause(raw) => {
            schedule_change(app, user_id, &raw, "pause", |s, id, o| {
                Box::pin(async move { s.set_paused(id, &o, true).await })
            })
            .await?
        }
        Command::Resume(raw) => {
            schedule_change(app, user_id, &raw, "resume", |s, id, o| {
                Box::pin(async move { s.set_paused(id, &o, false).await })
            })
            .await?
        }
        Command::Digest(raw) => match raw.trim() {
            "off" => {
                app.alerts
                    .set_digest(&owner(user_id), chat.0, false)
                    .await?;
                "📰 Weekly digest off. /digest on brings it back.".into()
            }
            "on" => {
                app.alerts.set_digest(&owner(user_id), chat.0, true).await?;
                "📰 Weekly digest on: every Monday at 09:00.".into()
            }
            "" => {
                let o = owner(user_id);
                let now = app.jobs.now_ms();
                let d = app
                    .alerts
                    .digest(&o, chat.0, now, now - 7 * 86_400_000)
                    .await?;
                let on = app.alerts.digest_on(&o).await?;
                format!(
                    "{}\n({})",
                    alerts::digest_text(&d, app.alerts.tz()),
                    if on {
                        "sent every Monday at 09:00"
                    } else {
                        "the weekly digest is off"
                    }
                )
            }
            other => format!("Usage: /digest, /digest off or /digest on (not {other:?})."),
        },
        Command::Scrub(raw) => match raw.trim() {
            "now" => {
                start_job(bot, app, uid, chat, JobArgs::Scrub { bytes: None }).await?;
                return Ok(None);
            }
            "" => {
                let status = ScrubStatus::load(
                    &storinator_shared::Catalog::from_pool(app.jobs.pool().clone()),
                    app.cfg.scrub_bytes_per_day,
                )
                .await?;
                let mut lines = vec!["🧽 Scrub (packs are read back in rotation):".to_string()];
                lines.extend(status.lines(app.alerts.tz(), 30));
                if let Some(r) = &status.last
                    && !r.affected.is_empty()
                {
                    let mine: Vec<_> = r
                        .affected
                        .iter()
                        .filter(|f| f.owner == owner(user_id))
                        .collect();
                    if !mine.is_empty() {
                        lines.push("Your files the last scrub found damaged:".into());
                        lines.extend(mine.iter().take(20).map(|f| {
                            format!(
                                "• {} ({})",
                                f.disk_path(),
                                if f.healed { "healed" } else { "not healed" }
                            )
                        }));
                    }
                }
                lines.join("\n")
            }
            other => format!("Usage: /scrub or /scrub now (not {other:?})."),
        },
        Command::Snapshots(raw) => {
            let path = Some(raw.trim().trim_end_matches('/')).filter(|p| !p.is_empty());
            let snaps = app.catalog.snapshots(&owner(user_id), path).await?;
            if snaps.is_empty() {
                match path {
                    Some(p) => format!("No snapshots of {p} yet. /backup {p} makes one."),
                    None => "No snapshots yet. /backup <path> makes one.".into(),
                }
            } else {
                let mut lines = vec![format!("📚 {} snapshots:", snaps.len())];
                for s in snaps {
                    lines.push(format!(
                        "• {} · {} · {} files, {}{}",
                        s.short_id,
                        s.root,
                        s.files,
                        render::bytes(s.bytes),
                        if s.encrypted { "" } else { " · unencrypted" }
                    ));
                }
                lines.join("\n")
            }
        }
        Command::Ls(raw) => {
            let (path, snapshot) = match args::parse_restore(&raw) {
                Ok(a) if a.to.is_none() => (a.path, a.snapshot),
                _ => return Ok(Some("Usage: /ls <path> [snapshot <id>]".into())),
            };
            match app
                .catalog
                .ls(&owner(user_id), &path, snapshot.as_deref())
                .await?
            {
                None => format!("You have no backup containing {path}. /snapshots lists yours."),
                Some(entries) if entries.is_empty() => {
                    format!("{path} is empty (or not a folder) in that snapshot.")
                }
                Some(entries) => {
                    let mut lines = vec![format!("📂 {path}:")];
                    for e in entries.iter().take(100) {
                        lines.push(match e.kind.as_str() {
                            "dir" => format!("📁 {}/", e.name),
                            "symlink" => format!("🔗 {}", e.name),
                            _ => format!("📄 {} · {}", e.name, render::bytes(e.size)),
                        });
                    }
                    if entries.len() > 100 {
                        lines.push(format!("… and {} more", entries.len() - 100));
                    }
                    lines.join("\n")
                }
            }
        }
        Command::Status => {
            let active = app.jobs.active_for_user(uid).await?;
            if active.is_empty() {
                "Nothing is running. /jobs lists your recent jobs.".into()
            } else {
                let now = app.jobs.now_ms();
                let mut lines = vec![format!("{} active jobs:", active.len())];
                lines.extend(
                    active
                        .iter()
                        .map(|j| format!("• {}", render::job_line(j, now))),
                );
                lines.join("\n")
            }
        }
        Command::Jobs => {
            let jobs = app.jobs.list_for_user(uid, 10).await?;
            if jobs.is_empty() {
                "You have no jobs yet. /backup <path> starts one.".into()
            } else {
                let now = app.jobs.now_ms();
                let mut lines = vec!["Your recent jobs:".to_string()];
                lines.extend(
                    jobs.iter()
                        .map(|j| format!("• {}", render::job_line(j, now))),
                );
                lines.join("\n")
            }
        }
        Command::Cancel(raw) => {
            let id = match args::parse_job_id(&raw) {
                Ok(id) => id,
                Err(e) => return Ok(Some(e)),
            };
            match app.jobs.request_cancel(id, uid).await {
                Ok(CancelOutcome::Cancelled) => {
                    format!("🛑 Job #{id} cancelled before it started.")
                }
                Ok(CancelOutcome::Requested) => {
                    format!("🛑 Cancelling job #{id}: it stops at the next safe point.")
                }
                Ok(CancelOutcome::AlreadyFinished(state)) => {
                    format!("Job #{id} already finished ({state}).")
                }
                // Someone else's job is reported exactly like a missing one.
                Err(JobError::NotFound(_)) => format!("You have no job #{id}. /jobs lists yours."),
                Err(e) => return Err(e.into()),
            }
        }
    }))
}

/// `/schedule <path> <when> [keep ...] [unencrypted]`.
async fn schedule(app: &Arc<App>, user_id: u64, chat: ChatId, raw: &str) -> anyhow::Result<String> {
    let req = match storinator_shared::ops::schedules::parse_schedule_request(raw) {
        Ok(r) => r,
        Err(e) => return Ok(format!("🗓 {e}")),
    };
    let path = match args::check_backup_path(&req.path, &app.cfg.backup_roots) {
        Ok(p) => p,
        Err(e) => return Ok(format!("🚫 Can't schedule: {e}")),
    };
    let path = path
        .to_str()
        .context("backup path is not UTF-8")?
        .to_string();
    let s = app
        .alerts
        .schedules()
        .create(&NewSchedule {
            owner: owner(user_id),
            user_id: user_id as i64,
            chat_id: chat.0,
            path,
            when: req.when,
            encrypt: req.encrypt,
            retention: req.retention,
        })
        .await?;
    let tz = app.alerts.tz();
    let mut text = format!(
        "🗓 Schedule #{}: {} · {}{} ({}).\nFirst run: {}.",
        s.id,
        s.path,
        s.spec,
        if s.encrypt { "" } else { " · unencrypted" },
        tz.iana_name().unwrap_or("UTC"),
        format_local(s.next_slot, tz)
    );
    if let Some(r) = &s.retention {
        text.push_str(&format!("\nRetention policy stored: {r}."));
    }
    text.push_str("\nI'll tell you if a backup is missed or fails. /schedules lists yours.");
    Ok(text)
}

/// `/unschedule`, `/pause`, `/resume`: one schedule of the user's, by id.
async fn schedule_change<F>(
    app: &Arc<App>,
    user_id: u64,
    raw: &str,
    verb: &str,
    change: F,
) -> anyhow::Result<String>
where
    F: FnOnce(
        Schedules,
        i64,
        String,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<storinator_shared::Schedule, ScheduleError>> + Send>,
    >,
{
    let id = match raw.trim().trim_start_matches('#').parse::<i64>() {
        Ok(id) if id > 0 => id,
        _ => {
            return Ok(format!(
                "{:?} is not a schedule id. Usage: /{verb} <id> (see /schedules)",
                raw.trim()
            ));
        }
    };
    let tz = app.alerts.tz().clone();
    match change(app.alerts.schedules().clone(), id, owner(user_id)).await {
        Ok(s) => Ok(match verb {
            "unschedule" => format!("🗑 Schedule #{} removed ({} · {}).", s.id, s.path, s.spec),
            "pause" => format!(
                "⏸ Schedule #{} paused ({} · {}). /resume {} starts it again.",
                s.id, s.path, s.spec, s.id
            ),
            _ => format!(
                "▶️ Schedule #{} resumed ({} · {}). Next run: {}.",
                s.id,
                s.path,
                s.spec,
                format_local(s.next_slot, &tz)
            ),
        }),
        // Someone else's schedule is reported exactly like a missing one.
        Err(ScheduleError::NotFound(_)) => Ok(format!(
            "You have no schedule #{id}. /schedules lists yours."
        )),
        Err(e) => Err(e.into()),
    }
}

/// Queue a job and post its progress message.
async fn start_job(
    bot: &Bot,
    app: &Arc<App>,
    user_id: i64,
    chat: ChatId,
    args: JobArgs,
) -> anyhow::Result<()> {
    let job = app.jobs.enqueue(user_id, chat.0, &args).await?;
    tracing::info!(job = job.id, user_id, kind = args.kind(), "job queued");
    let text = render::progress(&job);
    let msg = send_text(bot, chat, text.clone(), None).await?;
    app.jobs.set_progress_message(job.id, msg.id.0).await?;
    app.jobs.mark_shown(job.id, job.updated_at).await?;
    app.set_last_shown(job.id, text);
    Ok(())
}

async fn on_callback(bot: Bot, q: CallbackQuery, app: Arc<App>) -> HandlerResult {
    let user_id = q.from.id.0;
    if !app.cfg.is_allowed(user_id) {
        tracing::warn!(user_id, "refused a button press from an unauthorized user");
        bot.answer_callback_query(q.id.clone())
            .text("You are not allowed to use this bot.")
            .await?;
        return Ok(());
    }
    let data = q.data.clone().unwrap_or_default();
    let (action, id) = match data.split_once(':').map(|(a, i)| (a, i.parse::<JobId>())) {
        Some((a @ ("ow" | "keep"), Ok(id))) => (a.to_string(), id),
        _ => {
            bot.answer_callback_query(q.id.clone())
                .text("Unknown button.")
                .await?;
            return Ok(());
        }
    };
    let job = app.jobs.get_for_user(id, user_id as i64).await?;
    let conflicted = job.filter(|j| {
        j.state == JobState::Failed
            && matches!(j.result, Some(JobResult::Conflicts { .. }))
            && matches!(j.args, JobArgs::Restore { .. })
    });
    let Some(job) = conflicted else {
        bot.answer_callback_query(q.id.clone())
            .text("That restore is not waiting for an answer.")
            .await?;
        return Ok(());
    };
    if !app.answered.lock().unwrap().insert(job.id) {
        bot.answer_callback_query(q.id.clone())
            .text("Already answered.")
            .await?;
        return Ok(());
    }
    let count = match job.result {
        Some(JobResult::Conflicts { count, .. }) => count,
        _ => 0,
    };
    let prompt = q.regular_message().map(|m| (m.chat.id, m.id));
    let answer = if action == "ow" {
        let JobArgs::Restore {
            path, to, snapshot, ..
        } = job.args.clone()
        else {
            unreachable!("checked above")
        };
        let args = JobArgs::Restore {
            path,
            to,
            snapshot,
            overwrite: true,
        };
        bot.answer_callback_query(q.id.clone())
            .text("Overwriting.")
            .await?;
        let chat = ChatId(job.chat_id);
        let new = app.jobs.enqueue(job.user_id, job.chat_id, &args).await?;
        if let Some((c, m)) = prompt {
            edit_quietly(
                &bot,
                c,
                m,
                format!(
                    "✋ {}: overwriting {count} files — restore #{} queued.",
                    render::title(&job),
                    new.id
                ),
            )
            .await;
        }
        let text = render::progress(&new);
        let msg = send_text(&bot, chat, text.clone(), None).await?;
        app.jobs.set_progress_message(new.id, msg.id.0).await?;
        app.jobs.mark_shown(new.id, new.updated_at).await?;
        app.set_last_shown(new.id, text);
        return Ok(());
    } else {
        format!(
            "✋ {}: kept the existing files; nothing was overwritten.",
            render::title(&job)
        )
    };
    bot.answer_callback_query(q.id.clone())
        .text("Kept.")
        .await?;
    if let Some((c, m)) = prompt {
        edit_quietly(&bot, c, m, answer).await;
    }
    Ok(())
}

/// Replace a prompt's text (dropping its buttons); failures only cost a stale prompt.
async fn edit_quietly(bot: &Bot, chat: ChatId, message: MessageId, text: String) {
    let res = bot
        .edit_message_text(chat, message, text)
        .reply_markup(InlineKeyboardMarkup::new(Vec::<Vec<_>>::new()))
        .await;
    if let Err(e) = res {
        tracing::warn!("editing a prompt failed: {e}");
    }
}

/// Run the bot until `shutdown` completes: opens the database named by the config, sets the
/// command menu, then polls for updates and watches the job table.
pub async fn run(
    config: BotConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let pool = db::open(&config.database_url).await?;
    let catalog = Arc::new(SqlCatalogView::new(pool.clone()));
    run_with(config, Jobs::new(pool), catalog, shutdown).await
}

/// [`run`] with the job table and catalog view supplied (tests inject a clock or a stub).
pub async fn run_with(
    config: BotConfig,
    jobs: Jobs,
    catalog: Arc<dyn CatalogView>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let mut bot = Bot::new(config.token.clone());
    if let Some(url) = &config.api_url {
        bot = bot.set_api_url(url.clone());
    }
    bot.set_my_commands(Command::bot_commands())
        .await
        .context("setting the command menu (setMyCommands)")?;

    let alerts = Alerts::new(
        Schedules::new(jobs.clone(), config.timezone.clone()),
        AlertPolicy::default(),
    );
    let app = Arc::new(App {
        cfg: config.clone(),
        jobs,
        alerts,
        catalog,
        pace: Mutex::default(),
        shown: Mutex::default(),
        answered: Mutex::default(),
    });
    let notifier = tokio::spawn(notifier::Notifier::new(bot.clone(), app.clone()).run());
    let alert_sender = tokio::spawn(alerts::AlertSender::new(bot.clone(), app.clone()).run());

    let mut dispatcher = Dispatcher::builder(bot.clone(), handler())
        .dependencies(dptree::deps![app.clone()])
        .default_handler(|_| async {})
        .error_handler(LoggingErrorHandler::with_custom_text(
            "error while handling an update",
        ))
        .build();
    let token = dispatcher.shutdown_token();
    let listener = Polling::builder(bot.clone())
        .timeout(config.poll_timeout)
        .delete_webhook()
        .await
        .build();
    tracing::info!("bot started");
    let dispatch = dispatcher.try_dispatch_with_listener(
        listener,
        LoggingErrorHandler::with_custom_text("error from the update listener"),
    );
    tokio::pin!(dispatch);
    tokio::pin!(shutdown);

    let result = tokio::select! {
        r = &mut dispatch => r,
        _ = &mut shutdown => {
            tracing::info!("shutting down: finishing the updates in flight");
            // The token refuses while the dispatcher is still starting; keep asking.
            loop {
                if token.shutdown().is_ok() {
                    break dispatch.await;
                }
                tokio::select! {
                    r = &mut dispatch => break r,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    };
    notifier.abort();
    alert_sender.abort();
    result.context("talking to the Bot API")?;
    tracing::info!("bot stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_clipped_at_a_line_break() {
        let long: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let clipped = clip(long);
        assert!(clipped.chars().count() <= 4096);
        assert!(clipped.ends_with("(cut: too long for one message)"));
        assert_eq!(clip("short".into()), "short");
    }

    #[test]
    fn the_command_menu_lists_every_command() {
        let names: Vec<_> = Command::bot_commands()
            .into_iter()
            .map(|c| c.command)
            .collect();
        assert_eq!(names.len(), 17);
        assert!(
            names
                .iter()
                .all(|n| n.starts_with('/') || n.chars().all(|c| c.is_ascii_lowercase()))
        );
    }
}

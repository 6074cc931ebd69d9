//! T-Storinator's chat front end: a teloxide bot that turns chat commands into rows of the job
//! table and shows the worker's progress back in the chat.
//!
//! `main.rs` is a thin wrapper over [`run`]; tests and the demo run the bot in-process against
//! the fake Bot API server (`TELOXIDE_API_URL` / [`BotConfig::api_url`]).

pub mod alerts;
pub mod args;
mod browse;
pub mod config;
pub mod db;
mod forget;
mod hosts;
mod notifier;
pub mod outbox;
mod prune;
pub mod render;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use teloxide::dispatching::UpdateHandler;
use teloxide::error_handlers::LoggingErrorHandler;
use teloxide::prelude::*;
use teloxide::types::{InlineKeyboardButton, InlineKeyboardMarkup, Me, MessageId};
use teloxide::update_listeners::Polling;
use teloxide::utils::command::{BotCommands, ParseError};
use tokio::time::Instant;

pub use config::{BotConfig, ConfigError};
pub use outbox::{Limits, Outbox};
use storinator_shared::Schedules;
use storinator_shared::ops::alerts::{AlertPolicy, Alerts, ScrubStatus};
use storinator_shared::ops::schedules::{NewSchedule, ScheduleError, format_local};
use storinator_shared::{
    Answer, AnswerOutcome, CancelOutcome, Catalog, Error as EngineError, JobArgs, JobError, JobId,
    Jobs, list_snapshots, plural,
};

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
    #[command(
        description = "back up a folder: /backup [host:]<path> [unencrypted] (host: when two servers have that folder)"
    )]
    Backup(String),
    #[command(description = "restore: /restore [host:]<path> [to <dir>] [snapshot <id>]")]
    Restore(String),
    #[command(description = "list your snapshots: /snapshots [path]")]
    Snapshots(String),
    #[command(description = "list a backed-up folder: /ls <path> [snapshot <id>]")]
    Ls(String),
    #[command(description = "look around a snapshot with buttons: /browse [path] [snapshot <id>]")]
    Browse(String),
    #[command(description = "send me one file: /get <path> [snapshot <id>]")]
    Get(String),
    #[command(description = "every version of a file: /versions <path>")]
    Versions(String),
    #[command(description = "what is running now")]
    Status,
    #[command(description = "the storage hosts: the folders each serves, when it was last seen")]
    Hosts,
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
    #[command(description = "what your backups store, and what a prune would free")]
    Usage,
    #[command(
        description = "forget old snapshots by a policy, after you confirm: /forget <path> keep daily 7 weekly 4 monthly 12"
    )]
    Forget(String),
    #[command(
        description = "free the storage no snapshot uses (all users' packs; admins only), after you confirm: /prune [repack-below 50] [max-repack 200MB]"
    )]
    Prune(String),
}

/// State shared by the handlers and the notifier.
pub(crate) struct App {
    pub(crate) cfg: BotConfig,
    pub(crate) jobs: Jobs,
    pub(crate) catalog: Catalog,
    pub(crate) outbox: Outbox,
    /// When each stranger was last answered (they get one refusal per `stranger_interval`).
    strangers: Mutex<HashMap<u64, Instant>>,
    /// Jobs whose messages someone is sending right now (a handler posting the progress
    /// message, the notifier delivering an update): one at a time per job.
    busy: Mutex<HashSet<JobId>>,
    pub(crate) alerts: Alerts,
}

impl App {
    /// Whether a stranger should be answered now (and remember that they were).
    fn answer_stranger(&self, user_id: u64) -> bool {
        let now = Instant::now();
        let interval = self.cfg.stranger_interval;
        let mut seen = self.strangers.lock().unwrap();
        // Forget old entries so the map can't grow without bound.
        if seen.len() > 10_000 {
            seen.retain(|_, t| now.duration_since(*t) < interval);
        }
        match seen.get(&user_id) {
            Some(t) if now.duration_since(*t) < interval => false,
            _ => {
                seen.insert(user_id, now);
                true
            }
        }
    }
}

/// The two buttons under a restore-conflict prompt.
pub(crate) fn conflict_keyboard(job: JobId, count: u64) -> InlineKeyboardMarkup {
    InlineKeyboardMarkup::new(vec![vec![
        InlineKeyboardButton::callback(
            format!("Overwrite {}", render::plural(count, "file", "files")),
            format!("ow:{job}"),
        ),
        InlineKeyboardButton::callback("Keep existing", format!("keep:{job}")),
    ]])
}

/// The right to send a job's messages, held until dropped.
pub(crate) struct Busy(Arc<App>, JobId);

impl Busy {
    /// `None` when someone else is sending this job's messages.
    pub(crate) fn claim(app: &Arc<App>, job: JobId) -> Option<Busy> {
        app.busy
            .lock()
            .unwrap()
            .insert(job)
            .then(|| Busy(app.clone(), job))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.lock().unwrap().remove(&self.1);
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

pub(crate) fn owner(user_id: u64) -> String {
    format!("tg:{user_id}")
}

fn help_text() -> String {
    format!(
        "{}\n\nPaths may contain spaces; put a path in double quotes if it contains the words \" to \" or \" snapshot \". When two servers have the same folder, name one: /backup web1:/srv/data (/hosts lists them). Job ids are shown in every progress message.",
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

/// Answers a stranger, at most once per `stranger_interval`, so that nobody outside can
/// spend the bot's message budget.
async fn refuse_stranger(app: &App, chat: ChatId, user_id: u64) -> HandlerResult {
    if !app.answer_stranger(user_id) {
        return Ok(());
    }
    tracing::warn!(
        user_id,
        chat_id = chat.0,
        "refused a message from an unauthorized user (further ones are ignored for {:?})",
        app.cfg.stranger_interval
    );
    app.outbox
        .text(
            chat,
            format!("⛔ Sorry, you are not allowed to use this bot. (Your Telegram user id is {user_id}; the bot's owner can add it to STORINATOR_ALLOWED_USERS.)"),
            None,
        )
        .await?;
    Ok(())
}

async fn on_message(msg: Message, me: Me, app: Arc<App>) -> HandlerResult {
    let chat = msg.chat.id;
    let Some(user) = msg.from.as_ref() else {
        return Ok(());
    };
    let user_id = user.id.0;
    if !app.cfg.is_allowed(user_id) {
        return refuse_stranger(&app, chat, user_id).await;
    }
    let text = msg.text().unwrap_or("");
    let reply = if !text.starts_with('/') {
        Some(render::STRAY_TEXT.to_string())
    } else {
        match Command::parse(text, me.username()) {
            Ok(cmd) => command(&app, user_id, chat, cmd).await?,
            Err(ParseError::UnknownCommand(c)) => Some(render::unknown_command(&c)),
            Err(ParseError::WrongBotName(_)) => None,
            Err(e) => Some(format!(
                "I couldn't read that command ({e}). /help shows how."
            )),
        }
    };
    if let Some(reply) = reply {
        app.outbox.text(chat, reply, None).await?;
    }
    Ok(())
}
/// Run a command. Returns the text to answer with, if the command did not answer itself.
async fn command(
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    cmd: Command,
) -> anyhow::Result<Option<String>> {
    let uid = user_id as i64;
    Ok(Some(match cmd {
        Command::Start => render::start(&app.cfg.backup_roots[0].display().to_string()),
        Command::Help => help_text(),
        Command::Backup(raw) => {
            let a = match args::parse_backup(&raw) {
                Ok(a) => a,
                Err(e) => return Ok(Some(e)),
            };
            let routed = match hosts::backup_path(app, &a.path).await? {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(user_id, path = a.path, "backup refused: {e}");
                    return Ok(Some(format!("🚫 Can't back up: {e}")));
                }
            };
            start_job_on(
                app,
                uid,
                chat,
                JobArgs::Backup {
                    path: routed.path,
                    encrypt: a.encrypt,
                },
                routed.host.as_deref(),
            )
            .await?;
            return Ok(None);
        }
        Command::Restore(raw) => {
            let a = match args::parse_restore(&raw) {
                Ok(a) => a,
                Err(e) => return Ok(Some(e)),
            };
            let routed = match hosts::restore_path(app, &a.path).await? {
                Ok(r) => r,
                Err(e) => {
                    return Ok(Some(format!(
                        "🚫 {e}. Usage: /restore [host:]<path> [to <dir>] [snapshot <id>]"
                    )));
                }
            };
            let path = routed.path.clone();
            // Where it may write: the bot's own restore roots with one host on SQLite (it sees
            // that host's folders), the routed host's registered ones otherwise.
            let target = |dir: &str| match &routed.info {
                Some(h) => hosts::check_remote_target(dir, h),
                None => args::check_restore_target(dir, &app.cfg.restore_roots).and_then(|p| {
                    p.to_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("{dir}: not UTF-8"))
                }),
            };
            let to = match &a.to {
                // In place: the folder it came from must be one restores may write into.
                None => {
                    if let Err(e) = target(hosts::parent_of(&path)) {
                        return Ok(Some(format!(
                            "🚫 Can't restore {path} in place: {e}. Add `to <dir>`."
                        )));
                    }
                    None
                }
                Some(dir) => match target(dir) {
                    Ok(p) => Some(p),
                    Err(e) => return Ok(Some(format!("🚫 Can't restore there: {e}"))),
                },
            };
            // Users restore only their own backups: the path must lie in one of their roots.
            // (The worker also restores only from the requesting owner's snapshots.)
            match list_snapshots(&app.catalog, &owner(user_id), Some(&path)).await {
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
            start_job_on(app, uid, chat, args, routed.host.as_deref()).await?;
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
            start_job(app, uid, chat, JobArgs::Verify { path: None }).await?;
            // The continuous check's state, while the full one runs.
            let status = ScrubStatus::load(&app.catalog, app.cfg.scrub_bytes_per_day).await?;
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
                start_job(app, uid, chat, JobArgs::Scrub { bytes: None }).await?;
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
        Command::Usage => {
            // The same figures as `storinator-worker stats`, for this user's folders.
            let u = storinator_shared::engine::prune::usage(
                &app.catalog,
                Some(&owner(user_id)),
                storinator_shared::config::DEFAULT_PACK_SIZE,
            )
            .await?;
            render::usage(&u)
        }
        Command::Snapshots(raw) => {
            let path = Some(raw.trim().trim_end_matches('/')).filter(|p| !p.is_empty());
            let mut snaps = list_snapshots(&app.catalog, &owner(user_id), path).await?;
            snaps.reverse();
            render::snapshots(path, &snaps)
        }
        Command::Ls(raw) => {
            let (path, snapshot) = match args::parse_restore(&raw) {
                Ok(a) if a.to.is_none() => (a.path, a.snapshot),
                _ => return Ok(Some("Usage: /ls <path> [snapshot <id>]".into())),
            };
            match storinator_shared::ls(
                &app.catalog,
                &owner(user_id),
                &path,
                snapshot.as_deref(),
                false,
            )
            .await
            {
                Ok((snap, entries)) => render::listing(&path, &snap, &entries),
                Err(EngineError::NotFound(_) | EngineError::Invalid(_)) => {
                    format!("You have no backup containing {path}. /snapshots lists yours.")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Command::Forget(raw) => return forget::command(app, user_id, chat, &raw).await,
        Command::Prune(raw) => return prune::command(app, user_id, chat, &raw).await,
        Command::Browse(raw) => return browse::command(app, user_id, chat, &raw).await,
        Command::Get(raw) => return browse::get_command(app, user_id, chat, &raw).await,
        Command::Versions(raw) => return browse::versions_command(app, user_id, chat, &raw).await,
        Command::Hosts => render::hosts(&app.jobs.hosts().await?, app.jobs.now_ms()),
        Command::Status => {
            let active = app.jobs.active_for_user(uid).await?;
            if active.is_empty() {
                "Nothing is running. /jobs lists your recent jobs.".into()
            } else {
                let now = app.jobs.now_ms();
                let mut lines = vec![format!(
                    "{}:",
                    plural(active.len() as u64, "active job", "active jobs")
                )];
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
    let routed = match hosts::backup_path(app, &req.path).await? {
        Ok(r) => r,
        Err(e) => return Ok(format!("🚫 Can't schedule: {e}")),
    };
    let s = app
        .alerts
        .schedules()
        .create(&NewSchedule {
            owner: owner(user_id),
            user_id: user_id as i64,
            chat_id: chat.0,
            path: routed.path,
            when: req.when,
            encrypt: req.encrypt,
            retention: req.retention,
            host: routed.host,
        })
        .await?;
    let tz = app.alerts.tz();
    let mut text = format!(
        "🗓 Schedule #{}: {}{} · {}{} ({}).\nFirst run: {}.",
        s.id,
        render::on_host(s.host.as_deref()),
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

/// Queue a job for any worker and post its progress message.
pub(crate) async fn start_job(
    app: &Arc<App>,
    user_id: i64,
    chat: ChatId,
    args: JobArgs,
) -> anyhow::Result<()> {
    start_job_on(app, user_id, chat, args, None).await
}

/// Queue a job for the workers of `host` (`None`: any worker) and post its progress message.
pub(crate) async fn start_job_on(
    app: &Arc<App>,
    user_id: i64,
    chat: ChatId,
    args: JobArgs,
    host: Option<&str>,
) -> anyhow::Result<()> {
    let job = app.jobs.enqueue_on(user_id, chat.0, &args, host).await?;
    // Taken before anything can await, so the notifier can't post a second message for a
    // job that finishes before its first message is out.
    let _busy = Busy::claim(app, job.id);
    tracing::info!(
        job = job.id,
        user_id,
        kind = args.kind(),
        host,
        "job queued"
    );
    post_progress(app, &job).await
}

async fn on_callback(bot: Bot, q: CallbackQuery, app: Arc<App>) -> HandlerResult {
    // Every tap gets an answer, a failure too: an unanswered one leaves the user's button
    // spinning with no word of what happened.
    let answer = match callback_answer(&q, &app).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(user_id = q.from.id.0, "a button press failed: {e:#}");
            Some(format!("That did not work: {e}. Try again."))
        }
    };
    let mut req = bot.answer_callback_query(q.id.clone());
    if let Some(text) = answer {
        req = req.text(render::toast(&text));
    }
    req.await?;
    Ok(())
}

/// What a tap does, and the toast it is answered with.
async fn callback_answer(q: &CallbackQuery, app: &Arc<App>) -> anyhow::Result<Option<String>> {
    let user_id = q.from.id.0;
    Ok(if !app.cfg.is_allowed(user_id) {
        // Not a message: answering costs none of the message budget.
        tracing::debug!(user_id, "refused a button press from an unauthorized user");
        Some("You are not allowed to use this bot.".to_string())
    } else {
        let data = q.data.clone().unwrap_or_default();
        let at = q.regular_message().map(|m| (m.chat.id, m.id));
        match data.split_once(':') {
            Some(("ow", id)) => conflict_answer(app, user_id, id, Answer::Overwrite, at).await?,
            Some(("keep", id)) => conflict_answer(app, user_id, id, Answer::Keep, at).await?,
            Some((forget::CONFIRM, id)) => forget::answer(app, user_id, id, true, at).await?,
            Some((forget::CANCEL, id)) => forget::answer(app, user_id, id, false, at).await?,
            Some((prune::CONFIRM, id)) => prune::answer(app, user_id, id, true, at).await?,
            Some((prune::CANCEL, id)) => prune::answer(app, user_id, id, false, at).await?,
            _ => match at {
                Some((chat, message)) => {
                    browse::on_button(app, user_id, chat, message, &data).await?
                }
                None => Some(browse::STALE.to_string()),
            },
        }
    })
}

/// The answer to a restore-conflict prompt, acted on once (the job table keeps it).
async fn conflict_answer(
    app: &Arc<App>,
    user_id: u64,
    id: &str,
    answer: Answer,
    prompt: Option<(ChatId, MessageId)>,
) -> anyhow::Result<Option<String>> {
    let Ok(id) = id.parse::<JobId>() else {
        return Ok(Some(browse::STALE.into()));
    };
    let job = app.jobs.get_for_user(id, user_id as i64).await?;
    let outcome = app.jobs.answer_conflict(id, user_id as i64, answer).await?;
    let title = job.as_ref().map(render::title).unwrap_or_default();
    let (toast, text) = match outcome {
        AnswerOutcome::NotWaiting => {
            return Ok(Some("That restore is not waiting for an answer.".into()));
        }
        AnswerOutcome::AlreadyAnswered => return Ok(Some("Already answered.".into())),
        AnswerOutcome::Kept => (
            "Kept.",
            format!("✋ {title}: kept the existing files; nothing was overwritten."),
        ),
        AnswerOutcome::Overwriting(new) => {
            let text = format!("✋ {title}: overwriting — restore #{} queued.", new.id);
            follow_up(app, Some(*new), prompt, text);
            return Ok(Some("Overwriting.".into()));
        }
    };
    follow_up(app, None, prompt, text);
    Ok(Some(toast.into()))
}

/// What a tap changes in the chat, sent after the tap is answered: a queued job's progress
/// message, then the prompt's new text (its buttons gone). Both go through the outbox, which
/// may wait out Telegram's rate limits; the tap's answer must not wait with them, or the
/// button spins on the user's screen meanwhile.
pub(crate) fn follow_up(
    app: &Arc<App>,
    queued: Option<storinator_shared::Job>,
    prompt: Option<(ChatId, MessageId)>,
    text: String,
) {
    // Claimed now, before the tap's answer: the notifier must not post a second progress
    // message for a job that finishes before this one is out.
    let busy = queued.as_ref().map(|job| Busy::claim(app, job.id));
    let app = app.clone();
    tokio::spawn(async move {
        let _busy = busy;
        if let Some(job) = queued
            && let Err(e) = post_progress(&app, &job).await
        {
            tracing::warn!(job = job.id, "posting the progress message: {e:#}");
        }
        if let Some((c, m)) = prompt {
            edit_quietly(&app, c, m, text).await;
        }
    });
}

/// Posts a new job's progress message and records it as the one to edit.
async fn post_progress(app: &App, job: &storinator_shared::Job) -> anyhow::Result<()> {
    let msg = app
        .outbox
        .text(ChatId(job.chat_id), render::progress(job), None)
        .await?;
    app.jobs.set_progress_message(job.id, msg.id.0).await?;
    app.jobs.mark_shown(job.id, job.updated_at).await?;
    Ok(())
}

/// Replace a prompt's text (dropping its buttons); failures only cost a stale prompt.
async fn edit_quietly(app: &App, chat: ChatId, message: MessageId, text: String) {
    if let Err(e) = app.outbox.edit(chat, message, text, None).await {
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
    run_with(config, Jobs::new(pool), shutdown).await
}

/// [`run`] with the job table supplied (tests inject a clock).
pub async fn run_with(
    config: BotConfig,
    jobs: Jobs,
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
        outbox: Outbox::start(bot.clone(), config.limits),
        cfg: config.clone(),
        catalog: Catalog::from_pool(jobs.pool().clone()),
        jobs,
        strangers: Mutex::default(),
        busy: Mutex::default(),
        alerts,
    });
    let notifier = tokio::spawn(notifier::Notifier::new(app.clone()).run());
    let alert_sender = tokio::spawn(alerts::AlertSender::new(app.clone()).run());

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
        let clipped = clip(long.clone());
        assert!(clipped.chars().count() <= 4096);
        let (kept, marker) = clipped.rsplit_once('\n').unwrap();
        assert_eq!(marker, "… (cut: too long for one message)");
        // Whole lines only: what is kept is the text's first lines, up to a line break.
        assert!(long.starts_with(&format!("{kept}\n")), "{kept}");
        assert!(kept.lines().count() > 100);
        assert_eq!(clip("short".into()), "short");
    }

    #[test]
    fn the_command_menu_lists_every_command() {
        let menu = Command::bot_commands();
        assert_eq!(menu.len(), 24);
        assert!(
            menu.iter().any(|c| c.command == "/prune"),
            "/prune in the menu"
        );
        assert!(
            menu.iter().any(|c| c.command == "/hosts"),
            "/hosts in the menu"
        );
        let help = help_text();
        let mut seen = std::collections::HashSet::new();
        for c in &menu {
            let name = c.command.trim_start_matches('/');
            assert!(seen.insert(name.to_string()), "/{name} listed twice");
            assert!(name.chars().all(|c| c.is_ascii_lowercase()), "/{name}");
            // Each entry is a command the bot understands, described in /help.
            assert!(
                Command::parse(&format!("/{name}"), "bot").is_ok(),
                "the menu offers /{name}, which the bot does not parse"
            );
            assert!(!c.description.is_empty(), "/{name} has no description");
            assert!(help.contains(&format!("/{name}")), "/help omits /{name}");
        }
    }
}

//! `/forget <path> keep …`: the dry run from the catalog (the engine's own, no key needed),
//! shown with two buttons; *Forget N snapshots* queues a `forget` job that forgets at most
//! the snapshots shown. The prompt is a row of `forget_prompts`: the buttons carry its id
//! only, and the answer is recorded once ([`Jobs::answer_forget_prompt`]).

use std::sync::Arc;

use anyhow::Context;
use teloxide::types::{ChatId, InlineKeyboardButton, InlineKeyboardMarkup, MessageId};

use storinator_shared::engine::forget;
use storinator_shared::{
    Error as EngineError, ForgetOptions, KeepPolicy, NewForgetPrompt, PromptOutcome,
};

use crate::{App, args, owner, render};

/// The answer to a button that is not (or no longer) this user's prompt.
pub(crate) const STALE: &str = "This button is out of date. Send /forget again.";

/// Callback data of the two buttons (`fg:<prompt id>`, `fgn:<prompt id>`).
pub(crate) const CONFIRM: &str = "fg";
pub(crate) const CANCEL: &str = "fgn";

/// `/forget <path> keep …`. Returns the text to answer with when there is no prompt to show.
pub(crate) async fn command(
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    raw: &str,
) -> anyhow::Result<Option<String>> {
    let (path, policy) = match args::parse_forget(raw) {
        Ok(a) => a,
        Err(e) => return Ok(Some(e)),
    };
    let policy = match KeepPolicy::parse(&policy) {
        Ok(p) => p,
        Err(e) => return Ok(Some(format!("🗑 {e}"))),
    };
    // The same rules as /backup: only folders inside the backup roots.
    let path = match args::check_backup_path(&path, &app.cfg.backup_roots) {
        Ok(p) => p.to_str().context("path is not UTF-8")?.to_string(),
        Err(e) => return Ok(Some(format!("🚫 Can't forget: {e}"))),
    };
    let opts = ForgetOptions {
        owner: owner(user_id),
        path: path.clone(),
        policy: policy.clone(),
        tz: app.cfg.timezone.clone(),
        dry_run: true,
        // Never from the chat: a policy that keeps nothing is refused by the engine.
        allow_empty: false,
        only: None,
    };
    let report = match forget::dry_run(&app.catalog, &opts).await {
        Ok(r) => r,
        Err(EngineError::NotFound(_)) => {
            return Ok(Some(format!(
                "You have no backups of {path}. /snapshots lists yours."
            )));
        }
        Err(EngineError::Invalid(e)) => {
            // The engine's hint names a CLI flag; the chat never forgets a folder's last one.
            let first = e.lines().next().unwrap_or_default();
            return Ok(Some(format!(
                "🚫 {first}.\nThe chat never forgets a folder's last snapshot."
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if report.remove.is_empty() {
        return Ok(Some(format!(
            "🗑 Nothing to forget: {policy} keeps all {} of {}.",
            render::plural(report.keep.len() as u64, "snapshot", "snapshots"),
            report.root
        )));
    }
    let snapshots: Vec<String> = report
        .remove
        .iter()
        .map(|i| i.snapshot.short_id.clone())
        .collect();
    let id = app
        .jobs
        .create_forget_prompt(&NewForgetPrompt {
            user_id: user_id as i64,
            chat_id: chat.0,
            root: &report.root,
            policy: &policy.to_string(),
            snapshots: &snapshots,
        })
        .await?;
    let text = render::forget_prompt(&report, &policy, app.alerts.tz());
    let n = snapshots.len() as u64;
    let label = format!("Forget {}", render::plural(n, "snapshot", "snapshots"));
    let keyboard = prompt_keyboard(label, (CONFIRM, CANCEL), id);
    app.outbox.text(chat, text, Some(keyboard)).await?;
    Ok(None)
}

/// The two buttons of a recorded prompt: `label` confirms, *Cancel* does not; each carries
/// the prompt's id after its callback prefix (`confirm`, `cancel`).
pub(crate) fn prompt_keyboard(
    label: String,
    (confirm, cancel): (&str, &str),
    id: i64,
) -> InlineKeyboardMarkup {
    InlineKeyboardMarkup::new(vec![vec![
        InlineKeyboardButton::callback(label, format!("{confirm}:{id}")),
        InlineKeyboardButton::callback("Cancel", format!("{cancel}:{id}")),
    ]])
}

/// A tap on *Forget N snapshots* (`confirm`) or *Cancel*: acted on once, and only for the
/// user the prompt was made for (anyone else is told it is out of date, as for a made-up id).
pub(crate) async fn answer(
    app: &Arc<App>,
    user_id: u64,
    id: &str,
    confirm: bool,
    prompt: Option<(ChatId, MessageId)>,
) -> anyhow::Result<Option<String>> {
    let Ok(id) = id.parse::<i64>() else {
        return Ok(Some(STALE.into()));
    };
    let outcome = app
        .jobs
        .answer_forget_prompt(id, user_id as i64, confirm)
        .await?;
    settle(app, outcome, prompt, &WORDS).await
}

/// How one kind of prompt speaks.
pub(crate) struct Words {
    /// The command that asks again (`/forget`).
    pub(crate) command: &'static str,
    pub(crate) icon: &'static str,
    /// What a cancelled or expired prompt did: nothing (`nothing was forgotten`).
    pub(crate) nothing: &'static str,
    /// The toast when the job is queued (`Forgetting.`).
    pub(crate) queued: &'static str,
}

const WORDS: Words = Words {
    command: "/forget",
    icon: "🗑",
    nothing: "nothing was forgotten",
    queued: "Forgetting.",
};

/// Acts on the outcome of a tap on a recorded prompt: the toast to answer with, the prompt
/// edited (buttons gone), and a queued job's progress message posted.
pub(crate) async fn settle(
    app: &Arc<App>,
    outcome: PromptOutcome,
    prompt: Option<(ChatId, MessageId)>,
    w: &Words,
) -> anyhow::Result<Option<String>> {
    let (toast, text) = match outcome {
        PromptOutcome::NotWaiting => {
            return Ok(Some(format!(
                "This button is out of date. Send {} again.",
                w.command
            )));
        }
        PromptOutcome::AlreadyAnswered => return Ok(Some("Already answered.".into())),
        PromptOutcome::Busy(job) => {
            return Ok(Some(format!(
                "Job #{job} is already doing this. Try again when it is done."
            )));
        }
        PromptOutcome::Expired => (
            format!("This prompt expired. Send {} again.", w.command),
            format!(
                "⌛ This {} prompt expired; {}. Send {} again.",
                w.command, w.nothing, w.command
            ),
        ),
        PromptOutcome::Cancelled => (
            "Cancelled.".to_string(),
            format!("{} Cancelled: {}.", w.icon, w.nothing),
        ),
        PromptOutcome::Queued(job) => {
            let text = format!("{} {}: queued.", w.icon, render::title(&job));
            crate::follow_up(app, Some(*job), prompt, text);
            return Ok(Some(w.queued.to_string()));
        }
    };
    crate::follow_up(app, None, prompt, text);
    Ok(Some(toast))
}

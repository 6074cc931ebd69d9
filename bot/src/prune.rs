//! `/prune [repack-below N] [max-repack SIZE]`: the dry run from the catalog (the engine's
//! [`prune::estimate`], the one `prune --dry-run`, `stats` and `/usage` show), with two
//! buttons; *Prune, frees X* queues a `prune` job with the options shown. The prompt is a row
//! of `prune_prompts`, answered once like `/forget`'s ([`crate::forget::settle`]).
//!
//! Who may prune: packs hold the chunks of every owner's snapshots (deduplication is
//! repository-wide), so a prune acts on the whole installation, not on one user's backups.
//! Only the installation's admins (`STORINATOR_ADMIN_USERS`, default the only allowed user of
//! a one-user installation) may ask for one.

use std::sync::Arc;

use teloxide::types::{ChatId, MessageId};

use storinator_shared::engine::prune;
use storinator_shared::{NewPrunePrompt, PruneOptions};

use crate::forget::{Words, prompt_keyboard, settle};
use crate::{App, args, render};

/// Callback data of the two buttons (`pr:<prompt id>`, `prn:<prompt id>`).
pub(crate) const CONFIRM: &str = "pr";
pub(crate) const CANCEL: &str = "prn";

/// The answer to a user who may not prune.
pub(crate) const NOT_ADMIN: &str = "🚫 Only an admin of this installation may prune: packs hold every user's backups, so a prune acts on all of them.\nhint: the bot's owner lists admins in STORINATOR_ADMIN_USERS (or runs `storinator-worker prune` on the server).";

const WORDS: Words = Words {
    command: "/prune",
    icon: "🧹",
    nothing: "nothing was deleted",
    queued: "Pruning.",
};

/// `/prune …`. Returns the text to answer with when there is no prompt to show.
pub(crate) async fn command(
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    raw: &str,
) -> anyhow::Result<Option<String>> {
    if !app.cfg.is_admin(user_id) {
        tracing::info!(user_id, "prune refused: not an admin");
        return Ok(Some(NOT_ADMIN.into()));
    }
    let (max_repack, repack_below) = match args::parse_prune(raw) {
        Ok(a) => a,
        Err(e) => return Ok(Some(e)),
    };
    let opts = PruneOptions {
        dry_run: true,
        max_repack,
        repack_below,
    };
    // The bot does not know the worker's pack size; `/usage` assumes the default too.
    let report = prune::estimate(
        &app.catalog,
        &opts,
        storinator_shared::config::DEFAULT_PACK_SIZE,
    )
    .await?;
    if report.freed() == 0 {
        return Ok(Some(render::prune_nothing(&report)));
    }
    let id = app
        .jobs
        .create_prune_prompt(&NewPrunePrompt {
            user_id: user_id as i64,
            chat_id: chat.0,
            max_repack,
            repack_below,
        })
        .await?;
    let label = format!("Prune, frees {}", render::bytes(report.freed()));
    let keyboard = prompt_keyboard(label, (CONFIRM, CANCEL), id);
    app.outbox
        .text(chat, render::prune_prompt(&report, &opts), Some(keyboard))
        .await?;
    Ok(None)
}

/// A tap on *Prune, frees X* (`confirm`) or *Cancel*: acted on once, only for the admin the
/// prompt was made for.
pub(crate) async fn answer(
    app: &Arc<App>,
    user_id: u64,
    id: &str,
    confirm: bool,
    prompt: Option<(ChatId, MessageId)>,
) -> anyhow::Result<Option<String>> {
    let stale = || Some("This button is out of date. Send /prune again.".to_string());
    let Ok(id) = id.parse::<i64>() else {
        return Ok(stale());
    };
    // No longer an admin since the prompt was shown: as for someone else's prompt.
    if !app.cfg.is_admin(user_id) {
        return Ok(stale());
    }
    let outcome = app
        .jobs
        .answer_prune_prompt(id, user_id as i64, confirm)
        .await?;
    settle(app, outcome, prompt, &WORDS).await
}

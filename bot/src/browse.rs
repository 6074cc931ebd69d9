//! The chat as a file manager: `/browse` shows a snapshot as inline keyboards (folders open,
//! files open a card), `/get` and *Send me this file* have the worker restore one file and
//! send it, `/versions` lists a file's versions across snapshots.
//!
//! Callback data is compact, ids and never paths (Telegram caps it at 64 bytes):
//! `b:<snapshot>:<entry>:<page>` opens a folder, `f:<snapshot>:<entry>` a file card,
//! `g:` sends the file, `r:` restores it where it came from, `v:` lists its versions, `cg:`
//! confirms the first send, `x:` cancels. Every press is checked like a command: the snapshot
//! must be one of the presser's own and the entry part of it, or the press is answered as
//! out of date, whoever made up the data.

use std::sync::Arc;

use teloxide::prelude::*;
use teloxide::types::{InlineKeyboardButton, InlineKeyboardMarkup, MessageId};

use storinator_shared::engine::restore::resolve;
use storinator_shared::{
    EntryKind, EntryRow, Error as EngineError, JobArgs, SnapshotInfo, format_time, human_bytes,
    list_snapshots, plural,
};

use crate::{App, args, owner, render, start_job};

/// The answer to a press whose keyboard no longer matches the catalog, or was not made for
/// the one pressing.
pub(crate) const STALE: &str = "This button is out of date. Send /browse again.";

/// Entries per page of a folder.
pub(crate) const PAGE: u64 = 20;

/// The consent `/get` asks for once: files go into Telegram in plaintext.
const CONSENT: &str = "send-plaintext";

const CONSENT_TEXT: &str = "⚠️ Sending a file puts a plaintext copy of it into Telegram (this chat, or for files over 50 MB the worker account's Saved Messages), outside the encrypted backup. Send files this way from now on?";

/// Where a keyboard points: a snapshot of the user's and one of its entries.
struct Place {
    root_id: i64,
    snap: SnapshotInfo,
    entry: EntryRow,
    /// The handle of the entry's path, which buttons name it by.
    handle: i64,
}

/// The absolute path of an entry (`data/a.txt` of `/srv/data` is `/srv/data/a.txt`).
fn absolute(snap: &SnapshotInfo, entry_path: &str) -> String {
    match entry_path.split_once('/') {
        Some((_, rest)) => format!("{}/{rest}", snap.root.trim_end_matches('/')),
        None => snap.root.clone(),
    }
}

fn button(text: impl Into<String>, data: String) -> InlineKeyboardButton {
    debug_assert!(data.len() <= 64, "callback data over 64 bytes: {data}");
    InlineKeyboardButton::callback(text, data)
}

/// Checks a press: the snapshot must be the presser's and the entry part of it.
async fn place(app: &App, user_id: u64, snap: &str, entry: &str) -> anyhow::Result<Option<Place>> {
    let Ok(entry) = entry.parse::<i64>() else {
        return Ok(None);
    };
    // A short id is hex; anything else (or an ambiguous prefix) is no snapshot of theirs.
    let found = match app.catalog.snapshot_by_id(&owner(user_id), snap).await {
        Ok(f) => f,
        Err(EngineError::Invalid(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let Some((root_id, snap)) = found else {
        return Ok(None);
    };
    let found = app.catalog.entry_in(root_id, snap.seq, entry).await?;
    Ok(found.map(|found| Place {
        root_id,
        snap,
        entry: found,
        handle: entry,
    }))
}

/// The handle of the folder holding `place.entry`, if it has one in the snapshot.
async fn parent_handle(app: &App, p: &Place) -> anyhow::Result<Option<i64>> {
    let Some((parent, _)) = p.entry.path.rsplit_once('/') else {
        return Ok(None);
    };
    if app
        .catalog
        .entry_at(p.root_id, p.snap.seq, parent)
        .await?
        .is_none()
    {
        return Ok(None);
    }
    Ok(app.catalog.entry_handles(p.root_id, &[parent]).await?.pop())
}

/// A folder, one page of it.
async fn folder_view(
    app: &App,
    p: &Place,
    page: u64,
) -> anyhow::Result<(String, InlineKeyboardMarkup)> {
    let snap = &p.snap.short_id;
    let mut listing = app
        .catalog
        .children(p.root_id, p.snap.seq, &p.entry.path, page * PAGE, PAGE)
        .await?;
    let pages = listing.total.div_ceil(PAGE).max(1);
    let page = if page >= pages {
        listing = app
            .catalog
            .children(
                p.root_id,
                p.snap.seq,
                &p.entry.path,
                (pages - 1) * PAGE,
                PAGE,
            )
            .await?;
        pages - 1
    } else {
        page
    };
    let mut text = format!(
        "📂 {}\nSnapshot {snap} · {}\n{}",
        absolute(&p.snap, &p.entry.path),
        format_time(p.snap.finished_at),
        plural(listing.total, "entry", "entries"),
    );
    if pages > 1 {
        text.push_str(&format!(" · page {} of {pages}", page + 1));
    }
    let paths: Vec<&str> = listing.entries.iter().map(|e| e.path.as_str()).collect();
    let handles = app.catalog.entry_handles(p.root_id, &paths).await?;
    let mut rows: Vec<Vec<InlineKeyboardButton>> = listing
        .entries
        .iter()
        .zip(handles)
        .map(|(e, handle)| {
            let label = render::entry_line(e);
            let data = match e.kind {
                EntryKind::Dir => format!("b:{snap}:{handle}:0"),
                _ => format!("f:{snap}:{handle}"),
            };
            vec![button(label, data)]
        })
        .collect();
    let mut nav = Vec::new();
    if let Some(up) = parent_handle(app, p).await? {
        nav.push(button("⬆️ Up", format!("b:{snap}:{up}:0")));
    }
    if page > 0 {
        nav.push(button(
            "◀️ Previous",
            format!("b:{snap}:{}:{}", p.handle, page - 1),
        ));
    }
    if page + 1 < pages {
        nav.push(button(
            "Next ▶️",
            format!("b:{snap}:{}:{}", p.handle, page + 1),
        ));
    }
    if !nav.is_empty() {
        rows.push(nav);
    }
    Ok((text, InlineKeyboardMarkup::new(rows)))
}

/// A file's card: what it is, and what can be done with it.
async fn card_view(app: &App, p: &Place) -> anyhow::Result<(String, InlineKeyboardMarkup)> {
    let snap = &p.snap.short_id;
    let e = &p.entry;
    let mut text = format!("{}\n{}", render::entry_line(e), absolute(&p.snap, &e.path));
    let mut rows = Vec::new();
    if e.kind == EntryKind::File {
        text.push_str(&format!(
            "\nSize {} · modified {} UTC\nSnapshot {snap} · {}",
            human_bytes(e.size),
            format_time(e.mtime_ns.div_euclid(1_000_000)),
            format_time(p.snap.finished_at)
        ));
        rows.push(vec![
            button("📨 Send me this file", format!("g:{snap}:{}", p.handle)),
            button("♻️ Restore here", format!("r:{snap}:{}", p.handle)),
        ]);
        rows.push(vec![button(
            "🕘 Versions",
            format!("v:{snap}:{}", p.handle),
        )]);
    }
    if let Some(up) = parent_handle(app, p).await? {
        rows.push(vec![button(
            "⬆️ Back to the folder",
            format!("b:{snap}:{up}:0"),
        )]);
    }
    Ok((text, InlineKeyboardMarkup::new(rows)))
}

/// Every version of the file at `p`, newest first, each with Send and Restore buttons.
async fn versions_view(app: &App, p: &Place) -> anyhow::Result<(String, InlineKeyboardMarkup)> {
    let versions = app.catalog.versions(p.root_id, &p.entry.path).await?;
    let path = absolute(&p.snap, &p.entry.path);
    let mut lines = vec![format!(
        "🕘 {} of {path}:",
        plural(versions.len() as u64, "version", "versions")
    )];
    let mut rows = Vec::new();
    for (i, v) in versions.iter().take(10).enumerate() {
        let n = i + 1;
        lines.push(format!(
            "{n}. {} · modified {} · snapshot {} ({})",
            human_bytes(v.entry.size),
            format_time(v.entry.mtime_ns.div_euclid(1_000_000)),
            v.last.short_id,
            format_time(v.last.finished_at)
        ));
        if v.entry.kind == EntryKind::File {
            rows.push(vec![
                button(
                    format!("📨 Send {n}"),
                    format!("g:{}:{}", v.last.short_id, p.handle),
                ),
                button(
                    format!("♻️ Restore {n}"),
                    format!("r:{}:{}", v.last.short_id, p.handle),
                ),
            ]);
        }
    }
    if versions.len() > 10 {
        lines.push(format!("… and {} older", versions.len() - 10));
    }
    Ok((lines.join("\n"), InlineKeyboardMarkup::new(rows)))
}

/// Queues a `/get` of the file at `p`, after the one-time consent.
async fn send_file(
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    p: &Place,
) -> anyhow::Result<String> {
    if p.entry.kind != EntryKind::File {
        return Ok("Only files can be sent.".into());
    }
    if !app.jobs.has_consent(user_id as i64, CONSENT).await? {
        let keyboard = InlineKeyboardMarkup::new(vec![vec![
            button(
                "Yes, send it",
                format!("cg:{}:{}", p.snap.short_id, p.handle),
            ),
            button("No", "x:".into()),
        ]]);
        app.outbox.text(chat, CONSENT_TEXT, Some(keyboard)).await?;
        return Ok("Please confirm first.".into());
    }
    let args = JobArgs::Get {
        path: absolute(&p.snap, &p.entry.path),
        snapshot: Some(p.snap.short_id.clone()),
    };
    start_job(app, user_id as i64, chat, args).await?;
    Ok("On its way.".into())
}

/// A press on one of this module's buttons. Returns the short answer shown to the presser.
pub(crate) async fn on_button(
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    message: MessageId,
    data: &str,
) -> anyhow::Result<Option<String>> {
    let parts: Vec<&str> = data.split(':').collect();
    if parts == ["x", ""] {
        app.outbox
            .edit(chat, message, "Nothing was sent.", None)
            .await?;
        return Ok(None);
    }
    let (kind, snap, entry) = match parts.as_slice() {
        [k, s, e] | [k, s, e, _] => (*k, *s, *e),
        _ => return Ok(Some(STALE.into())),
    };
    let Some(p) = place(app, user_id, snap, entry).await? else {
        return Ok(Some(STALE.into()));
    };
    let view = match (kind, parts.get(3)) {
        ("b", Some(page)) if p.entry.kind == EntryKind::Dir => {
            let Ok(page) = page.parse::<u64>() else {
                return Ok(Some(STALE.into()));
            };
            folder_view(app, &p, page).await?
        }
        ("f", None) => card_view(app, &p).await?,
        ("v", None) => versions_view(app, &p).await?,
        ("g", None) => return Ok(Some(send_file(app, user_id, chat, &p).await?)),
        ("cg", None) => {
            app.jobs.give_consent(user_id as i64, CONSENT).await?;
            app.outbox
                .edit(
                    chat,
                    message,
                    "OK: files you ask for are sent into this chat from now on.",
                    None,
                )
                .await?;
            return Ok(Some(send_file(app, user_id, chat, &p).await?));
        }
        ("r", None) if p.entry.kind == EntryKind::File => {
            let args = JobArgs::Restore {
                path: absolute(&p.snap, &p.entry.path),
                to: None,
                snapshot: Some(p.snap.short_id.clone()),
                overwrite: false,
            };
            start_job(app, user_id as i64, chat, args).await?;
            return Ok(Some("Restore queued.".into()));
        }
        _ => return Ok(Some(STALE.into())),
    };
    app.outbox.edit(chat, message, view.0, Some(view.1)).await?;
    Ok(None)
}

/// Resolves `path [snapshot <id>]` of a command to a place in the user's snapshots, or the
/// reply that explains why not.
async fn resolve_place(
    app: &App,
    user_id: u64,
    raw: &str,
    usage: &str,
) -> anyhow::Result<Result<Place, String>> {
    let (path, snapshot) = match args::parse_restore(raw) {
        Ok(a) if a.to.is_none() => (a.path, a.snapshot),
        _ => return Ok(Err(format!("Usage: {usage}"))),
    };
    let r = match resolve(&app.catalog, &owner(user_id), &path, snapshot.as_deref()).await {
        Ok(r) => r,
        Err(EngineError::NotFound(_) | EngineError::Invalid(_)) => {
            return Ok(Err(format!(
                "You have no backup containing {path}. /snapshots lists yours."
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let entry = app
        .catalog
        .entry_at(r.root_id, r.snapshot.seq, &r.prefix)
        .await?;
    Ok(match entry {
        Some(entry) => Ok(Place {
            handle: app
                .catalog
                .entry_handles(r.root_id, &[&r.prefix])
                .await?
                .pop()
                .expect("one handle per path"),
            root_id: r.root_id,
            snap: r.snapshot,
            entry,
        }),
        None => Err(format!(
            "{path} is not in snapshot {}.",
            r.snapshot.short_id
        )),
    })
}

/// `/browse [path] [snapshot <id>]`.
pub(crate) async fn command(
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    raw: &str,
) -> anyhow::Result<Option<String>> {
    let usage = "/browse [path] [snapshot <id>]";
    let raw = raw.trim();
    let p = if raw.is_empty() {
        // Without a path: the one backed-up folder, or a choice of them.
        let mut latest: Vec<SnapshotInfo> = Vec::new();
        for s in list_snapshots(&app.catalog, &owner(user_id), None).await? {
            match latest.iter_mut().find(|l| l.root == s.root) {
                Some(l) if l.seq < s.seq => *l = s,
                Some(_) => {}
                None => latest.push(s),
            }
        }
        match latest.as_slice() {
            [] => return Ok(Some("No snapshots yet. /backup <path> makes one.".into())),
            [one] => match resolve_place(app, user_id, &one.root, usage).await? {
                Ok(p) => p,
                Err(reply) => return Ok(Some(reply)),
            },
            many => {
                let mut rows = Vec::new();
                for s in many {
                    if let Ok(p) = resolve_place(app, user_id, &s.root, usage).await? {
                        rows.push(vec![button(
                            format!("📁 {}", s.root),
                            format!("b:{}:{}:0", s.short_id, p.handle),
                        )]);
                    }
                }
                app.outbox
                    .text(
                        chat,
                        "📚 Your backed-up folders:",
                        Some(InlineKeyboardMarkup::new(rows)),
                    )
                    .await?;
                return Ok(None);
            }
        }
    } else {
        match resolve_place(app, user_id, raw, usage).await? {
            Ok(p) => p,
            Err(reply) => return Ok(Some(reply)),
        }
    };
    let (text, keyboard) = match p.entry.kind {
        EntryKind::Dir => folder_view(app, &p, 0).await?,
        _ => card_view(app, &p).await?,
    };
    app.outbox.text(chat, text, Some(keyboard)).await?;
    Ok(None)
}

/// `/get <path> [snapshot <id>]`.
pub(crate) async fn get_command(
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    raw: &str,
) -> anyhow::Result<Option<String>> {
    let usage = "/get <path> [snapshot <id>]";
    if raw.trim().is_empty() {
        return Ok(Some(format!("Which file? Usage: {usage}")));
    }
    let p = match resolve_place(app, user_id, raw, usage).await? {
        Ok(p) => p,
        Err(reply) => return Ok(Some(reply)),
    };
    if p.entry.kind != EntryKind::File {
        return Ok(Some(format!(
            "{} is not a file. /restore restores folders; /browse shows what is inside.",
            absolute(&p.snap, &p.entry.path)
        )));
    }
    // It answers itself: with the consent question or the job's progress message.
    send_file(app, user_id, chat, &p).await?;
    Ok(None)
}

/// `/versions <path>`.
pub(crate) async fn versions_command(
    app: &Arc<App>,
    user_id: u64,
    chat: ChatId,
    raw: &str,
) -> anyhow::Result<Option<String>> {
    let usage = "/versions <path>";
    if raw.trim().is_empty() {
        return Ok(Some(format!("Which file? Usage: {usage}")));
    }
    let p = match resolve_place(app, user_id, raw, usage).await? {
        Ok(p) => p,
        Err(reply) => return Ok(Some(reply)),
    };
    let (text, keyboard) = versions_view(app, &p).await?;
    app.outbox.text(chat, text, Some(keyboard)).await?;
    Ok(None)
}

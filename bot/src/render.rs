//! The texts the bot shows: progress messages, summaries, job lists. Pure functions of a
//! [`Job`], so the same job state always renders the same text (and an unchanged job never
//! causes an edit).

use storinator_shared::{
    EntryKind, EntryRow, Job, JobArgs, JobResult, JobState, SnapshotInfo, format_time,
};

/// `1.5 MiB`, `812 B`: the engine's formatting, so chat and CLI agree.
pub use storinator_shared::human_bytes as bytes;

pub use storinator_shared::{dedup_figure, plural};

/// `/usage`: the user's folders, then the repository's totals and what a prune would free.
/// A callback answer's text as Telegram takes it: at most 200 characters (UTF-16 units),
/// cut with an ellipsis when longer (a longer one is refused and the tap left unanswered).
pub fn toast(text: &str) -> String {
    const MAX: usize = 200;
    if text.encode_utf16().count() <= MAX {
        return text.to_string();
    }
    let mut out = String::new();
    let mut units = 0;
    for c in text.chars() {
        if units + c.len_utf16() > MAX - 1 {
            break;
        }
        units += c.len_utf16();
        out.push(c);
    }
    out.push('…');
    out
}

pub fn usage(u: &storinator_shared::UsageReport) -> String {
    if u.roots.is_empty() {
        return "No backups yet. /backup <path> makes one.".into();
    }
    let mut lines = vec!["Your backups:".to_string()];
    for r in &u.roots {
        lines.push(format!(
            "• {}: {}, latest {}, {} added",
            r.root,
            plural(r.snapshots, "snapshot", "snapshots"),
            bytes(r.latest_bytes),
            bytes(r.added_bytes)
        ));
    }
    lines.push(format!(
        "Stored in Telegram (all users): {} in {} · dedup {:.2}×",
        bytes(u.stored_bytes),
        plural(u.packs, "message", "messages"),
        u.dedup_ratio
    ));
    lines.push(format!(
        "A prune would free {} now.",
        bytes(u.prune_would_free)
    ));
    lines.join("\n")
}

/// `/snapshots`: newest first, at most 30.
pub fn snapshots(path: Option<&str>, snaps: &[SnapshotInfo]) -> String {
    if snaps.is_empty() {
        return match path {
            Some(p) => format!("No snapshots of {p} yet. /backup {p} makes one."),
            None => "No snapshots yet. /backup <path> makes one.".into(),
        };
    }
    let mut lines = vec![format!(
        "📚 {}:",
        plural(snaps.len() as u64, "snapshot", "snapshots")
    )];
    for s in snaps.iter().take(30) {
        lines.push(format!(
            "• {} · {} · {} · {}, {}{}",
            s.short_id,
            s.root,
            format_time(s.finished_at),
            plural(s.files, "file", "files"),
            bytes(s.bytes),
            if s.encrypted { "" } else { " · unencrypted" }
        ));
    }
    if snaps.len() > 30 {
        lines.push(format!("… and {} older", snaps.len() - 30));
    }
    lines.join("\n")
}

/// One entry as a line of `/ls`.
pub fn entry_line(e: &EntryRow) -> String {
    let name = e.path.rsplit('/').next().unwrap_or(&e.path);
    match e.kind {
        EntryKind::Dir => format!("📁 {name}/"),
        EntryKind::Symlink => format!("🔗 {name} → {}", e.target.as_deref().unwrap_or("?")),
        EntryKind::File => format!("📄 {name} · {}", bytes(e.size)),
    }
}

/// `/ls`: the entries at a path (the item itself comes first and is left out for a folder).
pub fn listing(path: &str, snap: &SnapshotInfo, entries: &[EntryRow]) -> String {
    let children: Vec<&EntryRow> = match entries.first() {
        Some(first) if first.kind == EntryKind::Dir => entries[1..].iter().collect(),
        _ => entries.iter().collect(),
    };
    let mut lines = vec![format!("📂 {path} (snapshot {}):", snap.short_id)];
    if children.is_empty() {
        lines.push("(empty)".into());
    }
    for e in children.iter().take(100) {
        lines.push(entry_line(e));
    }
    if children.len() > 100 {
        lines.push(format!(
            "… and {} more (/browse pages through them)",
            children.len() - 100
        ));
    }
    lines.join("\n")
}

/// The answer to `/start`.
pub fn start(first_root: &str) -> String {
    format!(
        "👋 Hi! I back up this server's folders into Telegram, encrypted. Try /backup {first_root}, or /help for everything I can do."
    )
}

/// `web1:` before a path that runs on host web1; nothing when any worker runs it.
pub fn on_host(host: Option<&str>) -> String {
    host.map(|h| format!("{h}:")).unwrap_or_default()
}

/// The answer to `/hosts`: each storage host, its folders and when it was last seen.
pub fn hosts(hosts: &[storinator_shared::ops::hosts::HostInfo], now_ms: i64) -> String {
    use storinator_shared::ops::hosts::seen_ago;
    if hosts.is_empty() {
        return "No storage host has registered yet: a worker registers its host when it starts (storinator-worker run).".into();
    }
    let mut lines = vec![format!("🖥 Storage hosts ({}):", hosts.len())];
    for h in hosts {
        let folders = if h.backup_roots.is_empty() {
            "no folders".to_string()
        } else {
            h.backup_roots.join(", ")
        };
        let mut line = format!(
            "• {} — {folders} · seen {}",
            h.name,
            seen_ago(now_ms, h.last_seen)
        );
        if !h.restore_roots.is_empty() && h.restore_roots != h.backup_roots {
            line.push_str(&format!(" · restores into {}", h.restore_roots.join(", ")));
        }
        lines.push(line);
    }
    if hosts.len() > 1 {
        lines.push(format!(
            "When two hosts have the same folder, name one: /backup {}:/path",
            hosts[0].name
        ));
    }
    lines.join("\n")
}

/// The answer to text that is not a command.
pub const STRAY_TEXT: &str = "I only understand commands. /help lists them.";

/// The answer to an unknown command.
pub fn unknown_command(c: &str) -> String {
    format!("I don't know {c}. /help lists the commands.")
}

/// `1m 05s`, `3.2s`.
pub fn duration_ms(ms: u64) -> String {
    let secs = ms / 1000;
    if secs >= 3600 {
        format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60)
    } else if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// A 16-cell bar.
pub fn bar(fraction: f64) -> String {
    const CELLS: usize = 16;
    let f = fraction.clamp(0.0, 1.0);
    let full = (f * CELLS as f64).round() as usize;
    format!("[{}{}]", "█".repeat(full), "░".repeat(CELLS - full))
}

/// "Backup #12", "Restore #3".
pub fn title(job: &Job) -> String {
    let kind = match job.args {
        JobArgs::Backup { .. } => "Backup",
        JobArgs::Restore { .. } => "Restore",
        JobArgs::Verify { .. } => "Verify",
        JobArgs::Get { .. } => "File",
        JobArgs::Scrub { .. } => "Scrub",
        JobArgs::Forget { .. } => "Forget",
        JobArgs::Prune { .. } => "Prune",
    };
    format!("{kind} #{}", job.id)
}

/// What the job works on, in one line.
pub fn subject(job: &Job) -> String {
    match &job.args {
        JobArgs::Backup { path, encrypt } => {
            if *encrypt {
                path.clone()
            } else {
                format!("{path} (unencrypted)")
            }
        }
        JobArgs::Restore {
            path,
            to,
            snapshot,
            overwrite,
        } => {
            let mut s = path.clone();
            if let Some(to) = to {
                s.push_str(&format!(" → {to}"));
            }
            if let Some(id) = snapshot {
                s.push_str(&format!(" (snapshot {id})"));
            }
            if *overwrite {
                s.push_str(" (overwriting)");
            }
            s
        }
        JobArgs::Verify { path } => path.clone().unwrap_or_else(|| "all backups".into()),
        JobArgs::Get { path, snapshot } => match snapshot {
            Some(id) => format!("{path} (snapshot {id})"),
            None => path.clone(),
        },
        JobArgs::Scrub { bytes: b } => match b {
            Some(b) => format!("read back up to {}", bytes(*b)),
            None => "read back today's share of the packs".into(),
        },
        JobArgs::Forget {
            path,
            policy,
            snapshots,
        } => format!(
            "{path} ({policy}; {})",
            plural(snapshots.len() as u64, "snapshot", "snapshots")
        ),
        JobArgs::Prune {
            max_repack,
            repack_below,
        } => prune_options(*repack_below, *max_repack),
    }
}

/// `all backups (repack below 50%, move at most 200 MiB)`.
fn prune_options(repack_below: f64, max_repack: Option<u64>) -> String {
    let mut s = format!("all backups (repack below {repack_below}%");
    if let Some(b) = max_repack {
        s.push_str(&format!(", move at most {}", bytes(b)));
    }
    s.push(')');
    s
}

/// The `/prune` prompt: the dry run, as `prune --dry-run` words it.
pub fn prune_prompt(
    r: &storinator_shared::PruneReport,
    opts: &storinator_shared::PruneOptions,
) -> String {
    let mut lines = vec![
        format!(
            "🧹 Prune · {}",
            prune_options(opts.repack_below, opts.max_repack)
        ),
        format!(
            "{} in storage ({}) considered.",
            plural(r.packs, "pack", "packs"),
            bytes(r.bytes)
        ),
        format!(
            "Would delete {} no snapshot uses ({}).",
            plural(r.unused_packs, "pack", "packs"),
            bytes(r.unused_bytes)
        ),
        format!(
            "Would repack {} ({} of live data to move).",
            plural(r.repacked_packs, "sparse pack", "sparse packs"),
            bytes(r.repacked_bytes)
        ),
    ];
    if r.sparse_left > 0 {
        lines.push(format!(
            "Leaves {} for a later prune (over max-repack).",
            plural(r.sparse_left, "sparse pack", "sparse packs")
        ));
    }
    if r.recent_packs > 0 {
        lines.push(format!(
            "Skips {} newer than a backup still running.",
            plural(r.recent_packs, "pack", "packs")
        ));
    }
    lines.push(format!(
        "Would free {}. Backups keep running meanwhile; no snapshot changes.",
        bytes(r.freed())
    ));
    lines.join("\n")
}

/// `/prune` when there is nothing to free.
pub fn prune_nothing(r: &storinator_shared::PruneReport) -> String {
    let mut s = format!(
        "🧹 Nothing to prune: every one of the {} in storage ({}) is in use",
        plural(r.packs, "pack", "packs"),
        bytes(r.bytes)
    );
    if r.sparse_left > 0 {
        s.push_str(&format!(
            " ({} over max-repack)",
            plural(r.sparse_left, "sparse pack", "sparse packs")
        ));
    }
    s.push('.');
    s
}

/// What a finished prune did (the summary and the final notice).
fn prune_summary(deleted: u64, repacked: u64, freed: u64) -> String {
    format!(
        "deleted {}, repacked {}, freed {}.",
        plural(deleted, "pack", "packs"),
        repacked,
        bytes(freed)
    )
}

fn fraction(job: &Job) -> Option<f64> {
    let p = &job.progress;
    if p.bytes_total > 0 {
        Some(p.bytes_done as f64 / p.bytes_total as f64)
    } else if p.files_total > 0 {
        Some(p.files_done as f64 / p.files_total as f64)
    } else {
        None
    }
}

/// The progress message of an unfinished job.
pub fn progress(job: &Job) -> String {
    let head = format!("{} · {}", title(job), subject(job));
    match job.state {
        JobState::Queued if job.attempt == 0 => {
            format!("⏳ {head}\nQueued. Waiting for the worker…")
        }
        JobState::Queued => match job.error.as_deref() {
            Some(why) => format!(
                "⏳ {head}\nWill retry (attempt {} of {}): {why}",
                job.attempt + 1,
                job.max_attempts
            ),
            // Released by a worker that shut down cleanly: nothing failed.
            None => {
                format!("⏸ {head}\nPaused: the worker stopped; it resumes when a worker is back.")
            }
        },
        JobState::Running => {
            let p = &job.progress;
            let mut lines = vec![format!("🔄 {head}"), format!("Phase: {}", p.phase.as_str())];
            if let Some(f) = fraction(job) {
                lines.push(format!("{} {:.0}%", bar(f), f * 100.0));
            }
            let mut counts = Vec::new();
            if p.files_total > 0 {
                // A prune counts the packs it deleted.
                let (one, many) = match job.args {
                    JobArgs::Prune { .. } => ("pack deleted", "packs deleted"),
                    _ => ("file", "files"),
                };
                counts.push(format!(
                    "{}/{}",
                    p.files_done,
                    plural(p.files_total, one, many)
                ));
            }
            if p.bytes_total > 0 {
                counts.push(format!(
                    "{} / {}",
                    bytes(p.bytes_done),
                    bytes(p.bytes_total)
                ));
            } else if p.bytes_done > 0 {
                counts.push(bytes(p.bytes_done));
            }
            if !counts.is_empty() {
                lines.push(counts.join(" · "));
            }
            let elapsed = job
                .started_at
                .map(|s| (job.updated_at - s).max(0) as u64)
                .unwrap_or(0);
            if let Some(t) = &job.throttle {
                // The average since the start would promise far too soon: say who slows the
                // job down, the rate it gets now and the ETA at that rate.
                lines.push(format!("🐢 {}", t.reason));
                if t.bytes_per_sec >= 1.0 {
                    let mut line = format!("Measured {}/s", bytes(t.bytes_per_sec as u64));
                    if let Some(eta) = t.eta_secs {
                        line.push_str(&format!(" · ETA {} at this rate", duration_ms(eta * 1000)));
                    }
                    lines.push(line);
                } else {
                    lines.push("Measuring the rate it allows…".into());
                }
            } else if elapsed > 0 && p.bytes_done > 0 {
                let speed = p.bytes_done as f64 * 1000.0 / elapsed as f64;
                let mut line = format!("Speed {}/s", bytes(speed as u64));
                if p.bytes_total > p.bytes_done && speed > 0.0 {
                    let eta = (p.bytes_total - p.bytes_done) as f64 / speed * 1000.0;
                    line.push_str(&format!(" · ETA {}", duration_ms(eta as u64)));
                }
                lines.push(line);
            }
            // The estimate is what Telegram's limits allow; once the job has run longer than
            // that it says nothing true any more, so it goes (the speed-based ETA stays).
            if let Some(e) = &job.estimate
                && let (Some(calls), Some(secs)) = (
                    e.get("message_calls").and_then(|v| v.as_u64()),
                    e.get("seconds").and_then(|v| v.as_f64()),
                )
                && ((secs * 1000.0) as u64) > elapsed
            {
                lines.push(format!(
                    "Estimate: up to {} within Telegram's limits ({})",
                    duration_ms((secs * 1000.0) as u64),
                    plural(calls, "API call", "API calls")
                ));
            }
            if job.cancel_requested {
                lines.push("Cancelling at the next safe point…".into());
            }
            if job.attempt > 1 {
                lines.push(format!("(attempt {} of {})", job.attempt, job.max_attempts));
            }
            lines.join("\n")
        }
        _ => final_text(job),
    }
}

/// The progress message of a finished job.
pub fn final_text(job: &Job) -> String {
    let head = format!("{} · {}", title(job), subject(job));
    let took = match (job.started_at, job.finished_at) {
        (Some(s), Some(f)) => format!("\nTook {}", duration_ms((f - s).max(0) as u64)),
        _ => String::new(),
    };
    match job.state {
        JobState::Done => match &job.result {
            Some(JobResult::Backup {
                snapshot,
                files,
                dirs,
                bytes: total,
                bytes_stored,
                warnings,
                duration_ms: d,
                ..
            }) => {
                let mut s = format!(
                    "✅ {head}\nDone: snapshot {snapshot}\nFiles: {} in {}, {}\nNew data stored: {}\nDedup: {}\nDuration: {}",
                    plural(*files, "file", "files"),
                    plural(*dirs, "folder", "folders"),
                    bytes(*total),
                    bytes(*bytes_stored),
                    dedup_figure(*total, *bytes_stored),
                    duration_ms(*d),
                );
                if *warnings > 0 {
                    s.push_str(&format!(
                        "\n⚠️ {} (files skipped)",
                        plural(*warnings, "warning", "warnings")
                    ));
                }
                s
            }
            Some(JobResult::Restore {
                files,
                bytes: total,
                unchanged,
                errors,
                duration_ms: d,
            }) => {
                let mut s = format!(
                    "✅ {head}\nRestored {}, {}\nDuration: {}",
                    plural(*files, "file", "files"),
                    bytes(*total),
                    duration_ms(*d)
                );
                if *unchanged > 0 {
                    s.push_str(&format!(
                        "\n{} already up to date",
                        plural(*unchanged, "file was", "files were")
                    ));
                }
                if !errors.is_empty() {
                    s.push_str(&format!(
                        "\n⚠️ {}:\n{}",
                        plural(errors.len() as u64, "problem", "problems"),
                        list(errors)
                    ));
                }
                s
            }
            Some(JobResult::Verify {
                objects,
                errors,
                duration_ms: d,
            }) => {
                if errors.is_empty() {
                    format!(
                        "✅ {head}\n{} verified, all intact\nDuration: {}",
                        plural(*objects, "pack", "packs"),
                        duration_ms(*d)
                    )
                } else {
                    format!(
                        "⚠️ {head}\n{} in {}:\n{}",
                        plural(errors.len() as u64, "problem", "problems"),
                        plural(*objects, "pack", "packs"),
                        list(errors)
                    )
                }
            }
            Some(JobResult::Get {
                name, size, file, ..
            }) => match file {
                Some(_) => format!(
                    "✅ {head}\n{name} ({}) restored and verified; sent below.",
                    bytes(*size)
                ),
                None => format!(
                    "✅ {head}\n{name} ({}) restored and verified; sent to Saved Messages.",
                    bytes(*size)
                ),
            },
            Some(JobResult::Scrub {
                bytes_read,
                chunks_checked,
                damaged,
                healed,
                unhealed,
                duration_ms: d,
            }) => {
                let icon = if *unhealed > 0 { "⚠️" } else { "✅" };
                let damage = if *damaged == 0 {
                    "no damage".to_string()
                } else {
                    format!("{damaged} damaged chunks: {healed} healed, {unhealed} not")
                };
                format!(
                    "{icon} {head}\nRead {} ({chunks_checked} chunks): {damage}\nDuration: {}",
                    bytes(*bytes_read),
                    duration_ms(*d)
                )
            }
            Some(JobResult::Forget {
                forgotten, kept, ..
            }) => format!(
                "✅ {head}\n{}\n{}",
                forget_summary(*forgotten, *kept),
                PRUNE_HINT
            ),
            Some(JobResult::Prune {
                deleted_packs,
                repacked_packs,
                new_packs,
                moved_bytes,
                freed_bytes,
                sparse_left,
                duration_ms: d,
                ..
            }) => {
                let mut s = format!(
                    "✅ {head}\n{}\nMoved {} of live data into {}\nDuration: {}",
                    prune_summary(*deleted_packs, *repacked_packs, *freed_bytes),
                    bytes(*moved_bytes),
                    plural(*new_packs, "new pack", "new packs"),
                    duration_ms(*d)
                );
                if *sparse_left > 0 {
                    s.push_str(&format!(
                        "\n{} left for a later prune",
                        plural(*sparse_left, "sparse pack", "sparse packs")
                    ));
                }
                s
            }
            Some(JobResult::Conflicts { .. }) | None => format!("✅ {head}\nDone{took}"),
        },
        JobState::Failed => match &job.result {
            Some(JobResult::Conflicts { count, .. }) => {
                format!(
                    "✋ {head}\n{} at the target {} from the backup; nothing was overwritten.",
                    plural(*count, "existing file", "existing files"),
                    if *count == 1 { "differs" } else { "differ" }
                )
            }
            _ => format!("❌ {head}\nFailed{took}"),
        },
        JobState::Cancelled => format!("🛑 {head}\nCancelled{took}"),
        _ => progress(job),
    }
}

fn list(items: &[String]) -> String {
    let mut out: Vec<String> = items.iter().take(10).map(|e| format!("• {e}")).collect();
    if items.len() > 10 {
        out.push(format!("… and {} more", items.len() - 10));
    }
    out.join("\n")
}

/// The short new message that ends every job (the final edit of the progress message makes
/// no sound; this one notifies).
pub fn final_notice(job: &Job) -> String {
    match (&job.state, &job.result) {
        (JobState::Failed, Some(JobResult::Conflicts { count, sample, .. })) => {
            conflict_prompt(job, *count, sample)
        }
        (JobState::Failed, _) => failure_notice(job),
        (JobState::Cancelled, _) => format!("🛑 {} cancelled.", title(job)),
        (
            _,
            Some(JobResult::Backup {
                snapshot,
                files,
                bytes: total,
                bytes_stored,
                warnings,
                ..
            }),
        ) => {
            let mut s = format!(
                "✅ {} done: snapshot {snapshot}, {}, {} ({} new).",
                title(job),
                plural(*files, "file", "files"),
                bytes(*total),
                bytes(*bytes_stored)
            );
            if *warnings > 0 {
                s.push_str(&format!(
                    " ⚠️ {} skipped.",
                    plural(*warnings, "item", "items")
                ));
            }
            s
        }
        (
            _,
            Some(JobResult::Restore {
                files,
                bytes: total,
                errors,
                ..
            }),
        ) => {
            let mut s = format!(
                "✅ {} done: {} restored, {}.",
                title(job),
                plural(*files, "file", "files"),
                bytes(*total)
            );
            if !errors.is_empty() {
                s.push_str(&format!(
                    " ⚠️ {}.",
                    plural(errors.len() as u64, "problem", "problems")
                ));
            }
            s
        }
        (
            _,
            Some(JobResult::Verify {
                objects, errors, ..
            }),
        ) if errors.is_empty() => format!(
            "✅ {} done: {} intact.",
            title(job),
            plural(*objects, "pack", "packs")
        ),
        (_, Some(JobResult::Verify { errors, .. })) => format!(
            "⚠️ {} found {} (listed above).",
            title(job),
            plural(errors.len() as u64, "problem", "problems")
        ),
        (
            _,
            Some(JobResult::Get {
                name,
                size,
                snapshot,
                file: None,
                ..
            }),
        ) => format!(
            "📨 {name} ({}, snapshot {snapshot}) is over the Bot API's 50 MB, so the worker's own Telegram account sent it to its Saved Messages: look there.",
            bytes(*size)
        ),
        (
            _,
            Some(JobResult::Get {
                name,
                size,
                snapshot,
                ..
            }),
        ) => {
            format!("📄 {name} · {} · snapshot {snapshot}", bytes(*size))
        }
        (
            _,
            Some(JobResult::Forget {
                forgotten, kept, ..
            }),
        ) => format!(
            "🗑 {} done: {}",
            title(job),
            forget_summary(*forgotten, *kept)
        ),
        (
            _,
            Some(JobResult::Prune {
                deleted_packs,
                repacked_packs,
                freed_bytes,
                ..
            }),
        ) => format!(
            "🧹 {} done: {}",
            title(job),
            prune_summary(*deleted_packs, *repacked_packs, *freed_bytes)
        ),
        _ => format!("✅ {} done.", title(job)),
    }
}

/// What a finished forget says (the bot's summary and final notice).
fn forget_summary(forgotten: u64, kept: u64) -> String {
    format!(
        "forgot {}, kept {}.",
        plural(forgotten, "snapshot", "snapshots"),
        kept
    )
}

const PRUNE_HINT: &str = "Their storage is freed by the next prune (an admin's /prune, or `storinator-worker prune` on the server).";

/// The `/forget` prompt: what would go, and briefly what stays.
pub fn forget_prompt(
    report: &storinator_shared::ForgetReport,
    policy: &storinator_shared::KeepPolicy,
    tz: &jiff::tz::TimeZone,
) -> String {
    let when = |s: &SnapshotInfo| storinator_shared::ops::schedules::format_local(s.started_at, tz);
    let mut lines = vec![format!(
        "🗑 {} · {}\nWould forget {}:",
        report.root,
        policy,
        plural(report.remove.len() as u64, "snapshot", "snapshots")
    )];
    lines.extend(
        report
            .remove
            .iter()
            .map(|i| format!("• {} · {}", i.snapshot.short_id, when(&i.snapshot))),
    );
    lines.push(format!("Keeps {}:", report.keep.len()));
    const SHOWN: usize = 5;
    lines.extend(report.keep.iter().take(SHOWN).map(|i| {
        format!(
            "• {} · {} ({})",
            i.snapshot.short_id,
            when(&i.snapshot),
            i.reasons.join(", ")
        )
    }));
    if report.keep.len() > SHOWN {
        lines.push(format!("… and {} more", report.keep.len() - SHOWN));
    }
    lines.join("\n")
}

/// The separate notice sent when a job fails.
pub fn failure_notice(job: &Job) -> String {
    let reason = job.error.as_deref().unwrap_or("unknown error");
    format!(
        "❌ {} failed: {reason}\nJob id: {} · {}",
        title(job),
        job.id,
        subject(job)
    )
}

/// The question asked when a restore met existing differing files.
pub fn conflict_prompt(job: &Job, count: u64, sample: &[String]) -> String {
    let mut s = format!(
        "✋ {} · {}\n{} already {} at the target and {} from the backup:\n{}",
        title(job),
        subject(job),
        plural(count, "file", "files"),
        if count == 1 { "exists" } else { "exist" },
        if count == 1 { "differs" } else { "differ" },
        list(sample)
    );
    if (sample.len() as u64) < count {
        s.push_str(&format!("\n… {} in all", plural(count, "file", "files")));
    }
    s.push_str("\nOverwrite them?");
    s
}

/// The notice sent once when a running job's worker stops heartbeating.
pub fn stall_notice(job: &Job) -> String {
    let at = fraction(job)
        .map(|f| format!(" at {:.0}%", f * 100.0))
        .unwrap_or_default();
    format!(
        "⚠️ {} is stalled: the worker stopped responding (phase: {}{at}). It resumes from where it stopped when a worker picks it up again; /cancel {} stops it.",
        title(job),
        job.progress.phase.as_str(),
        job.id
    )
}

/// One line per job for /jobs and /status.
pub fn job_line(job: &Job, now_ms: i64) -> String {
    let state = if job.is_stalled(now_ms) {
        "stalled".to_string()
    } else if job.state == JobState::Running {
        match fraction(job) {
            Some(f) => format!("{} {:.0}%", job.progress.phase.as_str(), f * 100.0),
            None => job.progress.phase.as_str().to_string(),
        }
    } else {
        job.state.as_str().to_string()
    };
    format!(
        "#{} {} · {}{} · {state}",
        job.id,
        job.args.kind(),
        on_host(job.host.as_deref()),
        subject(job)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toasts_are_cut_to_telegrams_200_characters() {
        assert_eq!(toast("Kept."), "Kept.");
        let fits = "a".repeat(200);
        assert_eq!(toast(&fits), fits);
        // 😀 is two UTF-16 units: 150 of them are 300 units, cut to 99 plus the ellipsis.
        let cut = toast(&"😀".repeat(150));
        assert_eq!(cut.encode_utf16().count(), 199);
        assert!(cut.ends_with("😀…"), "{cut}");
        let cut = toast(&"b".repeat(500));
        assert_eq!(cut.encode_utf16().count(), 200);
    }

    /// A running job of `args`, started at 0, last updated at `updated_at`.
    fn running(args: JobArgs, updated_at: i64) -> Job {
        Job {
            id: 1,
            args,
            user_id: 7,
            chat_id: 7,
            state: JobState::Running,
            progress: storinator_shared::ProgressReport {
                phase: storinator_shared::Phase::Uploading,
                files_done: 1,
                files_total: 2,
                bytes_done: 10,
                bytes_total: 20,
                bytes_stored: 5,
            },
            estimate: None,
            result: None,
            error: None,
            attempt: 1,
            max_attempts: 3,
            lease_owner: None,
            lease_until: None,
            not_before: 0,
            cancel_requested: false,
            progress_message_id: None,
            created_at: 0,
            started_at: Some(0),
            updated_at,
            finished_at: None,
            shown_at: 0,
            final_notified: false,
            stall_notified: false,
            throttle: None,
            schedule_id: None,
            owner: None,
            host: None,
        }
    }

    #[test]
    fn the_estimate_goes_once_the_job_ran_longer() {
        let job = |elapsed_ms: i64| Job {
            estimate: Some(
                serde_json::json!({"message_calls": 3, "part_calls": 9, "seconds": 10.0}),
            ),
            ..running(
                JobArgs::Backup {
                    path: "/srv".into(),
                    encrypt: true,
                },
                elapsed_ms,
            )
        };
        let early = progress(&job(2_000));
        assert!(
            early.contains("Estimate: up to 10.0s within Telegram's limits (3 API calls)"),
            "{early}"
        );
        let late = progress(&job(12_000));
        assert!(!late.contains("Estimate"), "{late}");
    }

    /// A prune's progress counts packs deleted and bytes moved; its failure is told with the
    /// reason, like any job's.
    #[test]
    fn a_prune_job_in_progress_and_failed() {
        let args = JobArgs::Prune {
            max_repack: Some(200 << 20),
            repack_below: 30.0,
        };
        let mut job = running(args, 1_000);
        job.progress.phase = storinator_shared::Phase::Pruning;
        let text = progress(&job);
        assert!(
            text.starts_with(
                "🔄 Prune #1 · all backups (repack below 30%, move at most 200.0 MiB)\nPhase: pruning"
            ),
            "{text}"
        );
        assert!(text.contains("1/2 packs deleted · 10 B / 20 B"), "{text}");
        job.state = JobState::Failed;
        job.error = Some("deleting unused packs: storage refused".into());
        assert_eq!(
            final_notice(&job),
            "❌ Prune #1 failed: deleting unused packs: storage refused\nJob id: 1 · all backups (repack below 30%, move at most 200.0 MiB)"
        );
    }

    #[test]
    fn plurals() {
        assert_eq!(plural(1, "file", "files"), "1 file");
        assert_eq!(plural(0, "file", "files"), "0 files");
        assert_eq!(plural(2, "snapshot", "snapshots"), "2 snapshots");
    }

    #[test]
    fn units() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(duration_ms(3200), "3.2s");
        assert_eq!(duration_ms(65_000), "1m 05s");
        assert_eq!(bar(0.5), "[████████░░░░░░░░]");
        assert_eq!(bar(2.0), "[████████████████]");
    }
}

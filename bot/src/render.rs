//! The texts the bot shows: progress messages, summaries, job lists. Pure functions of a
//! [`Job`], so the same job state always renders the same text (and an unchanged job never
//! causes an edit).

use storinator_shared::{Job, JobArgs, JobResult, JobState};

/// `1.5 MiB`, `812 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
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
        JobArgs::Scrub { .. } => "Scrub",
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
        JobArgs::Scrub { bytes: b } => match b {
            Some(b) => format!("read back up to {}", bytes(*b)),
            None => "read back today's share of the packs".into(),
        },
    }
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
                counts.push(format!("{}/{} files", p.files_done, p.files_total));
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
            if let Some(e) = &job.estimate
                && let (Some(calls), Some(secs)) = (
                    e.get("message_calls").and_then(|v| v.as_u64()),
                    e.get("seconds").and_then(|v| v.as_f64()),
                )
            {
                lines.push(format!(
                    "Estimate: ≤ {calls} Telegram API calls, ~{} at current limits",
                    duration_ms((secs * 1000.0) as u64)
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
                let ratio = if *bytes_stored > 0 {
                    format!("{:.1}×", *total as f64 / *bytes_stored as f64)
                } else {
                    "∞ (nothing new)".into()
                };
                let mut s = format!(
                    "✅ {head}\nDone: snapshot {snapshot}\nFiles: {files} in {dirs} folders, {}\nNew data stored: {}\nDedup ratio: {ratio}\nDuration: {}",
                    bytes(*total),
                    bytes(*bytes_stored),
                    duration_ms(*d),
                );
                if *warnings > 0 {
                    s.push_str(&format!("\n⚠️ {warnings} warnings (files skipped)"));
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
                    "✅ {head}\nRestored {files} files, {}\nDuration: {}",
                    bytes(*total),
                    duration_ms(*d)
                );
                if *unchanged > 0 {
                    s.push_str(&format!("\n{unchanged} files were already up to date"));
                }
                if !errors.is_empty() {
                    s.push_str(&format!(
                        "\n⚠️ {} problems:\n{}",
                        errors.len(),
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
                        "✅ {head}\nAll {objects} objects verified\nDuration: {}",
                        duration_ms(*d)
                    )
                } else {
                    format!(
                        "⚠️ {head}\n{} problems in {objects} objects:\n{}",
                        errors.len(),
                        list(errors)
                    )
                }
            }
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
            Some(JobResult::Conflicts { .. }) | None => format!("✅ {head}\nDone{took}"),
        },
        JobState::Failed => match &job.result {
            Some(JobResult::Conflicts { count, .. }) => {
                format!("✋ {head}\n{count} existing files differ; nothing was overwritten.")
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
        "✋ {} · {}\n{count} files already exist at the target and differ from the backup:\n{}",
        title(job),
        subject(job),
        list(sample)
    );
    if (sample.len() as u64) < count {
        s.push_str(&format!("\n… {} files in all", count));
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
        "#{} {} · {} · {state}",
        job.id,
        job.args.kind(),
        subject(job)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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

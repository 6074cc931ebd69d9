//! The bot's unasked messages about unattended work: missed backups and "back to normal",
//! grouped failures of a schedule, scrub damage, the weekly digest. What to say is computed by
//! `shared` (`ops::alerts`) from the database alone, so a dead worker is noticed; this module
//! words it, sends it, and acknowledges it only once Telegram took it (a failed send is tried
//! again on a later pass; nothing is said twice).

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use teloxide::prelude::*;

use storinator_shared::ops::alerts::{
    Alert, AlertKind, Digest, Health, ScheduleStatus, ScrubAlert, times,
};
use storinator_shared::ops::schedules::format_local;

use crate::outbox::{Out, Persistence};
use crate::{App, render};

/// How many bot ticks pass between two looks for alerts.
const TICKS_PER_PASS: u32 = 10;

pub(crate) struct AlertSender {
    app: Arc<App>,
}

impl AlertSender {
    pub(crate) fn new(app: Arc<App>) -> Self {
        AlertSender { app }
    }

    pub(crate) async fn run(self) {
        let period = self.app.cfg.tick * TICKS_PER_PASS;
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.pass().await {
                tracing::warn!("alerts: {e:#}");
            }
        }
    }

    /// True when `owner` is a chat user who may still hear from the bot.
    fn audience(&self, owner: &str) -> Option<u64> {
        let id = owner.strip_prefix("tg:")?.parse::<u64>().ok()?;
        self.app.cfg.is_allowed(id).then_some(id)
    }

    /// Sends `text` to `chat`; true when Telegram took it.
    async fn say(&self, chat: i64, text: String) -> bool {
        // Through the paced outbox like every other message; a refusal is tried again on a
        // later pass.
        let op = Out::Text {
            text: crate::clip(text),
            markup: None,
        };
        match self
            .app
            .outbox
            .send(ChatId(chat), op, Persistence::Normal)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(chat, "alert not sent: {e}");
                false
            }
        }
    }

    /// One look at schedules, scrub runs and digests.
    pub(crate) async fn pass(&self) -> anyhow::Result<()> {
        let alerts = &self.app.alerts;
        let tz = alerts.tz().clone();
        for a in alerts.pending().await? {
            let chat = a.schedule.chat_id;
            // Nobody to tell (the CLI's schedules, users no longer allowed): settle quietly.
            let sent = if chat == 0 || self.audience(&a.schedule.owner).is_none() {
                true
            } else {
                self.say(chat, alert_text(&a, &tz)).await
            };
            if sent {
                alerts.ack(&a).await?;
            }
        }
        for (run, list) in alerts.scrub_alerts().await? {
            let mut all_sent = true;
            for sa in list {
                let chats: Vec<i64> = match &sa.owner {
                    Some(o) => self.audience(o).map(|id| id as i64).into_iter().collect(),
                    None => self
                        .app
                        .cfg
                        .allowed_users
                        .iter()
                        .map(|u| *u as i64)
                        .collect(),
                };
                for chat in chats {
                    all_sent &= self.say(chat, scrub_text(&sa, &tz)).await;
                }
            }
            if all_sent {
                alerts.ack_scrub(run).await?;
            }
        }
        for d in alerts.due_digests().await? {
            if self.audience(&d.owner).is_none() || self.say(d.chat_id, digest_text(&d, &tz)).await
            {
                alerts.ack_digest(&d).await?;
            }
        }
        Ok(())
    }
}

/// The text of a schedule alert.
pub fn alert_text(a: &Alert, tz: &TimeZone) -> String {
    let s = &a.schedule;
    let what = format!("{} (schedule #{}, {})", s.path, s.id, s.spec);
    match &a.kind {
        AlertKind::Missed {
            due_at,
            last_snapshot,
        } => {
            let last = match last_snapshot {
                Some((id, at)) => {
                    format!("The last snapshot is {id} from {}.", format_local(*at, tz))
                }
                None => "There is no snapshot of it yet.".into(),
            };
            format!(
                "⏰ Missed backup: {what} should have had a snapshot by {}. {last}\nIs the worker running? /schedules shows every schedule's state.",
                format_local(*due_at, tz)
            )
        }
        AlertKind::BackToNormal { snapshot } => format!(
            "✅ Back to normal: {what} has a new snapshot, {} ({}).",
            snapshot.0,
            format_local(snapshot.1, tz)
        ),
        AlertKind::Failed {
            streak,
            first: true,
        } if streak.count == 1 => format!(
            "❌ Scheduled backup failed: {what}: {}\nI'll group further failures of this schedule instead of reporting each one.",
            streak.last_error
        ),
        AlertKind::Failed { streak, .. } => format!(
            "❌ Scheduled backup of {what} failed {} since {}: {}",
            times(streak.count),
            format_local(streak.since, tz),
            streak.last_error
        ),
        AlertKind::Recovered { failures } => format!(
            "✅ Scheduled backup of {what} works again, after {failures} failed run{}.",
            if *failures == 1 { "" } else { "s" }
        ),
        AlertKind::ForgetFailed { job_id, error, .. } => format!(
            "⚠️ Keep policy not applied: {what}: {error}\nThe backup (job #{job_id}) is saved; no snapshot was forgotten. The next scheduled backup tries again."
        ),
    }
}

fn file_line(f: &storinator_shared::AffectedFile) -> String {
    let snaps = if f.snapshots.is_empty() {
        String::new()
    } else {
        format!(" (snapshots {})", f.snapshots.join(", "))
    };
    if f.healed {
        format!("• {}{snaps}: healed from the file on disk", f.disk_path())
    } else {
        format!(
            "• {}{snaps}: NOT healed: {}",
            f.disk_path(),
            f.why.as_deref().unwrap_or("no intact copy found")
        )
    }
}

/// The text of a scrub damage alert.
pub fn scrub_text(a: &ScrubAlert, tz: &TimeZone) -> String {
    let r = &a.report;
    let mut lines = vec![format!(
        "🚨 The scrub of {} found damaged data in storage.",
        format_local(r.finished_at, tz)
    )];
    for f in r.findings.iter().take(5) {
        lines.push(format!("• {}", f.reason));
    }
    if !a.files.is_empty() {
        lines.push(format!("Affected files ({}):", a.files.len()));
        lines.extend(a.files.iter().take(20).map(file_line));
        if a.files.len() > 20 {
            lines.push(format!("… and {} more", a.files.len() - 20));
        }
    }
    for m in r.metadata.iter().take(5) {
        lines.push(format!("• {m}"));
    }
    let unhealed = a.files.iter().filter(|f| !f.healed).count();
    lines.push(if unhealed == 0 && r.metadata.is_empty() {
        "Everything affected was stored again; the next restore is whole.".into()
    } else {
        "What is not healed stays listed in /scrub; a backup of the file's current version stores it again.".into()
    });
    lines.join("\n")
}

fn health_icon(h: &Health) -> &'static str {
    match h {
        Health::Ok => "🟢",
        Health::Paused => "⏸",
        Health::Late { .. } => "🟠",
        Health::Failing { .. } => "🔴",
    }
}

/// One line per schedule, as `/schedules` and the digest show them.
pub fn schedule_line(st: &ScheduleStatus, tz: &TimeZone) -> String {
    format!("{} {}", health_icon(&st.health), st.line(tz))
}

/// The weekly digest.
pub fn digest_text(d: &Digest, tz: &TimeZone) -> String {
    let mut lines = vec![format!(
        "📰 Weekly digest, {} – {}",
        format_local(d.from, tz),
        format_local(d.to, tz)
    )];
    lines.push(format!(
        "Snapshots made: {} · new data stored: {}",
        d.stats.snapshots,
        render::bytes(d.stats.new_bytes)
    ));
    lines.push(format!(
        "Total stored: {} in {} snapshots",
        render::bytes(d.stats.all_bytes),
        d.stats.all_snapshots
    ));
    if d.schedules.is_empty() {
        lines.push("Schedules: none (/schedule adds one)".into());
    } else {
        lines.push(format!("Schedules ({}):", d.schedules.len()));
        lines.extend(d.schedules.iter().map(|s| schedule_line(s, tz)));
    }
    lines.push(match &d.last_scrub {
        Some(r) => format!(
            "Last scrub {}: {}",
            format_local(r.finished_at, tz),
            r.line()
        ),
        None => "Last scrub: none yet".into(),
    });
    if d.missing_packs == 0 && d.damaged_chunks == 0 {
        lines.push("Storage: no anomalies".into());
    } else {
        lines.push(format!(
            "Storage: {} packs missing, {} damaged chunks not healed; {} of your files affected (/scrub)",
            d.missing_packs,
            d.damaged_chunks,
            d.affected_files.len()
        ));
    }
    lines.push("/digest off stops these.".into());
    lines.join("\n")
}

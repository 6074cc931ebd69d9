//! What the bot says without being asked about unattended work, computed from the database
//! alone, so it works when the worker is dead (the case that matters most):
//!
//! - **Missed backup**: a schedule with no snapshot of its folder for longer than its period
//!   plus a grace (half a period, at least an hour) gets one alert, and one "back to normal"
//!   when a snapshot arrives.
//! - **Failures**: the first failure of a schedule is told at once; further failures are
//!   grouped into one message at most every `repeat_ms` ("failed 3 times since Mon 03:00:
//!   <last error>"); a success after failures says so.
//! - **Scrub damage**: the owners of affected files hear which files and snapshots, and what
//!   the heal did.
//! - **Storage lanes**: a lane that stops answering or lost packs (what the canary found, see
//!   `engine::canary`), and one back to normal, told to every chat user once per change.
//! - **The weekly digest** (Monday 09:00 in the schedule time zone; `/digest off` opts out).
//!
//! Each alert is computed, sent by the bot, then acknowledged ([`Alerts::ack`]), which
//! records it in the database: a restarted bot neither repeats nor misses one.

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::catalog::{AffectedFile, Catalog, LaneHealth, OwnerStats, ScrubReport};
use crate::ops::schedules::{Cadence, HOUR_MS, Result, Schedule, Schedules, format_local};

/// Days in a week, in milliseconds.
const WEEK_MS: i64 = 7 * 24 * HOUR_MS;

/// Timing of alerts.
#[derive(Clone, Debug)]
pub struct AlertPolicy {
    /// Least grace after a missed slot before the alert (the grace is half a period, at
    /// least this).
    pub min_grace_ms: i64,
    /// Least time between two grouped failure messages of one schedule.
    pub repeat_ms: i64,
    /// When digests go out (cron, in the schedule time zone).
    pub digest_cron: String,
}

impl Default for AlertPolicy {
    fn default() -> Self {
        AlertPolicy {
            min_grace_ms: HOUR_MS,
            repeat_ms: 24 * HOUR_MS,
            digest_cron: "0 9 * * 1".into(),
        }
    }
}

/// How a schedule is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Health {
    Paused,
    /// No snapshot is due yet.
    Ok,
    /// No snapshot since the deadline `due_at`.
    Late {
        due_at: i64,
    },
    /// The latest runs failed.
    Failing {
        count: u64,
        since: i64,
        last_error: String,
    },
}

/// A schedule's recent history, as `/schedules`, the CLI and the digest show it.
#[derive(Clone, Debug)]
pub struct ScheduleStatus {
    pub schedule: Schedule,
    pub health: Health,
    pub next_run: Option<i64>,
    /// The newest snapshot of the folder (short id, time), whoever made it.
    pub last_snapshot: Option<(String, i64)>,
    /// The newest job the schedule fired: its state and when it finished.
    pub last_result: Option<(crate::ops::jobs::JobState, Option<i64>)>,
}

impl ScheduleStatus {
    /// `#3 /srv/data · daily 03:00 · next Tue 31 Mar 03:00 CEST · last snapshot 1a2b3c4d5e6f
    /// (Mon 30 Mar 03:01 CEST) · ok`: one line for the CLI and the chat alike.
    pub fn line(&self, tz: &TimeZone) -> String {
        let s = &self.schedule;
        let host = s
            .host
            .as_deref()
            .map(|h| format!("{h}:"))
            .unwrap_or_default();
        let mut parts = vec![format!("#{} {host}{}", s.id, s.path), s.spec.clone()];
        if !s.encrypt {
            parts.push("unencrypted".into());
        }
        parts.push(match self.next_run {
            Some(t) => format!("next {}", format_local(t, tz)),
            None => "paused".into(),
        });
        parts.push(match &self.last_snapshot {
            Some((id, at)) => format!("last snapshot {id} ({})", format_local(*at, tz)),
            None => "no snapshot yet".into(),
        });
        if let Some((state, at)) = &self.last_result {
            parts.push(match at {
                Some(at) => format!("last run {state} {}", format_local(*at, tz)),
                None => format!("last run {state}"),
            });
        }
        parts.push(self.health.label(tz));
        if let Some(r) = &s.retention {
            parts.push(r.to_string());
        }
        if s.skipped > 0 {
            parts.push(format!(
                "{} slots skipped (previous run still going)",
                s.skipped
            ));
        }
        if s.missed > 0 {
            parts.push(format!("{} slots caught up after downtime", s.missed));
        }
        parts.join(" · ")
    }
}

impl Health {
    /// `ok`, `late (due since …)`, `failing: 3 times since …: <error>`, `paused`.
    pub fn label(&self, tz: &TimeZone) -> String {
        match self {
            Health::Paused => "paused".into(),
            Health::Ok => "ok".into(),
            Health::Late { due_at } => {
                format!("late (a snapshot was due by {})", format_local(*due_at, tz))
            }
            Health::Failing {
                count,
                since,
                last_error,
            } => format!(
                "failing: {} since {}: {last_error}",
                times(*count),
                format_local(*since, tz)
            ),
        }
    }
}

/// `once`, `twice`, `3 times`.
pub fn times(n: u64) -> String {
    match n {
        1 => "once".into(),
        2 => "twice".into(),
        n => format!("{n} times"),
    }
}

/// A failure streak of one schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Streak {
    pub count: u64,
    pub since: i64,
    pub last_error: String,
}

/// What an alert says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AlertKind {
    /// No snapshot since `due_at` (the last one, if any, given).
    Missed {
        due_at: i64,
        last_snapshot: Option<(String, i64)>,
    },
    /// A snapshot arrived after a missed-backup alert.
    BackToNormal { snapshot: (String, i64) },
    /// `streak.count` failures since `streak.since`; `first` for the first of a streak.
    Failed { streak: Streak, first: bool },
    /// A success after `failures` failures.
    Recovered { failures: u64 },
    /// The schedule's keep policy failed to apply after backup job `job_id` (row `id` of
    /// `forget_failures`); the backup itself stands.
    ForgetFailed { id: i64, job_id: i64, error: String },
}

/// An alert about one schedule.
#[derive(Clone, Debug)]
pub struct Alert {
    pub schedule: Schedule,
    pub kind: AlertKind,
}

/// Scrub damage, for one owner (or for every user when `owner` is `None`: damage that
/// affects no file, like snapshot metadata).
#[derive(Clone, Debug)]
pub struct ScrubAlert {
    pub run_id: i64,
    pub owner: Option<String>,
    pub report: ScrubReport,
    /// The owner's affected files (all of them when `owner` is `None`).
    pub files: Vec<AffectedFile>,
}

/// A weekly digest for one user.
#[derive(Clone, Debug)]
pub struct Digest {
    pub owner: String,
    pub chat_id: i64,
    /// The digest slot this digest is for.
    pub slot: i64,
    /// The period it covers.
    pub from: i64,
    pub to: i64,
    pub stats: OwnerStats,
    pub schedules: Vec<ScheduleStatus>,
    pub last_scrub: Option<ScrubReport>,
    /// Storage-side anomalies: packs missing, chunks damaged and not healed, and how many of
    /// this owner's files those affect.
    pub missing_packs: u64,
    pub damaged_chunks: u64,
    pub affected_files: Vec<AffectedFile>,
}

/// Where the scrub's rotation stands (what `/scrub` and `storinator-worker scrub --status`
/// show).
#[derive(Clone, Debug)]
pub struct ScrubStatus {
    /// Packs in rotation order: the next to be read first.
    pub packs: Vec<crate::catalog::ScrubPack>,
    pub bytes_total: u64,
    /// The daily budget and the cycle it gives: every pack is read within `cycle_days`.
    pub budget: u64,
    pub cycle_days: u64,
    pub last: Option<ScrubReport>,
}

impl ScrubStatus {
    /// Reads the rotation from the catalog; `budget` is the configured daily budget.
    pub async fn load(catalog: &Catalog, budget: u64) -> Result<ScrubStatus> {
        let packs = catalog.scrub_queue().await?;
        let bytes_total = packs.iter().map(|p| p.size).sum::<u64>();
        Ok(ScrubStatus {
            cycle_days: bytes_total.div_ceil(budget.max(1)).max(1),
            budget,
            bytes_total,
            packs,
            last: catalog.last_scrub().await?.map(|r| r.report),
        })
    }

    /// A summary line, then (up to `max_packs`) one line per pack, the least recently read
    /// first.
    pub fn lines(&self, tz: &TimeZone, max_packs: usize) -> Vec<String> {
        let read = self
            .packs
            .iter()
            .filter(|p| p.last_read_at.is_some())
            .count();
        let mut out = vec![format!(
            "{} packs, {}; {} a day → every pack is read within {} day{}; {read} of {} read at least once",
            self.packs.len(),
            crate::progress::human_bytes(self.bytes_total),
            crate::progress::human_bytes(self.budget),
            self.cycle_days,
            if self.cycle_days == 1 { "" } else { "s" },
            self.packs.len()
        )];
        out.push(match &self.last {
            Some(r) => format!(
                "last scrub {}: {}",
                format_local(r.finished_at, tz),
                r.line()
            ),
            None => "no scrub has run yet".into(),
        });
        for p in self.packs.iter().take(max_packs) {
            let when = match p.last_read_at {
                Some(t) => format!("last read {}", format_local(t, tz)),
                None => "never read".into(),
            };
            let partial = if p.cursor > 0 {
                format!(", {}% of a pass done", p.cursor * 100 / p.size.max(1))
            } else {
                String::new()
            };
            let state = if p.state == "stored" {
                ""
            } else {
                " (missing)"
            };
            out.push(format!(
                "{} {}{state}: {when}{partial}",
                &p.id[..p.id.len().min(12)],
                crate::progress::human_bytes(p.size)
            ));
        }
        if self.packs.len() > max_packs {
            out.push(format!("… and {} more", self.packs.len() - max_packs));
        }
        out
    }
}

/// The alert queries over the schedules and the catalog.
#[derive(Clone)]
pub struct Alerts {
    schedules: Schedules,
    catalog: Catalog,
    policy: AlertPolicy,
}

impl Alerts {
    pub fn new(schedules: Schedules, policy: AlertPolicy) -> Alerts {
        let catalog = Catalog::from_pool(schedules.pool().clone());
        Alerts {
            schedules,
            catalog,
            policy,
        }
    }

    pub fn schedules(&self) -> &Schedules {
        &self.schedules
    }

    pub fn tz(&self) -> &TimeZone {
        self.schedules.tz()
    }

    fn now(&self) -> i64 {
        self.schedules.now_ms()
    }

    /// The failures of a schedule since its last success (failed jobs and refused slots).
    pub async fn streak(&self, s: &Schedule) -> Result<Option<Streak>> {
        let pool = self.schedules.pool();
        let last_ok: Option<i64> = sqlx::query_scalar(
            "SELECT max(finished_at) FROM jobs WHERE schedule_id = $1 AND state = 'done'",
        )
        .bind(s.id)
        .fetch_one(pool)
        .await?;
        let last_ok = last_ok.unwrap_or(0);
        let rows = sqlx::query(
            "SELECT finished_at AS at, coalesce(error, 'failed') AS why FROM jobs
              WHERE schedule_id = $1 AND state = 'failed' AND finished_at > $2
             UNION ALL
             SELECT created_at, coalesce(detail, 'refused') FROM schedule_runs
              WHERE schedule_id = $1 AND outcome = 'refused' AND created_at > $2
             ORDER BY at",
        )
        .bind(s.id)
        .bind(last_ok)
        .fetch_all(pool)
        .await?;
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(None);
        };
        Ok(Some(Streak {
            count: rows.len() as u64,
            since: first.try_get(0)?,
            last_error: last.try_get(1)?,
        }))
    }

    /// The deadline for the next snapshot of a schedule's folder, and the latest snapshot.
    async fn deadline(&self, s: &Schedule) -> Result<(Option<i64>, Option<(String, i64)>)> {
        let last = self.catalog.latest_snapshot_of(&s.owner, &s.path).await?;
        let since = last.as_ref().map(|l| l.1).unwrap_or(0).max(s.baseline_at);
        let cadence: Cadence = s.cadence()?;
        let tz = self.tz();
        let due = cadence.next_after(since, s.anchor_at, tz).map(|first| {
            let period = cadence
                .period_after(since, s.anchor_at, tz)
                .unwrap_or(24 * HOUR_MS);
            first + (period / 2).max(self.policy.min_grace_ms)
        });
        Ok((due, last))
    }

    /// How a schedule is doing, with its next run and last results.
    pub async fn status(&self, s: &Schedule) -> Result<ScheduleStatus> {
        let (due, last_snapshot) = self.deadline(s).await?;
        let streak = self.streak(s).await?;
        let health = if s.paused {
            Health::Paused
        } else if let Some(st) = streak {
            Health::Failing {
                count: st.count,
                since: st.since,
                last_error: st.last_error,
            }
        } else if let Some(due_at) = due.filter(|d| self.now() > *d) {
            Health::Late { due_at }
        } else {
            Health::Ok
        };
        let last_result = self
            .schedules
            .last_job(s.id)
            .await?
            .map(|j| (j.state, j.finished_at));
        Ok(ScheduleStatus {
            next_run: self.schedules.next_run(s),
            schedule: s.clone(),
            health,
            last_snapshot,
            last_result,
        })
    }

    /// `owner`'s schedules with their status (what `/schedules` lists).
    pub async fn statuses(&self, owner: &str) -> Result<Vec<ScheduleStatus>> {
        let mut out = Vec::new();
        for s in self.schedules.list(owner).await? {
            out.push(self.status(&s).await?);
        }
        Ok(out)
    }

    /// Alerts about schedules that are due now.
    pub async fn pending(&self) -> Result<Vec<Alert>> {
        let now = self.now();
        let mut out = Vec::new();
        for s in self.schedules.all_backups().await? {
            if s.paused {
                continue;
            }
            let (due, last) = self.deadline(&s).await?;
            let late = due.is_some_and(|d| now > d);
            match (late, s.missed_alert_at, &last) {
                (true, None, _) => out.push(Alert {
                    kind: AlertKind::Missed {
                        due_at: due.unwrap_or(now),
                        last_snapshot: last.clone(),
                    },
                    schedule: s.clone(),
                }),
                (false, Some(_), Some(snap)) => out.push(Alert {
                    kind: AlertKind::BackToNormal {
                        snapshot: snap.clone(),
                    },
                    schedule: s.clone(),
                }),
                _ => {}
            }
            match self.streak(&s).await? {
                Some(st) if st.count > s.failures_reported => {
                    let first = s.failures_reported == 0;
                    let quiet = s
                        .failure_alert_at
                        .is_some_and(|at| now - at < self.policy.repeat_ms);
                    if first || !quiet {
                        out.push(Alert {
                            kind: AlertKind::Failed { streak: st, first },
                            schedule: s.clone(),
                        });
                    }
                }
                None if s.failures_reported > 0 => out.push(Alert {
                    kind: AlertKind::Recovered {
                        failures: s.failures_reported,
                    },
                    schedule: s.clone(),
                }),
                _ => {}
            }
        }
        out.extend(self.forget_failures().await?);
        Ok(out)
    }

    /// Keep policies that failed to apply and were not told yet, oldest first (paused
    /// schedules too: the failure happened all the same).
    async fn forget_failures(&self) -> Result<Vec<Alert>> {
        let rows = sqlx::query(
            "SELECT id, schedule_id, job_id, error FROM forget_failures
             WHERE alerted_at IS NULL ORDER BY id",
        )
        .fetch_all(self.schedules.pool())
        .await?;
        let mut out = Vec::new();
        for r in rows {
            // A schedule removed since takes its rows with it (ON DELETE CASCADE).
            let Some(schedule) = self.schedules.get(r.try_get("schedule_id")?).await? else {
                continue;
            };
            out.push(Alert {
                schedule,
                kind: AlertKind::ForgetFailed {
                    id: r.try_get("id")?,
                    job_id: r.try_get("job_id")?,
                    error: r.try_get("error")?,
                },
            });
        }
        Ok(out)
    }

    /// Records that an alert was delivered.
    pub async fn ack(&self, alert: &Alert) -> Result<()> {
        let now = self.now();
        let pool = self.schedules.pool();
        let q = match &alert.kind {
            AlertKind::Missed { .. } => {
                sqlx::query("UPDATE schedules SET missed_alert_at = $1 WHERE id = $2").bind(now)
            }
            AlertKind::BackToNormal { .. } => {
                sqlx::query("UPDATE schedules SET missed_alert_at = NULL WHERE id = $1")
            }
            AlertKind::Failed { streak, .. } => sqlx::query(
                "UPDATE schedules SET failures_reported = $1, failure_alert_at = $2 WHERE id = $3",
            )
            .bind(streak.count as i64)
            .bind(now),
            AlertKind::Recovered { .. } => sqlx::query(
                "UPDATE schedules SET failures_reported = 0, failure_alert_at = NULL WHERE id = $1",
            ),
            AlertKind::ForgetFailed { id, .. } => {
                sqlx::query("UPDATE forget_failures SET alerted_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(*id)
                    .execute(pool)
                    .await?;
                return Ok(());
            }
        };
        q.bind(alert.schedule.id).execute(pool).await?;
        Ok(())
    }

    /// Scrub runs whose damage was not told yet, as one alert per affected owner. A run with
    /// nothing to tell comes back with no alerts (acknowledge it all the same).
    pub async fn scrub_alerts(&self) -> Result<Vec<(i64, Vec<ScrubAlert>)>> {
        let runs = self.catalog.scrubs_to_alert().await?;
        let mut out = Vec::new();
        for run in runs {
            let r = &run.report;
            let mut alerts: Vec<ScrubAlert> = Vec::new();
            // News only: damage found for the first time, or healed. Damage already told
            // and still unhealed is not repeated every day (/scrub and the digest list it).
            if !r.findings.is_empty() || r.healed_chunks > 0 {
                let mut owners: Vec<String> = r.affected.iter().map(|f| f.owner.clone()).collect();
                owners.sort();
                owners.dedup();
                for owner in owners {
                    alerts.push(ScrubAlert {
                        run_id: run.id,
                        files: r
                            .affected
                            .iter()
                            .filter(|f| f.owner == owner)
                            .cloned()
                            .collect(),
                        owner: Some(owner),
                        report: r.clone(),
                    });
                }
                if alerts.is_empty() {
                    alerts.push(ScrubAlert {
                        run_id: run.id,
                        owner: None,
                        report: r.clone(),
                        files: Vec::new(),
                    });
                }
            }
            out.push((run.id, alerts));
        }
        Ok(out)
    }

    pub async fn ack_scrub(&self, run_id: i64) -> Result<()> {
        Ok(self.catalog.mark_scrub_alerted(run_id).await?)
    }

    /// Storage lanes whose health changed since chat users were last told: one that stopped
    /// answering or lost packs, or one back to normal after that.
    pub async fn lane_alerts(&self) -> Result<Vec<LaneHealth>> {
        Ok(self
            .catalog
            .lane_health()
            .await?
            .into_iter()
            .filter(LaneHealth::is_news)
            .collect())
    }

    /// Records that a lane's alert was delivered.
    pub async fn ack_lane(&self, h: &LaneHealth) -> Result<()> {
        Ok(self
            .catalog
            .lane_told(&h.probe.lane, h.probe.state, h.probe.missing)
            .await?)
    }

    /// The digest slot at or before now.
    fn digest_slot(&self) -> Result<Option<i64>> {
        let c = Cadence::cron(&self.policy.digest_cron)?;
        Ok(c.last_at_or_before(self.now(), 0, self.tz()))
    }

    /// Turns `owner`'s weekly digest on or off (answering in `chat_id`).
    pub async fn set_digest(&self, owner: &str, chat_id: i64, on: bool) -> Result<()> {
        let slot = self.digest_slot()?.unwrap_or(0);
        sqlx::query(
            "INSERT INTO user_settings (owner, chat_id, digest, last_digest_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (owner) DO UPDATE SET chat_id = excluded.chat_id, digest = excluded.digest",
        )
        .bind(owner)
        .bind(chat_id)
        .bind(on)
        .bind(slot)
        .execute(self.schedules.pool())
        .await?;
        Ok(())
    }

    /// Whether `owner` gets the digest.
    pub async fn digest_on(&self, owner: &str) -> Result<bool> {
        let on: Option<i64> =
            sqlx::query_scalar("SELECT digest FROM user_settings WHERE owner = $1")
                .bind(owner)
                .fetch_optional(self.schedules.pool())
                .await?;
        Ok(on.is_none_or(|v| v != 0))
    }

    /// Digests due now: one per chat user with schedules or snapshots whose last digest is
    /// older than the current digest slot. A user seen for the first time starts with the
    /// next slot (no digest of a week they weren't here for).
    pub async fn due_digests(&self) -> Result<Vec<Digest>> {
        let Some(slot) = self.digest_slot()? else {
            return Ok(Vec::new());
        };
        let pool = self.schedules.pool();
        let mut owners = self.catalog.owners().await?;
        let scheduled: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT owner FROM schedules WHERE kind = 'backup'")
                .fetch_all(pool)
                .await?;
        owners.extend(scheduled);
        owners.sort();
        owners.dedup();
        let mut out = Vec::new();
        for owner in owners {
            let Some(user) = owner
                .strip_prefix("tg:")
                .and_then(|u| u.parse::<i64>().ok())
            else {
                continue;
            };
            sqlx::query(
                "INSERT INTO user_settings (owner, chat_id, last_digest_at) VALUES ($1, $2, $3)
                 ON CONFLICT (owner) DO NOTHING",
            )
            .bind(&owner)
            .bind(user)
            .bind(slot)
            .execute(pool)
            .await?;
            let row = sqlx::query(
                "SELECT chat_id, digest, last_digest_at FROM user_settings WHERE owner = $1",
            )
            .bind(&owner)
            .fetch_one(pool)
            .await?;
            let (chat_id, on, last): (i64, i64, i64) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if on == 0 || last >= slot {
                continue;
            }
            out.push(self.digest(&owner, chat_id, slot, last).await?);
        }
        Ok(out)
    }

    /// The digest of `owner` for the week ending at `slot`.
    pub async fn digest(&self, owner: &str, chat_id: i64, slot: i64, last: i64) -> Result<Digest> {
        let to = self.now();
        let from = if last > 0 { last } else { slot - WEEK_MS };
        let stats = self.catalog.owner_stats(owner, from, to).await?;
        let (missing_packs, damaged_chunks) = self.catalog.anomalies().await?;
        let last_scrub = self.catalog.last_scrub().await?.map(|r| r.report);
        let affected_files = last_scrub
            .as_ref()
            .map(|r| {
                r.affected
                    .iter()
                    .filter(|f| f.owner == owner && !f.healed)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Ok(Digest {
            owner: owner.to_string(),
            chat_id,
            slot,
            from,
            to,
            stats,
            schedules: self.statuses(owner).await?,
            last_scrub,
            missing_packs,
            damaged_chunks,
            affected_files,
        })
    }

    /// Records that a digest went out.
    pub async fn ack_digest(&self, d: &Digest) -> Result<()> {
        sqlx::query(
            "UPDATE user_settings SET last_digest_at = CASE WHEN last_digest_at > $1 THEN last_digest_at ELSE $1 END WHERE owner = $2",
        )
        .bind(d.slot)
        .bind(&d.owner)
        .execute(self.schedules.pool())
        .await?;
        Ok(())
    }
}

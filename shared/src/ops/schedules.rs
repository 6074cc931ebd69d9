//! Schedules: backups that run themselves.
//!
//! A schedule names a folder, an owner and a cadence. Calendar cadences (`hourly`, `daily
//! 03:00`, `weekly mon 03:00`, a quoted cron expression) are all turned into a cron pattern
//! and evaluated by `croner` on `jiff` zoned times in the schedule time zone
//! (`STORINATOR_TIMEZONE`), so daylight saving time is handled by maintained code: a time that
//! does not exist on the day clocks go forward runs at the first valid time after it, a time
//! that happens twice on the day they go back runs once. `every <N>h` counts elapsed time from
//! the schedule's creation: six hours stay six hours across a change.
//!
//! Firing ([`Schedules::fire_due`]) is exactly once per slot: each handled slot gets a row in
//! `schedule_runs` whose primary key is (schedule, slot), inserted in the same transaction as
//! the job, so two daemons, or one restarted in the middle, can never queue a slot twice.
//! After downtime the latest passed slot fires once (a catch-up) and the slots before it are
//! counted, not replayed. A slot whose previous job is still queued or running is skipped and
//! counted.

use std::sync::Arc;

use crate::catalog::DbRow;
use crate::catalog::Pool;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::clock::SharedClock;
use crate::ops::jobs::{Job, JobArgs, JobError, Jobs, NewJob};
use crate::ops::rules::FireRules;

/// Milliseconds in an hour.
pub const HOUR_MS: i64 = 3_600_000;
/// The time a `daily` or `weekly` schedule runs when none is given.
pub const DEFAULT_TIME: (u8, u8) = (3, 0);
/// Most slots counted one by one when a scheduler catches up; beyond it the count saturates.
const COUNT_LIMIT: u64 = 100_000;

/// Errors of the schedules table.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A schedule or policy as typed by a person could not be read.
    #[error("{0}")]
    Invalid(String),
    #[error("schedule {0} not found")]
    NotFound(i64),
    #[error("schedule {id}: bad {field} in the schedules table: {message}")]
    Corrupt {
        id: i64,
        field: &'static str,
        message: String,
    },
    #[error("schedules: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Catalog(#[from] crate::error::Error),
}

pub type Result<T, E = ScheduleError> = std::result::Result<T, E>;

// ---- cadences ---------------------------------------------------------------------------------

/// How often a schedule fires.
#[derive(Clone, Debug)]
pub enum Cadence {
    /// A cron pattern, evaluated in the schedule time zone.
    Cron(Box<Cron>),
    /// Every so many milliseconds of elapsed time from the schedule's anchor.
    Every(i64),
}

fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

fn zoned(ms: i64, tz: &TimeZone) -> Option<jiff::Zoned> {
    Some(
        jiff::Timestamp::from_millisecond(ms)
            .ok()?
            .to_zoned(tz.clone()),
    )
}

impl Cadence {
    /// Parses a five-field cron pattern (minute hour day-of-month month day-of-week).
    pub fn cron(pattern: &str) -> Result<Cadence> {
        let fields = pattern.split_whitespace().count();
        if !pattern.trim_start().starts_with('@') && fields != 5 {
            return Err(ScheduleError::Invalid(format!(
                "{pattern:?} has {fields} fields; a cron expression has 5: minute hour day-of-month month day-of-week"
            )));
        }
        let cron = cron_parser().parse(pattern).map_err(|e| {
            ScheduleError::Invalid(format!("{pattern:?} is not a cron expression: {e}"))
        })?;
        Ok(Cadence::Cron(Box::new(cron)))
    }

    fn from_row(id: i64, cron: Option<&str>, every_ms: Option<i64>) -> Result<Cadence> {
        let corrupt = |message: String| ScheduleError::Corrupt {
            id,
            field: "cadence",
            message,
        };
        match (cron, every_ms) {
            (Some(c), None) => Cadence::cron(c).map_err(|e| corrupt(e.to_string())),
            (None, Some(ms)) if ms > 0 => Ok(Cadence::Every(ms)),
            _ => Err(corrupt("neither a cron pattern nor a period".into())),
        }
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: i64, anchor: i64, tz: &TimeZone) -> Option<i64> {
        match self {
            Cadence::Every(p) => {
                let k = if t < anchor {
                    1
                } else {
                    (t - anchor).div_euclid(*p) + 1
                };
                Some(anchor + k.max(1) * p)
            }
            Cadence::Cron(c) => {
                let z = zoned(t, tz)?;
                let next = c.find_next_occurrence(&z, false).ok()?;
                Some(next.timestamp().as_millisecond())
            }
        }
    }

    /// The last slot at or before `t`, if there is one (an `every` schedule has none before
    /// its first period has passed).
    pub fn last_at_or_before(&self, t: i64, anchor: i64, tz: &TimeZone) -> Option<i64> {
        match self {
            Cadence::Every(p) => {
                let k = (t - anchor).div_euclid(*p);
                (k >= 1).then(|| anchor + k * p)
            }
            Cadence::Cron(c) => {
                let z = zoned(t, tz)?;
                let prev = c.find_previous_occurrence(&z, true).ok()?;
                Some(prev.timestamp().as_millisecond())
            }
        }
    }

    /// Slots in `[from, to)`, counted up to a limit.
    pub fn count_between(&self, from: i64, to: i64, anchor: i64, tz: &TimeZone) -> u64 {
        if to <= from {
            return 0;
        }
        if let Cadence::Every(p) = self {
            let first = self.next_after(from - 1, anchor, tz).unwrap_or(to);
            return if first >= to {
                0
            } else {
                ((to - 1 - first) / p + 1) as u64
            };
        }
        let mut n = 0;
        let mut t = from - 1;
        while let Some(s) = self.next_after(t, anchor, tz) {
            if s >= to || n >= COUNT_LIMIT {
                break;
            }
            n += 1;
            t = s;
        }
        n
    }

    /// The time between the slot after `t` and the one after that: the schedule's period
    /// around `t` (a cron pattern's gaps need not be equal).
    pub fn period_after(&self, t: i64, anchor: i64, tz: &TimeZone) -> Option<i64> {
        let a = self.next_after(t, anchor, tz)?;
        let b = self.next_after(a, anchor, tz)?;
        Some(b - a)
    }
}

/// A cadence as a person typed it, and how it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct When {
    /// The normalised form shown back (`daily 03:00`, `every 6h`, `"0 3 * * 1-5"`).
    pub spec: String,
    pub cron: Option<String>,
    pub every_ms: Option<i64>,
}

impl When {
    pub fn cadence(&self) -> Result<Cadence> {
        Cadence::from_row(0, self.cron.as_deref(), self.every_ms)
    }
}

const DAYS: [(&str, &str, u8); 7] = [
    ("sun", "sunday", 0),
    ("mon", "monday", 1),
    ("tue", "tuesday", 2),
    ("wed", "wednesday", 3),
    ("thu", "thursday", 4),
    ("fri", "friday", 5),
    ("sat", "saturday", 6),
];

fn weekday(word: &str) -> Option<(&'static str, u8)> {
    let w = word.to_ascii_lowercase();
    DAYS.iter()
        .find(|(short, long, _)| {
            w == *short || w == *long || (w.len() >= 3 && long.starts_with(&w))
        })
        .map(|(short, _, n)| (*short, *n))
}

const WHEN_USAGE: &str =
    "hourly, daily [HH:MM], weekly <day> [HH:MM], every <N>h, or a cron expression in quotes";

/// Reads the words of a cadence from the front of `words`; returns it and the number of words
/// used. A cron expression arrives as one word (the quoted text).
fn when_words(words: &[&str]) -> Result<(When, usize)> {
    let bad = |m: String| ScheduleError::Invalid(format!("{m}\nhint: a schedule is {WHEN_USAGE}"));
    let first = words
        .first()
        .ok_or_else(|| bad("when should it run?".into()))?;
    let time_at = |i: usize| -> Result<(Option<(u8, u8)>, usize)> {
        match words.get(i) {
            Some(w) if w.contains(':') => crate::config::parse_hh_mm(w)
                .map(|t| (Some(t), 1))
                .map_err(bad),
            _ => Ok((None, 0)),
        }
    };
    let cron = |m: u8, h: u8, dow: &str| Some(format!("{m} {h} * * {dow}"));
    let (when, used) = match first.to_ascii_lowercase().as_str() {
        "hourly" => (
            When {
                spec: "hourly".into(),
                cron: Some("0 * * * *".into()),
                every_ms: None,
            },
            1,
        ),
        "daily" => {
            let (t, n) = time_at(1)?;
            let (h, m) = t.unwrap_or(DEFAULT_TIME);
            (
                When {
                    spec: format!("daily {h:02}:{m:02}"),
                    cron: cron(m, h, "*"),
                    every_ms: None,
                },
                1 + n,
            )
        }
        "weekly" => {
            let day = words
                .get(1)
                .ok_or_else(|| bad("weekly on which day? (mon, tue, ...)".into()))?;
            let (short, n) =
                weekday(day).ok_or_else(|| bad(format!("{day:?} is not a day of the week")))?;
            let (t, k) = time_at(2)?;
            let (h, m) = t.unwrap_or(DEFAULT_TIME);
            (
                When {
                    spec: format!("weekly {short} {h:02}:{m:02}"),
                    cron: cron(m, h, &n.to_string()),
                    every_ms: None,
                },
                2 + k,
            )
        }
        "every" => {
            // every 6h | every 6 h | every 6 hours
            let w1 = words
                .get(1)
                .ok_or_else(|| bad("every how many hours? (every 6h)".into()))?;
            let (num, used) = match w1.strip_suffix('h') {
                Some(n) => (n, 2),
                None => match words.get(2).map(|w| w.to_ascii_lowercase()) {
                    Some(u) if ["h", "hour", "hours"].contains(&u.as_str()) => (*w1, 3),
                    _ => return Err(bad(format!("every {w1}: give hours, like every 6h"))),
                },
            };
            let n: i64 = num
                .parse()
                .ok()
                .filter(|n| (1..=24 * 366).contains(n))
                .ok_or_else(|| {
                    bad(format!(
                        "every {w1}: hours must be a whole number from 1 to 8784"
                    ))
                })?;
            (
                When {
                    spec: format!("every {n}h"),
                    cron: None,
                    every_ms: Some(n * HOUR_MS),
                },
                used,
            )
        }
        _ => {
            let pattern = first.trim_matches(|c| c == '"' || c == '\'');
            Cadence::cron(pattern).map_err(|e| bad(e.to_string()))?;
            (
                When {
                    spec: format!("\"{pattern}\""),
                    cron: Some(pattern.to_string()),
                    every_ms: None,
                },
                1,
            )
        }
    };
    Ok((when, used))
}

/// Parses a cadence (`daily 03:00`, `every 6h`, `0 3 * * 1-5`, ...).
pub fn parse_when(text: &str) -> Result<When> {
    let text = text.trim();
    let words: Vec<&str> = if text.starts_with(['"', '\'']) || looks_like_cron(text) {
        vec![text]
    } else {
        text.split_whitespace().collect()
    };
    let (when, used) = when_words(&words)?;
    if used < words.len() {
        return Err(ScheduleError::Invalid(format!(
            "unexpected {:?} after {}\nhint: a schedule is {WHEN_USAGE}",
            words[used..].join(" "),
            when.spec
        )));
    }
    Ok(when)
}

fn looks_like_cron(text: &str) -> bool {
    let first = text.split_whitespace().next().unwrap_or("");
    !first.is_empty()
        && first
            .chars()
            .all(|c| c.is_ascii_digit() || "*/,-".contains(c))
}

// ---- retention policies -----------------------------------------------------------------------

/// Which snapshots a schedule keeps: the engine's keep policy (one parser, one set of rules
/// with `forget`), applied by the daemon after each successful backup of the schedule.
pub use crate::engine::policy::KeepPolicy as RetentionPolicy;

/// Parses a schedule's `keep daily 7 weekly 4 …`.
pub fn parse_retention(text: &str) -> Result<RetentionPolicy> {
    RetentionPolicy::parse(text).map_err(ScheduleError::Invalid)
}

// ---- what /schedule and `schedule add` ask for ---------------------------------------------------

/// A schedule request as typed in chat: `<path> <when> [keep ...] [unencrypted]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleRequest {
    pub path: String,
    pub when: When,
    pub retention: Option<RetentionPolicy>,
    pub encrypt: bool,
}

/// Usage of `/schedule`.
pub const SCHEDULE_USAGE: &str = "Usage: /schedule <path> <when> [keep daily 7 weekly 4 monthly 12] [unencrypted]\n<when> is hourly, daily [HH:MM], weekly <day> [HH:MM], every <N>h, or a cron expression in quotes (\"0 3 * * 1-5\")";

/// Reads the options after the cadence: `keep ...` and `unencrypted`.
fn options(words: &[&str]) -> Result<(Option<RetentionPolicy>, bool)> {
    let mut words = words.to_vec();
    let mut encrypt = true;
    if words
        .last()
        .is_some_and(|w| matches!(*w, "unencrypted" | "--unencrypted" | "plain"))
    {
        words.pop();
        encrypt = false;
    }
    let retention = match words.first() {
        None => None,
        Some(w) if w.eq_ignore_ascii_case("keep") => Some(parse_retention(&words.join(" "))?),
        Some(_) => {
            return Err(ScheduleError::Invalid(format!(
                "unexpected {:?}\n{SCHEDULE_USAGE}",
                words.join(" ")
            )));
        }
    };
    Ok((retention, encrypt))
}

/// Parses `/schedule`'s arguments. The path may contain spaces (or be quoted); it ends where
/// the cadence begins.
pub fn parse_schedule_request(raw: &str) -> Result<ScheduleRequest> {
    let raw = raw.trim();
    let bad = |m: &str| ScheduleError::Invalid(format!("{m}\n{SCHEDULE_USAGE}"));
    if raw.is_empty() {
        return Err(bad("what should I back up, and when?"));
    }
    // A quoted path comes first.
    let (path, rest) = if let Some(stripped) = raw.strip_prefix('"')
        && let Some(end) = stripped.find('"')
        && stripped[end + 1..].starts_with(char::is_whitespace)
    {
        (
            stripped[..end].to_string(),
            stripped[end + 1..].trim_start(),
        )
    } else {
        ("".to_string(), raw)
    };
    let try_from = |path: &str, rest: &str| -> Result<ScheduleRequest> {
        let (when, used, tail) = if let Some(q) = rest.strip_prefix('"') {
            let end = q
                .find('"')
                .ok_or_else(|| bad("the cron expression's closing quote is missing"))?;
            let (w, n) = when_words(&[&q[..end]])?;
            (w, n, q[end + 1..].split_whitespace().collect::<Vec<_>>())
        } else {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let (w, n) = when_words(&words)?;
            (w, 0, words[n..].to_vec())
        };
        let _ = used;
        let (retention, encrypt) = options(&tail)?;
        Ok(ScheduleRequest {
            path: path.to_string(),
            when,
            retention,
            encrypt,
        })
    };
    if !path.is_empty() {
        return try_from(&path, rest);
    }
    // Unquoted path: the cadence starts at the first word (after at least one) from which
    // the rest reads as a schedule.
    let mut last_err = None;
    for (i, _) in raw.match_indices(' ') {
        let (head, tail) = (raw[..i].trim(), raw[i..].trim_start());
        if head.is_empty() || tail.is_empty() {
            continue;
        }
        let starts_when = tail.starts_with('"')
            || ["hourly", "daily", "weekly", "every"]
                .iter()
                .any(|k| tail.len() >= k.len() && tail[..k.len()].eq_ignore_ascii_case(k));
        if !starts_when {
            continue;
        }
        match try_from(head, tail) {
            Ok(r) => return Ok(r),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| bad("when should it run?")))
}

// ---- rows -------------------------------------------------------------------------------------

/// What a schedule fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Backup,
    /// The daily scrub (one, owned by `system`).
    Scrub,
}

impl ScheduleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Backup => "backup",
            ScheduleKind::Scrub => "scrub",
        }
    }
}

/// One row of the schedules table.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub id: i64,
    pub kind: ScheduleKind,
    pub owner: String,
    pub user_id: i64,
    pub chat_id: i64,
    pub path: String,
    pub spec: String,
    pub cron: Option<String>,
    pub every_ms: Option<i64>,
    pub anchor_at: i64,
    pub encrypt: bool,
    pub retention: Option<RetentionPolicy>,
    pub paused: bool,
    pub created_at: i64,
    pub baseline_at: i64,
    pub next_slot: i64,
    pub skipped: u64,
    pub missed: u64,
    pub missed_alert_at: Option<i64>,
    pub failures_reported: u64,
    pub failure_alert_at: Option<i64>,
    /// The storage host whose daemons fire it and whose workers run its jobs (`None`: any;
    /// see [`super::hosts`]).
    pub host: Option<String>,
}

impl Schedule {
    pub(crate) fn from_row(row: &DbRow) -> Result<Schedule> {
        let id: i64 = row.try_get("id")?;
        let kind = match row.try_get::<String, _>("kind")?.as_str() {
            "backup" => ScheduleKind::Backup,
            "scrub" => ScheduleKind::Scrub,
            other => {
                return Err(ScheduleError::Corrupt {
                    id,
                    field: "kind",
                    message: other.to_string(),
                });
            }
        };
        let retention: Option<String> = row.try_get("retention")?;
        let retention = retention
            .map(|r| parse_retention(&r))
            .transpose()
            .map_err(|e| ScheduleError::Corrupt {
                id,
                field: "retention",
                message: e.to_string(),
            })?;
        let u = |name: &str| -> Result<u64> { Ok(row.try_get::<i64, _>(name)?.max(0) as u64) };
        Ok(Schedule {
            id,
            kind,
            owner: row.try_get("owner")?,
            user_id: row.try_get("user_id")?,
            chat_id: row.try_get("chat_id")?,
            path: row.try_get("path")?,
            spec: row.try_get("spec")?,
            cron: row.try_get("cron")?,
            every_ms: row.try_get("every_ms")?,
            anchor_at: row.try_get("anchor_at")?,
            encrypt: row.try_get::<i64, _>("encrypt")? != 0,
            retention,
            paused: row.try_get::<i64, _>("paused")? != 0,
            created_at: row.try_get("created_at")?,
            baseline_at: row.try_get("baseline_at")?,
            next_slot: row.try_get("next_slot")?,
            skipped: u("skipped")?,
            missed: u("missed")?,
            missed_alert_at: row.try_get("missed_alert_at")?,
            failures_reported: u("failures_reported")?,
            failure_alert_at: row.try_get("failure_alert_at")?,
            host: row.try_get("host")?,
        })
    }

    pub fn cadence(&self) -> Result<Cadence> {
        Cadence::from_row(self.id, self.cron.as_deref(), self.every_ms)
    }

    /// The job this schedule fires.
    pub fn job_args(&self) -> JobArgs {
        match self.kind {
            ScheduleKind::Backup => JobArgs::Backup {
                path: self.path.clone(),
                encrypt: self.encrypt,
            },
            ScheduleKind::Scrub => JobArgs::Scrub { bytes: None },
        }
    }
}

/// A new schedule.
#[derive(Clone, Debug)]
pub struct NewSchedule {
    pub owner: String,
    pub user_id: i64,
    pub chat_id: i64,
    /// Canonical path (checked by the caller).
    pub path: String,
    pub when: When,
    pub encrypt: bool,
    pub retention: Option<RetentionPolicy>,
    /// The host that serves the path (`None`: any worker; see [`super::hosts::route`]).
    pub host: Option<String>,
}

/// What happened to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// A job was queued.
    Queued,
    /// The previous job of the schedule was still queued or running.
    Skipped,
    /// The owner may no longer back up the path (see the detail).
    Refused,
}

impl RunOutcome {
    fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Queued => "queued",
            RunOutcome::Skipped => "skipped",
            RunOutcome::Refused => "refused",
        }
    }
}

/// A slot a scheduler handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fired {
    pub schedule_id: i64,
    pub slot: i64,
    pub outcome: RunOutcome,
    pub job_id: Option<i64>,
    /// The slot was handled late, after slots that passed unhandled (`missed` of them).
    pub catch_up: bool,
    pub missed: u64,
    pub detail: Option<String>,
}

/// The schedules table over the job table's pool. Cheap to clone.
#[derive(Clone)]
pub struct Schedules {
    jobs: Jobs,
    tz: TimeZone,
}

impl Schedules {
    pub fn new(jobs: Jobs, tz: TimeZone) -> Schedules {
        Schedules { jobs, tz }
    }

    pub fn pool(&self) -> &Pool {
        self.jobs.pool()
    }

    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    pub fn now_ms(&self) -> i64 {
        self.jobs.now_ms()
    }

    /// A clock handle for callers that need one.
    pub fn clock(&self) -> SharedClock {
        self.jobs.clock()
    }

    /// Creates a schedule; its first slot is the first one after now.
    pub async fn create(&self, new: &NewSchedule) -> Result<Schedule> {
        let now = self.now_ms();
        let cadence = new.when.cadence()?;
        let next = cadence
            .next_after(now, now, &self.tz)
            .ok_or_else(|| ScheduleError::Invalid(format!("{} never runs", new.when.spec)))?;
        let row = sqlx::query(
            "INSERT INTO schedules (kind, owner, user_id, chat_id, path, spec, cron, every_ms,
                                    anchor_at, encrypt, retention, created_at, baseline_at,
                                    next_slot, host)
             VALUES ('backup', $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING *",
        )
        .bind(&new.owner)
        .bind(new.user_id)
        .bind(new.chat_id)
        .bind(&new.path)
        .bind(&new.when.spec)
        .bind(&new.when.cron)
        .bind(new.when.every_ms)
        .bind(now)
        .bind(i64::from(new.encrypt))
        .bind(new.retention.as_ref().map(|r| r.to_string()))
        .bind(now)
        .bind(now)
        .bind(next)
        .bind(&new.host)
        .fetch_one(self.pool())
        .await?;
        Schedule::from_row(&row)
    }

    /// Records that schedule `id`'s keep policy failed to apply after its backup job `job_id`
    /// (the backup stands); the bot tells the owner ([`super::alerts::AlertKind::ForgetFailed`]).
    pub async fn record_forget_failure(&self, id: i64, job_id: i64, error: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO forget_failures (schedule_id, job_id, error, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(job_id)
        .bind(error)
        .bind(self.now_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn get(&self, id: i64) -> Result<Option<Schedule>> {
        let row = sqlx::query("SELECT * FROM schedules WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(Schedule::from_row).transpose()
    }

    /// The backup schedules of `owner`, oldest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<Schedule>> {
        let rows =
            sqlx::query("SELECT * FROM schedules WHERE owner = $1 AND kind = 'backup' ORDER BY id")
                .bind(owner)
                .fetch_all(self.pool())
                .await?;
        rows.iter().map(Schedule::from_row).collect()
    }

    /// Every backup schedule (the alerts look at all of them).
    pub async fn all_backups(&self) -> Result<Vec<Schedule>> {
        let rows = sqlx::query("SELECT * FROM schedules WHERE kind = 'backup' ORDER BY id")
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(Schedule::from_row).collect()
    }

    /// Deletes a schedule of `owner` (another owner's is reported as not found). Its jobs
    /// stay in the job table.
    pub async fn remove(&self, id: i64, owner: &str) -> Result<Schedule> {
        let row = sqlx::query(
            "DELETE FROM schedules WHERE id = $1 AND owner = $2 AND kind = 'backup' RETURNING *",
        )
        .bind(id)
        .bind(owner)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref()
            .map(Schedule::from_row)
            .transpose()?
            .ok_or(ScheduleError::NotFound(id))
    }

    /// Pauses or resumes a schedule of `owner`. Resuming starts from the next slot after now
    /// (no catch-up for the paused time) and restarts the missed-backup clock; pausing drops
    /// any outstanding alert state.
    pub async fn set_paused(&self, id: i64, owner: &str, paused: bool) -> Result<Schedule> {
        let now = self.now_ms();
        let current = self
            .get(id)
            .await?
            .filter(|s| s.owner == owner && s.kind == ScheduleKind::Backup)
            .ok_or(ScheduleError::NotFound(id))?;
        let next = if paused {
            current.next_slot
        } else {
            current
                .cadence()?
                .next_after(now, current.anchor_at, &self.tz)
                .unwrap_or(current.next_slot)
        };
        let row = sqlx::query(
            "UPDATE schedules SET paused = $1, next_slot = $2,
                    baseline_at = CASE WHEN $3 = 1 THEN baseline_at ELSE $4 END,
                    missed_alert_at = NULL, failures_reported = 0, failure_alert_at = NULL
              WHERE id = $5 RETURNING *",
        )
        .bind(i64::from(paused))
        .bind(next)
        .bind(i64::from(paused))
        .bind(now)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref()
            .map(Schedule::from_row)
            .transpose()?
            .ok_or(ScheduleError::NotFound(id))
    }

    /// Makes sure the daily scrub schedule exists at `at` (hours, minutes), or that there is
    /// none when `at` is `None`. Several daemons may call this at once.
    pub async fn ensure_scrub(&self, at: Option<(u8, u8)>) -> Result<Option<Schedule>> {
        let Some((h, m)) = at else {
            sqlx::query("DELETE FROM schedules WHERE kind = 'scrub'")
                .execute(self.pool())
                .await?;
            return Ok(None);
        };
        let now = self.now_ms();
        let when = When {
            spec: format!("daily {h:02}:{m:02}"),
            cron: Some(format!("{m} {h} * * *")),
            every_ms: None,
        };
        let next = when
            .cadence()?
            .next_after(now, now, &self.tz)
            .unwrap_or(now);
        // Insert, or move an existing one whose time changed (keeping its history).
        sqlx::query(
            "INSERT INTO schedules (kind, owner, user_id, chat_id, path, spec, cron, anchor_at,
                                    created_at, baseline_at, next_slot)
             VALUES ('scrub', 'system', 0, 0, '', $1, $2, $3, $4, $5, $6)
             ON CONFLICT (kind) WHERE kind = 'scrub' DO UPDATE
                SET spec = excluded.spec, cron = excluded.cron, next_slot = excluded.next_slot
              WHERE schedules.cron IS NOT excluded.cron",
        )
        .bind(&when.spec)
        .bind(&when.cron)
        .bind(now)
        .bind(now)
        .bind(now)
        .bind(next)
        .execute(self.pool())
        .await?;
        let row = sqlx::query("SELECT * FROM schedules WHERE kind = 'scrub'")
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(Schedule::from_row).transpose()
    }

    /// Fires every schedule whose slot has come: queues its job (exactly once per slot),
    /// skips a slot whose previous job is still active, refuses one whose owner may no longer
    /// back up its path. Returns what it did.
    /// A daemon of a host fires only the schedules of its host and those of no host (the
    /// path checks it repeats look at its own file system).
    pub async fn fire_due(&self, rules: &FireRules) -> Result<Vec<Fired>> {
        let now = self.now_ms();
        let mine = match rules.host {
            Some(_) => "AND (host IS NULL OR host = ?)",
            None => "",
        };
        let sql = format!(
            "SELECT * FROM schedules WHERE paused = 0 AND next_slot <= ? {mine} ORDER BY id"
        );
        let mut q = sqlx::query(crate::catalog::sql(sql)).bind(now);
        if let Some(host) = &rules.host {
            q = q.bind(host);
        }
        let rows = q.fetch_all(self.pool()).await?;
        let mut fired = Vec::new();
        for row in &rows {
            let s = match Schedule::from_row(row) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("skipping a schedule: {e}");
                    continue;
                }
            };
            match self.fire_one(&s, now, rules).await {
                Ok(Some(f)) => fired.push(f),
                Ok(None) => {}
                Err(e) => tracing::warn!(schedule = s.id, "firing the schedule failed: {e}"),
            }
        }
        Ok(fired)
    }

    async fn fire_one(&self, s: &Schedule, now: i64, rules: &FireRules) -> Result<Option<Fired>> {
        let cadence = s.cadence()?;
        let Some(next) = cadence.next_after(now, s.anchor_at, &self.tz) else {
            return Ok(None);
        };
        let slot = match cadence.last_at_or_before(now, s.anchor_at, &self.tz) {
            Some(slot) if slot >= s.next_slot => slot,
            // The cadence moved under us (a time zone change): no slot is due, only move on.
            _ => {
                sqlx::query("UPDATE schedules SET next_slot = CASE WHEN next_slot > $1 THEN next_slot ELSE $1 END WHERE id = $2")
                    .bind(next)
                    .bind(s.id)
                    .execute(self.pool())
                    .await?;
                return Ok(None);
            }
        };
        let missed = cadence.count_between(s.next_slot, slot, s.anchor_at, &self.tz);
        let catch_up = missed > 0;
        // Checked outside the transaction: it touches the file system.
        let refused = match s.kind {
            ScheduleKind::Backup => rules.check(&s.owner, &s.path).err(),
            ScheduleKind::Scrub => None,
        };

        let mut tx = self.pool().begin().await?;
        // The first statement writes, so the transaction holds the write lock from here on.
        let claimed = sqlx::query(
            "INSERT INTO schedule_runs (schedule_id, slot, outcome, catch_up, created_at)
             SELECT $1, $2, 'queued', $3, $4 WHERE EXISTS
                    (SELECT 1 FROM schedules WHERE id = $5 AND paused = 0)
             ON CONFLICT (schedule_id, slot) DO NOTHING",
        )
        .bind(s.id)
        .bind(slot)
        .bind(i64::from(catch_up))
        .bind(now)
        .bind(s.id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !claimed {
            // Another scheduler handled this slot (or the schedule is gone or paused).
            sqlx::query("UPDATE schedules SET next_slot = CASE WHEN next_slot > $1 THEN next_slot ELSE $1 END WHERE id = $2")
                .bind(next)
                .bind(s.id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(None);
        }
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE schedule_id = $1 AND state IN ('queued', 'running')",
        )
        .bind(s.id)
        .fetch_one(&mut *tx)
        .await?;
        let (outcome, job_id, detail) = if active > 0 {
            (RunOutcome::Skipped, None, None)
        } else if let Some(why) = refused {
            (RunOutcome::Refused, None, Some(why))
        } else {
            let args = s.job_args();
            let jitter = if rules.jitter_ms > 0 {
                random_below(rules.jitter_ms)
            } else {
                0
            };
            let owner = (!s.owner.starts_with("tg:")).then_some(s.owner.as_str());
            // A backup runs where its path was checked: the schedule's host, or for a schedule
            // of no host, the host of the daemon that fired it. The scrub runs anywhere.
            let host = match s.kind {
                ScheduleKind::Backup => s.host.as_deref().or(rules.host.as_deref()),
                ScheduleKind::Scrub => None,
            };
            let job = self
                .jobs
                .insert(
                    &mut *tx,
                    &NewJob {
                        user_id: s.user_id,
                        chat_id: s.chat_id,
                        args: &args,
                        schedule_id: Some(s.id),
                        owner,
                        not_before: now + jitter,
                        host,
                    },
                )
                .await?;
            (RunOutcome::Queued, Some(job.id), None)
        };
        sqlx::query(
            "UPDATE schedule_runs SET outcome = $1, job_id = $2, detail = $3
              WHERE schedule_id = $4 AND slot = $5",
        )
        .bind(outcome.as_str())
        .bind(job_id)
        .bind(&detail)
        .bind(s.id)
        .bind(slot)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE schedules SET next_slot = CASE WHEN next_slot > $1 THEN next_slot ELSE $1 END, missed = missed + $2,
                    skipped = skipped + $3 WHERE id = $4",
        )
        .bind(next)
        .bind(missed as i64)
        .bind(i64::from(outcome == RunOutcome::Skipped))
        .bind(s.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            schedule = s.id,
            slot,
            outcome = outcome.as_str(),
            job = job_id,
            missed,
            "schedule fired"
        );
        Ok(Some(Fired {
            schedule_id: s.id,
            slot,
            outcome,
            job_id,
            catch_up,
            missed,
            detail,
        }))
    }

    /// The handled slots of a schedule, newest first.
    pub async fn runs(&self, schedule_id: i64, limit: i64) -> Result<Vec<Fired>> {
        let rows = sqlx::query(
            "SELECT slot, outcome, job_id, catch_up, detail FROM schedule_runs
              WHERE schedule_id = $1 ORDER BY slot DESC LIMIT $2",
        )
        .bind(schedule_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let outcome = match r.try_get::<String, _>(1)?.as_str() {
                    "queued" => RunOutcome::Queued,
                    "skipped" => RunOutcome::Skipped,
                    _ => RunOutcome::Refused,
                };
                Ok(Fired {
                    schedule_id,
                    slot: r.try_get(0)?,
                    outcome,
                    job_id: r.try_get(2)?,
                    catch_up: r.try_get::<i64, _>(3)? != 0,
                    missed: 0,
                    detail: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// The newest job a schedule fired.
    pub async fn last_job(&self, schedule_id: i64) -> Result<Option<Job>> {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE schedule_id = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(schedule_id)
        .fetch_optional(self.pool())
        .await?;
        match id {
            Some(id) => Ok(self.jobs.get(id).await?),
            None => Ok(None),
        }
    }

    /// The next time a schedule runs (`None` while paused).
    pub fn next_run(&self, s: &Schedule) -> Option<i64> {
        if s.paused {
            return None;
        }
        let now = self.now_ms();
        let cadence = s.cadence().ok()?;
        // A slot that is due but not handled yet (the worker is down) is still "next".
        Some(if s.next_slot <= now {
            s.next_slot
        } else {
            cadence
                .next_after(now, s.anchor_at, &self.tz)?
                .min(s.next_slot)
        })
    }
}

/// A uniformly random number in `0..n` (n > 0).
fn random_below(n: i64) -> i64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    (u64::from_le_bytes(b) % n as u64) as i64
}

/// `Mon 30 Mar 03:00 CEST`: a time in the schedule time zone, as chat and CLI show it.
pub fn format_local(ms: i64, tz: &TimeZone) -> String {
    match zoned(ms, tz) {
        Some(z) => z.strftime("%a %d %b %H:%M %Z").to_string(),
        None => format!("@{ms}"),
    }
}

/// A shared handle.
pub type SharedSchedules = Arc<Schedules>;

#[cfg(test)]
mod tests {
    use super::*;

    fn berlin() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    fn at(s: &str) -> i64 {
        // "2026-03-29 01:30" in Berlin → ms
        let dt: jiff::civil::DateTime = s.parse().unwrap();
        dt.to_zoned(berlin()).unwrap().timestamp().as_millisecond()
    }

    fn local(ms: i64) -> String {
        zoned(ms, &berlin())
            .unwrap()
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    }

    fn slots(when: &str, from: &str, n: usize) -> Vec<String> {
        let c = parse_when(when).unwrap().cadence().unwrap();
        let anchor = at(from);
        let mut t = anchor;
        (0..n)
            .map(|_| {
                t = c.next_after(t, anchor, &berlin()).unwrap();
                local(t)
            })
            .collect()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            parse_when("hourly").unwrap().cron.as_deref(),
            Some("0 * * * *")
        );
        assert_eq!(parse_when("daily").unwrap().spec, "daily 03:00");
        assert_eq!(
            parse_when("daily 23:15").unwrap().cron.as_deref(),
            Some("15 23 * * *")
        );
        assert_eq!(
            parse_when("weekly Monday 9:05").unwrap().spec,
            "weekly mon 09:05"
        );
        assert_eq!(
            parse_when("weekly sun").unwrap().cron.as_deref(),
            Some("0 3 * * 0")
        );
        assert_eq!(parse_when("every 6h").unwrap().every_ms, Some(6 * HOUR_MS));
        assert_eq!(parse_when("every 12 hours").unwrap().spec, "every 12h");
        assert_eq!(
            parse_when("\"0 3 * * 1-5\"").unwrap().spec,
            "\"0 3 * * 1-5\""
        );
        assert_eq!(
            parse_when("30 4 1 * *").unwrap().cron.as_deref(),
            Some("30 4 1 * *")
        );
        for bad in [
            "",
            "daily 25:00",
            "weekly someday",
            "every 0h",
            "every 6",
            "fortnightly",
            "\"0 3 * *\"",
            "\"0 0 3 * * *\"",
            "\"61 * * * *\"",
            "daily 03:00 extra",
        ] {
            let e = parse_when(bad).unwrap_err().to_string();
            assert!(e.contains("hint:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn parses_requests_with_spaces_quotes_and_options() {
        let r = parse_schedule_request("/srv/my data daily 02:00 keep daily 7 weekly 4 monthly 12")
            .unwrap();
        assert_eq!(r.path, "/srv/my data");
        assert_eq!(r.when.spec, "daily 02:00");
        assert_eq!(
            r.retention.unwrap().to_string(),
            "keep daily 7 weekly 4 monthly 12"
        );
        assert!(r.encrypt);
        let r = parse_schedule_request("/srv/data \"0 3 * * 1-5\" unencrypted").unwrap();
        assert_eq!(
            (r.path.as_str(), r.when.cron.as_deref(), r.encrypt),
            ("/srv/data", Some("0 3 * * 1-5"), false)
        );
        let r = parse_schedule_request("\"/srv/every day\" every 6h").unwrap();
        assert_eq!(
            (r.path.as_str(), r.when.spec.as_str()),
            ("/srv/every day", "every 6h")
        );
        // A folder named like a keyword still works when the rest doesn't parse from there.
        let r = parse_schedule_request("/srv/daily notes weekly fri 18:00").unwrap();
        assert_eq!(
            (r.path.as_str(), r.when.spec.as_str()),
            ("/srv/daily notes", "weekly fri 18:00")
        );
        for bad in [
            "",
            "/srv/data",
            "/srv/data daily 03:00 keep forever",
            "/srv/data \"0 3 * *",
        ] {
            assert!(parse_schedule_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retention_policies_round_trip() {
        let p = parse_retention("keep monthly 12 daily 7 within 30d").unwrap();
        assert_eq!(p.to_string(), "keep daily 7 monthly 12 within 30d");
        assert_eq!(parse_retention(&p.to_string()).unwrap(), p);
        for bad in [
            "keep",
            "keep daily",
            "keep daily seven",
            "keep daily 7 daily 3",
            "keep often 3",
            "keep daily 0",
        ] {
            assert!(
                parse_retention(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("hint:"),
                "{bad}"
            );
        }
    }

    // Europe/Berlin: clocks go forward 2026-03-29 02:00 → 03:00 and back 2026-10-25
    // 03:00 → 02:00.

    #[test]
    fn daily_across_dst() {
        // 02:30 does not exist on the spring day: it runs at the first valid time after, once.
        assert_eq!(
            slots("daily 02:30", "2026-03-27 12:00", 4),
            [
                "2026-03-28 02:30 CET",
                "2026-03-29 03:00 CEST",
                "2026-03-30 02:30 CEST",
                "2026-03-31 02:30 CEST"
            ]
        );
        // 02:30 happens twice on the autumn day: it runs once.
        assert_eq!(
            slots("daily 02:30", "2026-10-24 12:00", 3),
            [
                "2026-10-25 02:30 CEST",
                "2026-10-26 02:30 CET",
                "2026-10-27 02:30 CET"
            ]
        );
        // A time clear of the change keeps its wall-clock time; the day is 23 or 25 hours.
        let d = slots("daily 03:00", "2026-10-24 12:00", 2);
        assert_eq!(d, ["2026-10-25 03:00 CET", "2026-10-26 03:00 CET"]);
    }

    #[test]
    fn hourly_across_dst() {
        // Spring: the 02:xx hour does not exist; slots stay one real hour apart.
        assert_eq!(
            slots("hourly", "2026-03-29 00:30", 3),
            [
                "2026-03-29 01:00 CET",
                "2026-03-29 03:00 CEST",
                "2026-03-29 04:00 CEST"
            ]
        );
        // Autumn: 02:00 happens twice, and both are real hours apart from their neighbours.
        let s = slots("hourly", "2026-10-25 00:30", 4);
        assert_eq!(s[0], "2026-10-25 01:00 CEST");
        assert_eq!(s[1], "2026-10-25 02:00 CEST");
        assert_eq!(s[3], "2026-10-25 03:00 CET");
        let c = parse_when("hourly").unwrap().cadence().unwrap();
        let a = at("2026-10-25 00:30");
        let mut t = a;
        let mut prev = None;
        for _ in 0..6 {
            t = c.next_after(t, a, &berlin()).unwrap();
            if let Some(p) = prev {
                assert!(t - p == HOUR_MS || t - p == 2 * HOUR_MS, "{}", local(t));
            }
            prev = Some(t);
        }
    }

    #[test]
    fn weekly_and_cron_across_dst() {
        assert_eq!(
            slots("weekly sun 02:30", "2026-03-22 12:00", 2),
            ["2026-03-29 03:00 CEST", "2026-04-05 02:30 CEST"]
        );
        assert_eq!(
            slots("\"30 2 * * 0\"", "2026-10-18 12:00", 2),
            ["2026-10-25 02:30 CEST", "2026-11-01 02:30 CET"]
        );
    }

    #[test]
    fn every_n_hours_is_elapsed_time_across_dst() {
        // Six real hours apart; the wall clock shows the one-hour shift (22:00 CET + 6 h is
        // 04:00 CET, which is 05:00 CEST).
        assert_eq!(
            slots("every 6h", "2026-03-28 22:00", 3),
            [
                "2026-03-29 05:00 CEST",
                "2026-03-29 11:00 CEST",
                "2026-03-29 17:00 CEST"
            ]
        );
        let c = Cadence::Every(6 * HOUR_MS);
        assert_eq!(
            c.last_at_or_before(1000, 0, &berlin()),
            None,
            "no slot before one period"
        );
        assert_eq!(
            c.last_at_or_before(6 * HOUR_MS, 0, &berlin()),
            Some(6 * HOUR_MS)
        );
        assert_eq!(c.count_between(6 * HOUR_MS, 24 * HOUR_MS, 0, &berlin()), 3);
    }

    #[test]
    fn last_slot_and_counts() {
        let c = parse_when("daily 03:00").unwrap().cadence().unwrap();
        let tz = berlin();
        let now = at("2026-03-31 10:00");
        assert_eq!(
            local(c.last_at_or_before(now, 0, &tz).unwrap()),
            "2026-03-31 03:00 CEST"
        );
        assert_eq!(
            c.count_between(at("2026-03-28 03:00"), at("2026-03-31 03:00"), 0, &tz),
            3
        );
        assert_eq!(
            c.period_after(at("2026-03-27 12:00"), 0, &tz),
            Some(23 * HOUR_MS),
            "the spring day is 23 hours long"
        );
    }
}

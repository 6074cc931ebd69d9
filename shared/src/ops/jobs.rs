//! The job table: the only channel between the bot (which enqueues jobs and shows their
//! progress) and the worker (which claims, runs, heartbeats and finishes them).
//!
//! Concurrency model:
//! - Claiming is one `UPDATE ... WHERE id = (SELECT ...) RETURNING *` statement, so two workers
//!   can never claim the same job: SQLite serialises writers and the sub-select runs inside
//!   the writer's snapshot.
//! - A claim hands out a [`Lease`] (owner, attempt). Every later write by the worker is fenced
//!   by `lease_owner = ? AND attempt = ? AND state = 'running'`: a worker whose lease expired
//!   and whose job was re-claimed (attempt + 1) gets [`JobError::LeaseLost`] and must stop.
//! - A running job whose lease expired is claimable again; the attempt counter is the fencing
//!   token, so it grows on every claim.
//! - Failures marked retryable go back to `queued` with `not_before` pushed out by a bounded
//!   exponential backoff, until `max_attempts` claims have been used.
//! - Cancellation of a queued job is immediate; of a running job it sets `cancel_requested`,
//!   which the worker sees in the answer to its next heartbeat or progress write.
//!
//! All times are Unix milliseconds from an injected [`Clock`](crate::clock::Clock).

use std::sync::Arc;

use crate::catalog::{DbRow, Dialect, Pool};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::clock::{SharedClock, SystemClock};
use crate::progress::{Phase, ProgressReport, Throttle};

pub type JobId = i64;

/// Largest document a bot may upload through the Bot API (50 MB). `/get` sends larger files
/// through the worker's own account.
pub const BOT_UPLOAD_LIMIT: u64 = 50 * 1024 * 1024;

/// Errors of the job table.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The worker no longer holds this job: its lease expired and another claim happened, or
    /// the job was finished by someone else. The worker must stop working on it.
    #[error("job {job_id}: lease lost (owner {owner}, attempt {attempt})")]
    LeaseLost {
        job_id: JobId,
        owner: String,
        attempt: i64,
    },
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("job {job_id}: bad {field} in job table: {message}")]
    Corrupt {
        job_id: JobId,
        field: &'static str,
        message: String,
    },
    #[error("job table: {0}")]
    Db(#[from] sqlx::Error),
}

pub type Result<T, E = JobError> = std::result::Result<T, E>;

/// Lifecycle of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    /// True for states a job never leaves.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn yes() -> bool {
    true
}

/// What a job should do. Stored as JSON in `jobs.args`; the `kind` tag is also copied into
/// `jobs.kind` so the table can be read without parsing JSON.
// Not `Eq`: a prune's percentage is a float.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobArgs {
    Backup {
        /// Absolute, canonical path of the folder to back up.
        path: String,
        #[serde(default = "yes")]
        encrypt: bool,
    },
    Restore {
        /// Path as backed up (a root or anything below it).
        path: String,
        /// Target directory; `None` lets the worker choose its default restore location.
        #[serde(default)]
        to: Option<String>,
        /// Snapshot short id; `None` means the latest.
        #[serde(default)]
        snapshot: Option<String>,
        /// Overwrite existing differing files (set only after the user confirmed).
        #[serde(default)]
        overwrite: bool,
    },
    Verify {
        #[serde(default)]
        path: Option<String>,
    },
    /// Restore one file to a private place and send it into the chat (the bot sends files
    /// up to the Bot API's 50 MB; larger ones go to the worker account's Saved Messages).
    Get {
        /// The file, as backed up.
        path: String,
        /// Snapshot short id; `None` means the latest.
        #[serde(default)]
        snapshot: Option<String>,
    },
    /// Read packs back within a budget, authenticate every chunk, heal what can be healed.
    Scrub {
        /// Bytes to read; `None`: the daily budget (`STORINATOR_SCRUB_BYTES_PER_DAY`).
        #[serde(default)]
        bytes: Option<u64>,
    },
    /// Forget snapshots of one root by a keep policy, at most the ones the user confirmed
    /// (queued by the chat's `/forget` after its dry run; see [`super::prompts`]).
    Forget {
        /// The backed-up root.
        path: String,
        /// The policy, as `KeepPolicy` prints it (`keep daily 7 weekly 4`).
        policy: String,
        /// Short ids of the snapshots the user saw and confirmed; nothing else is forgotten.
        snapshots: Vec<String>,
    },
    /// Delete the packs no snapshot uses and rewrite sparse ones, repository-wide (queued by
    /// the chat's `/prune` after its dry run was confirmed; the CLI's `prune` options).
    Prune {
        /// Most live bytes moved by repacking (`None`: no limit).
        #[serde(default)]
        max_repack: Option<u64>,
        /// Rewrite packs whose live share is below this percentage.
        repack_below: f64,
    },
}

impl JobArgs {
    pub fn kind(&self) -> &'static str {
        match self {
            JobArgs::Backup { .. } => "backup",
            JobArgs::Restore { .. } => "restore",
            JobArgs::Verify { .. } => "verify",
            JobArgs::Get { .. } => "get",
            JobArgs::Scrub { .. } => "scrub",
            JobArgs::Forget { .. } => "forget",
            JobArgs::Prune { .. } => "prune",
        }
    }
}

/// What a finished job reports. Stored as JSON in `jobs.result`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobResult {
    Backup {
        snapshot: String,
        files: u64,
        dirs: u64,
        bytes: u64,
        /// Bytes handed to storage after dedup, compression and encryption.
        bytes_stored: u64,
        #[serde(default)]
        new_chunks: u64,
        #[serde(default)]
        warnings: u64,
        duration_ms: u64,
    },
    Restore {
        files: u64,
        bytes: u64,
        /// Files already present with the right content, left untouched.
        #[serde(default)]
        unchanged: u64,
        #[serde(default)]
        errors: Vec<String>,
        duration_ms: u64,
    },
    Verify {
        #[serde(default)]
        objects: u64,
        #[serde(default)]
        errors: Vec<String>,
        duration_ms: u64,
    },
    /// A scrub's outcome (the full report is in the `scrub_runs` table).
    Scrub {
        bytes_read: u64,
        chunks_checked: u64,
        damaged: u64,
        healed: u64,
        unhealed: u64,
        duration_ms: u64,
    },
    /// A restore found existing files that differ from the backup and wrote none of them.
    /// The job ends `failed` with this result; the bot asks the user to confirm and, if they
    /// do, enqueues the same restore of the same snapshot with `overwrite: true`
    /// ([`Jobs::answer_conflict`]).
    Conflicts {
        count: u64,
        sample: Vec<String>,
        /// The snapshot the restore used (the latest at the time, unless one was named): an
        /// overwrite restores exactly what the user was asked about.
        #[serde(default)]
        snapshot: Option<String>,
    },
    /// A file restored and verified for sending.
    Get {
        /// The file's name.
        name: String,
        size: u64,
        /// Hex SHA-256 of the content, as checked by the restore.
        sha256: String,
        /// Where the file waits for the bot to send it (`None` when the worker's account sent
        /// it to its Saved Messages).
        #[serde(default)]
        file: Option<String>,
        /// The snapshot it came from.
        snapshot: String,
    },
    /// Snapshots forgotten (their storage is freed by the next prune).
    Forget {
        forgotten: u64,
        kept: u64,
        /// The sealed tombstone stored for them.
        #[serde(default)]
        tombstone: Option<String>,
    },
    /// What a prune deleted, rewrote and freed.
    Prune {
        /// Packs deleted from storage (unused ones, and the sparse ones rewritten).
        deleted_packs: u64,
        /// Sparse packs rewritten, and the new packs their live data went into.
        repacked_packs: u64,
        new_packs: u64,
        /// Live bytes moved by repacking.
        moved_bytes: u64,
        freed_bytes: u64,
        /// Packs an interrupted prune had condemned, finished now.
        #[serde(default)]
        resumed_packs: u64,
        /// Sparse packs left for a later prune (over max_repack, or unauthenticated).
        #[serde(default)]
        sparse_left: u64,
        duration_ms: u64,
    },
}

/// The user's answer to a restore-conflict prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Overwrite,
    Keep,
}

impl Answer {
    fn as_str(self) -> &'static str {
        match self {
            Answer::Overwrite => "overwrite",
            Answer::Keep => "keep",
        }
    }
}

/// What became of an answer.
#[derive(Clone, Debug, PartialEq)]
pub enum AnswerOutcome {
    /// The overwriting restore was queued.
    Overwriting(Box<Job>),
    /// The existing files are kept.
    Kept,
    /// The prompt was answered before (a double tap, another bot process).
    AlreadyAnswered,
    /// No such prompt for this user (not theirs, not a conflicted restore).
    NotWaiting,
}

/// One row of the job table.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub args: JobArgs,
    pub user_id: i64,
    pub chat_id: i64,
    pub state: JobState,
    pub progress: ProgressReport,
    pub estimate: Option<serde_json::Value>,
    /// The storage provider is slowing this job down (see [`Throttle`]).
    pub throttle: Option<Throttle>,
    pub result: Option<JobResult>,
    pub error: Option<String>,
    pub attempt: i64,
    pub max_attempts: i64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub not_before: i64,
    pub cancel_requested: bool,
    pub progress_message_id: Option<i32>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub shown_at: i64,
    pub final_notified: bool,
    pub stall_notified: bool,
    /// The schedule that fired this job (the retention work reads its policy through it).
    pub schedule_id: Option<i64>,
    /// Whose job it is when not `tg:<user_id>` (`local` for the CLI's schedules).
    pub owner: Option<String>,
    /// The storage host whose workers may claim it; `None`: any worker (see [`super::hosts`]).
    pub host: Option<String>,
}

impl Job {
    fn from_row(row: &DbRow) -> Result<Job> {
        let id: JobId = row.try_get("id")?;
        let corrupt = |field: &'static str, message: String| JobError::Corrupt {
            job_id: id,
            field,
            message,
        };
        let args: String = row.try_get("args")?;
        let args: JobArgs =
            serde_json::from_str(&args).map_err(|e| corrupt("args", e.to_string()))?;
        let state: String = row.try_get("state")?;
        let state = JobState::parse(&state).ok_or_else(|| corrupt("state", state.clone()))?;
        let phase: String = row.try_get("phase")?;
        let phase: Phase = serde_json::from_value(serde_json::Value::String(phase.clone()))
            .map_err(|_| corrupt("phase", phase))?;
        let estimate: Option<String> = row.try_get("estimate")?;
        let estimate = estimate
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| corrupt("estimate", e.to_string()))?;
        let throttle: Option<String> = row.try_get("throttle")?;
        let throttle = throttle
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| corrupt("throttle", e.to_string()))?;
        let result: Option<String> = row.try_get("result")?;
        let result = result
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| corrupt("result", e.to_string()))?;
        let u = |name: &str| -> Result<u64> { Ok(row.try_get::<i64, _>(name)?.max(0) as u64) };
        let msg: Option<i64> = row.try_get("progress_message_id")?;
        Ok(Job {
            id,
            args,
            user_id: row.try_get("user_id")?,
            chat_id: row.try_get("chat_id")?,
            state,
            progress: ProgressReport {
                phase,
                files_done: u("files_done")?,
                files_total: u("files_total")?,
                bytes_done: u("bytes_done")?,
                bytes_total: u("bytes_total")?,
                bytes_stored: u("bytes_stored")?,
            },
            estimate,
            throttle,
            result,
            error: row.try_get("error")?,
            attempt: row.try_get("attempt")?,
            max_attempts: row.try_get("max_attempts")?,
            lease_owner: row.try_get("lease_owner")?,
            lease_until: row.try_get("lease_until")?,
            not_before: row.try_get("not_before")?,
            cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
            progress_message_id: msg.map(|m| m as i32),
            created_at: row.try_get("created_at")?,
            started_at: row.try_get("started_at")?,
            updated_at: row.try_get("updated_at")?,
            finished_at: row.try_get("finished_at")?,
            shown_at: row.try_get("shown_at")?,
            final_notified: row.try_get::<i64, _>("final_notified")? != 0,
            stall_notified: row.try_get::<i64, _>("stall_notified")? != 0,
            schedule_id: row.try_get("schedule_id")?,
            host: row.try_get("host")?,
            owner: row.try_get("owner")?,
        })
    }

    /// Whose backups the job acts on: the `owner` column, or the chat user.
    pub fn owner_name(&self) -> String {
        self.owner
            .clone()
            .unwrap_or_else(|| format!("tg:{}", self.user_id))
    }

    /// True when the job is running but its worker stopped renewing the lease.
    pub fn is_stalled(&self, now_ms: i64) -> bool {
        self.state == JobState::Running && self.lease_until.is_some_and(|t| t < now_ms)
    }
}

/// A job about to be inserted.
pub(crate) struct NewJob<'a> {
    pub user_id: i64,
    pub chat_id: i64,
    pub args: &'a JobArgs,
    pub schedule_id: Option<i64>,
    pub owner: Option<&'a str>,
    /// Not claimable before this time (a schedule's jitter).
    pub not_before: i64,
    /// Only this host's workers may claim it (`None`: any worker).
    pub host: Option<&'a str>,
}

/// Proof that a worker holds a running job. Every worker-side write is fenced by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub job_id: JobId,
    pub owner: String,
    pub attempt: i64,
}

/// What the worker should do after a heartbeat or progress write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Continue,
    /// The user asked to cancel: stop at the next safe point and call [`Jobs::cancelled`].
    Cancel,
}

/// The answer to a user's cancel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was still queued and is now cancelled.
    Cancelled,
    /// The job is running; the worker will stop at its next safe point.
    Requested,
    /// The job had already finished in this state.
    AlreadyFinished(JobState),
}

/// Timing knobs of the job table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobPolicy {
    /// How long a claim or heartbeat keeps the job leased.
    pub lease_ms: i64,
    /// Backoff after the first failed attempt; doubles per attempt.
    pub backoff_base_ms: i64,
    /// Upper bound of the backoff.
    pub backoff_max_ms: i64,
    /// Claims a new job may use (first run + retries + reclaims after lost workers).
    pub max_attempts: i64,
}

impl Default for JobPolicy {
    fn default() -> Self {
        JobPolicy {
            lease_ms: 30_000,
            backoff_base_ms: 5_000,
            backoff_max_ms: 5 * 60_000,
            max_attempts: 3,
        }
    }
}

impl JobPolicy {
    /// Delay before the retry that follows the failure of `attempt` (1-based).
    pub fn backoff_ms(&self, attempt: i64) -> i64 {
        let shift = (attempt - 1).clamp(0, 30) as u32;
        self.backoff_base_ms
            .saturating_mul(1i64 << shift)
            .min(self.backoff_max_ms)
    }
}

/// The job table over a SQLite pool. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    pool: Pool,
    clock: SharedClock,
    policy: JobPolicy,
}

const FENCE: &str = "id = ? AND lease_owner = ? AND attempt = ? AND state = 'running'";

impl Jobs {
    pub fn new(pool: Pool) -> Self {
        Jobs {
            pool,
            clock: Arc::new(SystemClock),
            policy: JobPolicy::default(),
        }
    }

    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    pub fn with_policy(mut self, policy: JobPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn policy(&self) -> &JobPolicy {
        &self.policy
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn clock(&self) -> SharedClock {
        self.clock.clone()
    }

    // ---- bot side -------------------------------------------------------------------------

    /// Queue a new job for `user_id`, answering in `chat_id`.
    pub async fn enqueue(&self, user_id: i64, chat_id: i64, args: &JobArgs) -> Result<Job> {
        self.enqueue_on(user_id, chat_id, args, None).await
    }

    /// [`Jobs::enqueue`] for the workers of `host` only (`None`: any worker).
    pub async fn enqueue_on(
        &self,
        user_id: i64,
        chat_id: i64,
        args: &JobArgs,
        host: Option<&str>,
    ) -> Result<Job> {
        let new = NewJob {
            user_id,
            chat_id,
            args,
            schedule_id: None,
            owner: None,
            not_before: 0,
            host,
        };
        self.insert(&self.pool, &new).await
    }

    /// Insert a job row (through `conn`, so a scheduler can do it inside its transaction). A
    /// scheduled job gets no per-job final notice (its schedule's alerts speak for it), so it
    /// is born `final_notified`.
    pub(crate) async fn insert<'c, E>(&self, conn: E, new: &NewJob<'_>) -> Result<Job>
    where
        E: sqlx::Executor<'c, Database = sqlx::Any>,
    {
        let now = self.now_ms();
        let json = serde_json::to_string(new.args).expect("job args serialise");
        let row = sqlx::query(
            "INSERT INTO jobs (kind, args, user_id, chat_id, max_attempts, created_at, updated_at,
                               not_before, schedule_id, owner, final_notified, host)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, CASE WHEN $9 IS NULL THEN 0 ELSE 1 END, $11) RETURNING *",
        )
        .bind(new.args.kind())
        .bind(json)
        .bind(new.user_id)
        .bind(new.chat_id)
        .bind(self.policy.max_attempts)
        .bind(now)
        .bind(now)
        .bind(new.not_before)
        .bind(new.schedule_id)
        .bind(new.owner)
        .bind(new.host)
        .fetch_one(conn)
        .await?;
        Job::from_row(&row)
    }

    pub async fn get(&self, id: JobId) -> Result<Option<Job>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Job::from_row).transpose()
    }

    /// A job by id, only if it belongs to `user_id` (users see only their own jobs).
    pub async fn get_for_user(&self, id: JobId, user_id: i64) -> Result<Option<Job>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Job::from_row).transpose()
    }

    /// The newest `limit` jobs of a user, newest first.
    pub async fn list_for_user(&self, user_id: i64, limit: i64) -> Result<Vec<Job>> {
        let rows = sqlx::query("SELECT * FROM jobs WHERE user_id = $1 ORDER BY id DESC LIMIT $2")
            .bind(user_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Job::from_row).collect()
    }

    /// Queued and running jobs of a user, oldest first.
    pub async fn active_for_user(&self, user_id: i64) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE user_id = $1 AND state IN ('queued', 'running') ORDER BY id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Job::from_row).collect()
    }

    /// Remember the chat message that shows this job's progress.
    pub async fn set_progress_message(&self, id: JobId, message_id: i32) -> Result<()> {
        let done = sqlx::query("UPDATE jobs SET progress_message_id = $1 WHERE id = $2")
            .bind(i64::from(message_id))
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(JobError::NotFound(id));
        }
        Ok(())
    }

    /// Unfinished jobs whose progress message is older than their last update.
    pub async fn needing_progress_edit(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running')
               AND progress_message_id IS NOT NULL AND updated_at > shown_at ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Job::from_row).collect()
    }

    /// Record that the progress message now reflects the job as of `updated_at`.
    pub async fn mark_shown(&self, id: JobId, updated_at: i64) -> Result<()> {
        sqlx::query("UPDATE jobs SET shown_at = CASE WHEN shown_at > $1 THEN shown_at ELSE $1 END WHERE id = $2")
            .bind(updated_at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Finished jobs whose user has not been told yet. Jobs fired by a schedule are not
    /// among them: their outcomes reach the user through the schedule's alerts (grouped
    /// failures, missed backups), not one message per run.
    pub async fn finished_unnotified(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE final_notified = 0
               AND state IN ('done', 'failed', 'cancelled') AND schedule_id IS NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Job::from_row).collect()
    }

    pub async fn mark_final_notified(&self, id: JobId) -> Result<()> {
        sqlx::query("UPDATE jobs SET final_notified = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Running jobs whose lease expired (their worker stopped heartbeating) and whose user
    /// was not told yet (scheduled jobs excepted, as in [`Jobs::finished_unnotified`]).
    pub async fn stalled_unnotified(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE state = 'running' AND lease_until < $1
               AND stall_notified = 0 AND schedule_id IS NULL ORDER BY id",
        )
        .bind(self.now_ms())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Job::from_row).collect()
    }

    /// Every running job whose lease expired.
    pub async fn stalled(&self) -> Result<Vec<Job>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE state = 'running' AND lease_until < $1 ORDER BY id",
        )
        .bind(self.now_ms())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Job::from_row).collect()
    }

    pub async fn mark_stall_notified(&self, id: JobId) -> Result<()> {
        sqlx::query("UPDATE jobs SET stall_notified = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Cancel a job of `user_id`: immediately if queued, at the worker's next safe point if
    /// running. A job of another user is reported as not found.
    pub async fn request_cancel(&self, id: JobId, user_id: i64) -> Result<CancelOutcome> {
        let now = self.now_ms();
        let queued = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = $1,
                    updated_at = $2, lease_owner = NULL, lease_until = NULL
              WHERE id = $3 AND user_id = $4 AND state = 'queued'",
        )
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        if queued.rows_affected() == 1 {
            return Ok(CancelOutcome::Cancelled);
        }
        let running = sqlx::query(
            "UPDATE jobs SET cancel_requested = 1, updated_at = $1
              WHERE id = $2 AND user_id = $3 AND state = 'running'",
        )
        .bind(now)
        .bind(id)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        if running.rows_affected() == 1 {
            return Ok(CancelOutcome::Requested);
        }
        match self.get_for_user(id, user_id).await? {
            Some(job) if job.state.is_final() => Ok(CancelOutcome::AlreadyFinished(job.state)),
            // Raced with a state change between the statements: ask again.
            Some(_) => Box::pin(self.request_cancel(id, user_id)).await,
            None => Err(JobError::NotFound(id)),
        }
    }

    /// Acts on the answer to a restore-conflict prompt, once: the answer is recorded in the
    /// job row in the same transaction that queues the overwriting restore, so a double tap
    /// or a restarted bot finds it answered. The new restore is pinned to the snapshot the
    /// conflict was found in.
    pub async fn answer_conflict(
        &self,
        id: JobId,
        user_id: i64,
        answer: Answer,
    ) -> Result<AnswerOutcome> {
        let now = self.now_ms();
        // IMMEDIATE: read then write (see `answer_prompt` for why a deferred one fails).
        let mut tx = crate::catalog::begin_write(&self.pool).await?;
        let row = sqlx::query(
            "SELECT *, answer AS prior_answer FROM jobs WHERE id = $1 AND user_id = $2",
        )
        .bind(id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(AnswerOutcome::NotWaiting);
        };
        let job = Job::from_row(&row)?;
        let pinned = match (&job.state, &job.result, &job.args) {
            (
                JobState::Failed,
                Some(JobResult::Conflicts { snapshot, .. }),
                JobArgs::Restore {
                    snapshot: asked, ..
                },
            ) => snapshot.clone().or_else(|| asked.clone()),
            _ => return Ok(AnswerOutcome::NotWaiting),
        };
        let prior: Option<String> = row.try_get("prior_answer")?;
        if prior.is_some() {
            return Ok(AnswerOutcome::AlreadyAnswered);
        }
        let marked = sqlx::query("UPDATE jobs SET answer = $1 WHERE id = $2 AND answer IS NULL")
            .bind(answer.as_str())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if marked.rows_affected() != 1 {
            return Ok(AnswerOutcome::AlreadyAnswered);
        }
        let outcome = match answer {
            Answer::Keep => AnswerOutcome::Kept,
            Answer::Overwrite => {
                let JobArgs::Restore { path, to, .. } = job.args else {
                    unreachable!("checked above")
                };
                let args = JobArgs::Restore {
                    path,
                    to,
                    snapshot: pinned,
                    overwrite: true,
                };
                let json = serde_json::to_string(&args).expect("job args serialise");
                // On the host the conflict was found on: that is where the files are.
                let row = sqlx::query(
                    "INSERT INTO jobs (kind, args, user_id, chat_id, max_attempts, created_at,
                                       updated_at, host)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
                )
                .bind(args.kind())
                .bind(json)
                .bind(job.user_id)
                .bind(job.chat_id)
                .bind(self.policy.max_attempts)
                .bind(now)
                .bind(now)
                .bind(&job.host)
                .fetch_one(&mut *tx)
                .await?;
                let new = Job::from_row(&row)?;
                sqlx::query("UPDATE jobs SET answer_job = $1 WHERE id = $2")
                    .bind(new.id)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                AnswerOutcome::Overwriting(Box::new(new))
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Whether `user_id` agreed to `what` before.
    pub async fn has_consent(&self, user_id: i64, what: &str) -> Result<bool> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM consents WHERE user_id = $1 AND what = $2")
                .bind(user_id)
                .bind(what)
                .fetch_one(&self.pool)
                .await?;
        Ok(n > 0)
    }

    /// Records that `user_id` agreed to `what`.
    pub async fn give_consent(&self, user_id: i64, what: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO consents (user_id, what, at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(user_id)
        .bind(what)
        .bind(self.now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- worker side ----------------------------------------------------------------------

    /// Settle running jobs whose lease expired and that must not run again: cancelled by the
    /// user, or out of attempts. Called before each claim.
    async fn sweep_expired(&self, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = $1, updated_at = $2,
                    lease_owner = NULL, lease_until = NULL
              WHERE state = 'running' AND lease_until < $3 AND cancel_requested = 1",
        )
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "UPDATE jobs SET state = 'failed', finished_at = $1, updated_at = $2,
                    lease_owner = NULL, lease_until = NULL,
                    error = 'the worker stopped responding ' || attempt || ' times; giving up'
              WHERE state = 'running' AND lease_until < $3 AND attempt >= max_attempts",
        )
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claim the oldest runnable job for `owner`, a worker of no particular host: only jobs
    /// left to any worker. See [`Jobs::claim_on`].
    pub async fn claim(&self, owner: &str) -> Result<Option<(Job, Lease)>> {
        self.claim_on(owner, None).await
    }

    /// Claim the oldest runnable job for `owner`, a worker of `host`: a queued job whose
    /// backoff has passed, or a running job whose lease expired (its worker died; the job
    /// resumes), among the jobs of that host and those left to any worker (`host IS NULL`).
    /// One statement, so the claim stays atomic and the attempt counter stays its fence.
    pub async fn claim_on(&self, owner: &str, host: Option<&str>) -> Result<Option<(Job, Lease)>> {
        let now = self.now_ms();
        self.sweep_expired(now).await?;
        let mine = match host {
            Some(_) => "(host IS NULL OR host = $4)",
            None => "host IS NULL",
        };
        let runnable = format!(
            "{mine} AND ((state = 'queued' AND not_before <= $3)
                         OR (state = 'running' AND lease_until < $3
                             AND cancel_requested = 0 AND attempt < max_attempts))"
        );
        // PostgreSQL runs claims side by side: a concurrent claimer skips the row another
        // one holds, and the outer condition, checked again on the row's newest version,
        // refuses a job claimed since this statement's snapshot. SQLite has one writer.
        let lock = match Dialect::of(&self.pool) {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        let sql = format!(
            "UPDATE jobs SET state = 'running', lease_owner = $1, lease_until = $2,
                    attempt = attempt + 1, started_at = coalesce(started_at, $3),
                    updated_at = $3, stall_notified = 0, throttle = NULL
              WHERE id = (SELECT id FROM jobs WHERE {runnable} ORDER BY id LIMIT 1{lock})
                AND {runnable}
              RETURNING *"
        );
        let mut q = sqlx::query(crate::catalog::sql(sql))
            .bind(owner)
            .bind(now + self.policy.lease_ms)
            .bind(now);
        if let Some(host) = host {
            q = q.bind(host);
        }
        let row = q.fetch_optional(&self.pool).await?;
        let Some(row) = row else { return Ok(None) };
        let job = Job::from_row(&row)?;
        let lease = Lease {
            job_id: job.id,
            owner: owner.to_string(),
            attempt: job.attempt,
        };
        Ok(Some((job, lease)))
    }

    fn lost(lease: &Lease) -> JobError {
        JobError::LeaseLost {
            job_id: lease.job_id,
            owner: lease.owner.clone(),
            attempt: lease.attempt,
        }
    }

    fn signal(cancel_requested: i64) -> Signal {
        if cancel_requested != 0 {
            Signal::Cancel
        } else {
            Signal::Continue
        }
    }

    /// Renew the lease. Tells the worker whether the user asked to cancel.
    pub async fn heartbeat(&self, lease: &Lease) -> Result<Signal> {
        let now = self.now_ms();
        let sql = format!(
            "UPDATE jobs SET lease_until = ?, stall_notified = 0 WHERE {FENCE}
             RETURNING cancel_requested"
        );
        let row = sqlx::query(crate::catalog::sql(sql))
            .bind(now + self.policy.lease_ms)
            .bind(lease.job_id)
            .bind(&lease.owner)
            .bind(lease.attempt)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Self::signal(row.try_get(0)?)),
            None => Err(Self::lost(lease)),
        }
    }

    /// Record progress (also renews the lease). Tells the worker whether to cancel.
    pub async fn report_progress(&self, lease: &Lease, p: &ProgressReport) -> Result<Signal> {
        let now = self.now_ms();
        let phase = serde_json::to_value(p.phase).expect("phase serialises");
        let phase = phase.as_str().unwrap_or("starting").to_string();
        let sql = format!(
            "UPDATE jobs SET phase = ?, files_done = ?, files_total = ?, bytes_done = ?,
                    bytes_total = ?, bytes_stored = ?, updated_at = ?, lease_until = ?,
                    stall_notified = 0
              WHERE {FENCE} RETURNING cancel_requested"
        );
        let row = sqlx::query(crate::catalog::sql(sql))
            .bind(phase)
            .bind(p.files_done as i64)
            .bind(p.files_total as i64)
            .bind(p.bytes_done as i64)
            .bind(p.bytes_total as i64)
            .bind(p.bytes_stored as i64)
            .bind(now)
            .bind(now + self.policy.lease_ms)
            .bind(lease.job_id)
            .bind(&lease.owner)
            .bind(lease.attempt)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Self::signal(row.try_get(0)?)),
            None => Err(Self::lost(lease)),
        }
    }

    /// Record the pre-scan estimate (free-form JSON: files, bytes, ...).
    pub async fn set_estimate(&self, lease: &Lease, estimate: &serde_json::Value) -> Result<()> {
        let sql = format!("UPDATE jobs SET estimate = ?, updated_at = ? WHERE {FENCE}");
        self.fenced(lease, sql, |q| q.bind(estimate.to_string()))
            .await
    }

    /// Record that storage is throttling the job (`None`: no longer).
    pub async fn set_throttle(&self, lease: &Lease, throttle: Option<&Throttle>) -> Result<()> {
        let json = throttle.map(|t| serde_json::to_string(t).expect("throttle serialises"));
        let sql = format!("UPDATE jobs SET throttle = ?, updated_at = ? WHERE {FENCE}");
        self.fenced(lease, sql, |q| q.bind(json)).await
    }

    async fn fenced<'a>(
        &self,
        lease: &Lease,
        sql: String,
        bind: impl FnOnce(
            sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments>,
        ) -> sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> Result<()> {
        let now = self.now_ms();
        let q = bind(sqlx::query(crate::catalog::sql(sql)))
            .bind(now)
            .bind(lease.job_id)
            .bind(lease.owner.clone())
            .bind(lease.attempt);
        let done = q.execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(Self::lost(lease));
        }
        Ok(())
    }

    /// The job succeeded.
    pub async fn finish(&self, lease: &Lease, result: &JobResult) -> Result<()> {
        let json = serde_json::to_string(result).expect("job result serialises");
        let now = self.now_ms();
        let sql = format!(
            "UPDATE jobs SET state = 'done', phase = 'done', result = ?, error = NULL,
                    finished_at = ?, lease_until = NULL, updated_at = ? WHERE {FENCE}"
        );
        self.fenced(lease, sql, |q| q.bind(json).bind(now)).await
    }

    /// The job stopped on the user's request.
    pub async fn cancelled(&self, lease: &Lease) -> Result<()> {
        let now = self.now_ms();
        let sql = format!(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, lease_until = NULL,
                    updated_at = ? WHERE {FENCE}"
        );
        self.fenced(lease, sql, |q| q.bind(now)).await
    }

    /// The job failed. A `retryable` failure goes back to the queue after a backoff while
    /// attempts remain; otherwise (or when out of attempts) the job ends `failed`. Returns the
    /// job's new state.
    pub async fn fail(
        &self,
        lease: &Lease,
        error: &str,
        result: Option<&JobResult>,
        retryable: bool,
    ) -> Result<JobState> {
        let now = self.now_ms();
        let result = result.map(|r| serde_json::to_string(r).expect("job result serialises"));
        let job = self.get(lease.job_id).await?.ok_or(Self::lost(lease))?;
        let retry = retryable && job.attempt < job.max_attempts && !job.cancel_requested;
        if retry {
            let not_before = now + self.policy.backoff_ms(lease.attempt);
            let sql = format!(
                "UPDATE jobs SET state = 'queued', error = ?, result = ?, not_before = ?,
                        lease_owner = NULL, lease_until = NULL, updated_at = ? WHERE {FENCE}"
            );
            self.fenced(lease, sql, |q| q.bind(error).bind(result).bind(not_before))
                .await?;
            Ok(JobState::Queued)
        } else {
            let sql = format!(
                "UPDATE jobs SET state = 'failed', error = ?, result = ?, finished_at = ?,
                        lease_until = NULL, updated_at = ? WHERE {FENCE}"
            );
            self.fenced(lease, sql, |q| q.bind(error).bind(result).bind(now))
                .await?;
            Ok(JobState::Failed)
        }
    }

    /// Give the job back without counting this run against its retry budget (graceful
    /// shutdown: the job was brought to a safe point and another run resumes it). The attempt
    /// counter stays as it is because it is the fencing token; `max_attempts` grows by one
    /// instead.
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        let sql = format!(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_until = NULL,
                    max_attempts = max_attempts + 1, not_before = 0, updated_at = ? WHERE {FENCE}"
        );
        self.fenced(lease, sql, |q| q).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    const T0: i64 = 1_700_000_000_000;

    async fn pool(dir: &tempfile::TempDir) -> Pool {
        crate::catalog::open_pool(&storinator_testkit::db::url_for(
            &dir.path().join("jobs.db"),
        ))
        .await
        .unwrap()
    }

    async fn setup() -> (tempfile::TempDir, Jobs, ManualClock) {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let jobs = Jobs::new(pool(&dir).await)
            .with_clock(Arc::new(clock.clone()))
            .with_policy(JobPolicy {
                lease_ms: 10_000,
                backoff_base_ms: 1_000,
                backoff_max_ms: 4_000,
                max_attempts: 3,
            });
        (dir, jobs, clock)
    }

    fn backup() -> JobArgs {
        JobArgs::Backup {
            path: "/srv/data".into(),
            encrypt: true,
        }
    }

    #[tokio::test]
    async fn enqueue_and_read_back() {
        let (_d, jobs, _c) = setup().await;
        let job = jobs.enqueue(7, 70, &backup()).await.unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.args, backup());
        assert_eq!(job.attempt, 0);
        assert_eq!(job.created_at, T0);
        assert_eq!(jobs.get(job.id).await.unwrap().unwrap(), job);
        assert!(jobs.get_for_user(job.id, 8).await.unwrap().is_none());
        assert_eq!(jobs.list_for_user(7, 10).await.unwrap().len(), 1);
        assert!(jobs.list_for_user(8, 10).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claimers_get_distinct_jobs() {
        let (_d, jobs, _c) = setup().await;
        let mut queued = Vec::new();
        for _ in 0..5 {
            queued.push(jobs.enqueue(7, 70, &backup()).await.unwrap().id);
        }
        // Eight claimers race for five jobs: each job goes to exactly one of them, and the
        // three left over get nothing.
        let mut tasks = Vec::new();
        for i in 0..8 {
            let jobs = jobs.clone();
            tasks.push(tokio::spawn(async move {
                jobs.claim(&format!("w{i}")).await.unwrap()
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            if let Some((j, lease)) = t.await.unwrap() {
                winners.push((j, lease));
            }
        }
        assert_eq!(winners.len(), 5, "one claimer per job");
        let mut won: Vec<JobId> = winners.iter().map(|(j, _)| j.id).collect();
        won.sort();
        assert_eq!(won, queued, "every job claimed once");
        let mut owners: Vec<&str> = winners.iter().map(|(_, l)| l.owner.as_str()).collect();
        owners.sort();
        owners.dedup();
        assert_eq!(owners.len(), 5, "no claimer got two jobs in one claim");
        for (j, lease) in &winners {
            assert_eq!(lease.attempt, 1);
            assert_eq!(j.state, JobState::Running);
            let row = jobs.get(j.id).await.unwrap().unwrap();
            assert_eq!(row.lease_owner.as_deref(), Some(lease.owner.as_str()));
        }
        assert!(jobs.claim("late").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn lease_expiry_allows_reclaim_and_fences_the_old_worker() {
        let (_d, jobs, clock) = setup().await;
        let job = jobs.enqueue(7, 70, &backup()).await.unwrap();
        let (_, a) = jobs.claim("a").await.unwrap().unwrap();
        // Leased: nobody else gets it.
        assert!(jobs.claim("b").await.unwrap().is_none());
        clock.advance(5_000);
        assert_eq!(jobs.heartbeat(&a).await.unwrap(), Signal::Continue);
        clock.advance(9_000);
        assert!(
            jobs.claim("b").await.unwrap().is_none(),
            "heartbeat renewed"
        );
        assert!(jobs.stalled().await.unwrap().is_empty());
        // Worker a goes silent past its lease.
        clock.advance(10_001);
        assert_eq!(jobs.stalled().await.unwrap().len(), 1);
        let (j, b) = jobs.claim("b").await.unwrap().unwrap();
        assert_eq!(j.id, job.id);
        assert_eq!(b.attempt, 2);
        // a comes back: every write is refused.
        let p = ProgressReport::default();
        for r in [
            jobs.heartbeat(&a).await.map(|_| ()),
            jobs.report_progress(&a, &p).await.map(|_| ()),
            jobs.finish(&a, &result()).await,
            jobs.cancelled(&a).await,
            jobs.release(&a).await,
            jobs.fail(&a, "x", None, false).await.map(|_| ()),
        ] {
            assert!(matches!(r, Err(JobError::LeaseLost { .. })), "{r:?}");
        }
        // b finishes.
        jobs.finish(&b, &result()).await.unwrap();
        let j = jobs.get(job.id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Done);
        assert_eq!(j.result, Some(result()));
        assert!(
            jobs.heartbeat(&b).await.is_err(),
            "a finished job has no lease"
        );
    }

    fn result() -> JobResult {
        JobResult::Backup {
            snapshot: "abc".into(),
            files: 1,
            dirs: 1,
            bytes: 10,
            bytes_stored: 5,
            new_chunks: 1,
            warnings: 0,
            duration_ms: 3,
        }
    }

    #[tokio::test]
    async fn retryable_failures_back_off_until_attempts_run_out() {
        let (_d, jobs, clock) = setup().await;
        let job = jobs.enqueue(7, 70, &backup()).await.unwrap();
        let mut expected_backoff = [1_000, 2_000].into_iter();
        for attempt in 1..=3 {
            let (_, lease) = jobs.claim("w").await.unwrap().unwrap();
            assert_eq!(lease.attempt, attempt);
            let state = jobs.fail(&lease, "flaky disk", None, true).await.unwrap();
            if attempt < 3 {
                assert_eq!(state, JobState::Queued);
                let backoff = expected_backoff.next().unwrap();
                let j = jobs.get(job.id).await.unwrap().unwrap();
                assert_eq!(j.not_before, clock.now_ms() + backoff);
                clock.advance(backoff - 1);
                assert!(
                    jobs.claim("w").await.unwrap().is_none(),
                    "still backing off"
                );
                clock.advance(1);
            } else {
                assert_eq!(state, JobState::Failed);
            }
        }
        let j = jobs.get(job.id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.as_deref(), Some("flaky disk"));
        assert!(jobs.claim("w").await.unwrap().is_none());
        assert_eq!(jobs.policy().backoff_ms(10), 4_000, "backoff is bounded");
    }

    #[tokio::test]
    async fn permanent_failure_is_not_retried() {
        let (_d, jobs, _c) = setup().await;
        jobs.enqueue(7, 70, &backup()).await.unwrap();
        let (_, lease) = jobs.claim("w").await.unwrap().unwrap();
        let conflicts = JobResult::Conflicts {
            count: 2,
            sample: vec!["a".into(), "b".into()],
            snapshot: Some("abcd1234".into()),
        };
        let state = jobs
            .fail(&lease, "2 files differ", Some(&conflicts), false)
            .await
            .unwrap();
        assert_eq!(state, JobState::Failed);
        let j = jobs.get(lease.job_id).await.unwrap().unwrap();
        assert_eq!(j.result, Some(conflicts));
        assert_eq!(jobs.finished_unnotified().await.unwrap().len(), 1);
        jobs.mark_final_notified(j.id).await.unwrap();
        assert!(jobs.finished_unnotified().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflict_is_answered_once_and_overwrites_the_pinned_snapshot() {
        let (_d, jobs, _c) = setup().await;
        let restore = JobArgs::Restore {
            path: "/srv/data".into(),
            to: None,
            snapshot: None,
            overwrite: false,
        };
        let j = jobs.enqueue(7, 70, &restore).await.unwrap();
        let (_, lease) = jobs.claim("w").await.unwrap().unwrap();
        // Not failed yet: nothing to answer.
        assert_eq!(
            jobs.answer_conflict(j.id, 7, Answer::Overwrite)
                .await
                .unwrap(),
            AnswerOutcome::NotWaiting
        );
        let conflicts = JobResult::Conflicts {
            count: 1,
            sample: vec!["data/a".into()],
            snapshot: Some("5eed0001".into()),
        };
        jobs.fail(&lease, "1 file differs", Some(&conflicts), false)
            .await
            .unwrap();
        // Another user's tap finds nothing.
        assert_eq!(
            jobs.answer_conflict(j.id, 8, Answer::Overwrite)
                .await
                .unwrap(),
            AnswerOutcome::NotWaiting
        );
        // Many taps at once (two bot processes, a double tap): one restore is queued.
        let mut taps = Vec::new();
        for _ in 0..6 {
            let jobs = jobs.clone();
            taps.push(tokio::spawn(async move {
                jobs.answer_conflict(j.id, 7, Answer::Overwrite).await
            }));
        }
        let mut started = Vec::new();
        for t in taps {
            match t.await.unwrap() {
                Ok(AnswerOutcome::Overwriting(new)) => started.push(*new),
                Ok(AnswerOutcome::AlreadyAnswered) => {}
                // No tap fails: each waits its turn for the write lock (a deferred
                // transaction's stale read used to fail some with SQLITE_BUSY).
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(started.len(), 1);
        assert_eq!(
            started[0].args,
            JobArgs::Restore {
                path: "/srv/data".into(),
                to: None,
                snapshot: Some("5eed0001".into()),
                overwrite: true,
            }
        );
        // A restarted bot (same database) sees the answer.
        assert_eq!(
            jobs.answer_conflict(j.id, 7, Answer::Keep).await.unwrap(),
            AnswerOutcome::AlreadyAnswered
        );
        assert_eq!(jobs.list_for_user(7, 10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn consents_are_remembered() {
        let (_d, jobs, _c) = setup().await;
        assert!(!jobs.has_consent(7, "get").await.unwrap());
        jobs.give_consent(7, "get").await.unwrap();
        jobs.give_consent(7, "get").await.unwrap();
        assert!(jobs.has_consent(7, "get").await.unwrap());
        assert!(!jobs.has_consent(8, "get").await.unwrap());
    }

    #[tokio::test]
    async fn cancel_queued_is_immediate_and_running_is_signalled() {
        let (_d, jobs, _c) = setup().await;
        let q = jobs.enqueue(7, 70, &backup()).await.unwrap();
        assert!(matches!(
            jobs.request_cancel(q.id, 8).await,
            Err(JobError::NotFound(_))
        ));
        assert_eq!(
            jobs.request_cancel(q.id, 7).await.unwrap(),
            CancelOutcome::Cancelled
        );
        assert_eq!(
            jobs.request_cancel(q.id, 7).await.unwrap(),
            CancelOutcome::AlreadyFinished(JobState::Cancelled)
        );
        assert!(jobs.claim("w").await.unwrap().is_none());

        let r = jobs.enqueue(7, 70, &backup()).await.unwrap();
        let (_, lease) = jobs.claim("w").await.unwrap().unwrap();
        assert_eq!(
            jobs.request_cancel(r.id, 7).await.unwrap(),
            CancelOutcome::Requested
        );
        assert_eq!(jobs.heartbeat(&lease).await.unwrap(), Signal::Cancel);
        assert_eq!(
            jobs.report_progress(&lease, &ProgressReport::default())
                .await
                .unwrap(),
            Signal::Cancel
        );
        jobs.cancelled(&lease).await.unwrap();
        assert_eq!(
            jobs.get(r.id).await.unwrap().unwrap().state,
            JobState::Cancelled
        );
        // A retryable failure of a job being cancelled does not requeue it.
        let s = jobs.enqueue(7, 70, &backup()).await.unwrap();
        let (_, lease) = jobs.claim("w").await.unwrap().unwrap();
        jobs.request_cancel(s.id, 7).await.unwrap();
        let state = jobs
            .fail(&lease, "connection dropped", None, true)
            .await
            .unwrap();
        assert_eq!(state, JobState::Failed);
        assert_eq!(
            jobs.get(s.id).await.unwrap().unwrap().state,
            JobState::Failed
        );
        assert!(jobs.claim("w").await.unwrap().is_none(), "not queued again");
    }

    #[tokio::test]
    async fn expired_jobs_out_of_attempts_or_cancelled_are_settled() {
        let (_d, jobs, clock) = setup().await;
        let a = jobs.enqueue(7, 70, &backup()).await.unwrap();
        // Three workers in a row die holding the job.
        for _ in 0..3 {
            assert!(jobs.claim("w").await.unwrap().is_some());
            clock.advance(10_001);
        }
        assert!(jobs.claim("w").await.unwrap().is_none());
        let a = jobs.get(a.id).await.unwrap().unwrap();
        assert_eq!(a.state, JobState::Failed);
        assert!(a.error.unwrap().contains("stopped responding"));

        let b = jobs.enqueue(7, 70, &backup()).await.unwrap();
        jobs.claim("w").await.unwrap().unwrap();
        jobs.request_cancel(b.id, 7).await.unwrap();
        clock.advance(10_001);
        assert!(jobs.claim("w").await.unwrap().is_none());
        assert_eq!(
            jobs.get(b.id).await.unwrap().unwrap().state,
            JobState::Cancelled
        );
    }

    #[tokio::test]
    async fn release_requeues_without_spending_an_attempt() {
        let (_d, jobs, _c) = setup().await;
        let j = jobs.enqueue(7, 70, &backup()).await.unwrap();
        let (_, lease) = jobs.claim("w").await.unwrap().unwrap();
        jobs.release(&lease).await.unwrap();
        let j = jobs.get(j.id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Queued);
        assert_eq!(j.max_attempts, 4);
        let (_, lease2) = jobs.claim("w").await.unwrap().unwrap();
        assert_eq!(lease2.attempt, 2);
        assert!(jobs.heartbeat(&lease).await.is_err());
    }

    #[tokio::test]
    async fn progress_is_recorded_and_drives_message_edits() {
        let (_d, jobs, clock) = setup().await;
        let j = jobs.enqueue(7, 70, &backup()).await.unwrap();
        jobs.set_progress_message(j.id, 42).await.unwrap();
        // Fresh job: updated_at > shown_at (0) → the bot renders it once.
        assert_eq!(jobs.needing_progress_edit().await.unwrap().len(), 1);
        jobs.mark_shown(j.id, j.updated_at).await.unwrap();
        assert!(jobs.needing_progress_edit().await.unwrap().is_empty());
        let (_, lease) = jobs.claim("w").await.unwrap().unwrap();
        clock.advance(1_000);
        let p = ProgressReport {
            phase: Phase::Uploading,
            files_done: 1,
            files_total: 2,
            bytes_done: 100,
            bytes_total: 200,
            bytes_stored: 50,
        };
        jobs.report_progress(&lease, &p).await.unwrap();
        let edits = jobs.needing_progress_edit().await.unwrap();
        assert_eq!(edits.len(), 1);
        assert_eq!(edits[0].progress, p);
        assert_eq!(edits[0].progress_message_id, Some(42));
        jobs.set_estimate(&lease, &serde_json::json!({"files": 2}))
            .await
            .unwrap();
        assert_eq!(
            jobs.get(j.id).await.unwrap().unwrap().estimate,
            Some(serde_json::json!({"files": 2}))
        );
        let slow = Throttle {
            reason: "slowed down".into(),
            bytes_per_sec: 1234.5,
            pending_bytes: 7,
            eta_secs: Some(99),
        };
        jobs.set_throttle(&lease, Some(&slow)).await.unwrap();
        assert_eq!(jobs.get(j.id).await.unwrap().unwrap().throttle, Some(slow));
        jobs.set_throttle(&lease, None).await.unwrap();
        assert_eq!(jobs.get(j.id).await.unwrap().unwrap().throttle, None);
        // Stall notices: once per stall.
        clock.advance(10_001);
        assert_eq!(jobs.stalled_unnotified().await.unwrap().len(), 1);
        jobs.mark_stall_notified(j.id).await.unwrap();
        assert!(jobs.stalled_unnotified().await.unwrap().is_empty());
    }
}

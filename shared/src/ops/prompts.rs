//! Questions the bot asked with buttons whose answer queues work: the `/forget` and `/prune`
//! confirmations. The question lives in the database and the buttons carry only its id, so
//! the answer is checked against the asker and acted on once, whatever the taps, bot
//! processes or restarts.

use crate::catalog::DbRow;
use sqlx::Row;

use super::jobs::{Job, JobArgs, JobError, Jobs, NewJob, Result};

/// How long a `/forget` prompt may be answered. After that the snapshots may have changed
/// enough that the user should look again.
pub const FORGET_PROMPT_TTL_MS: i64 = 60 * 60 * 1000;

/// How long a `/prune` prompt may be answered: what a prune frees changes with every backup
/// and forget, so the figures shown go stale sooner.
pub const PRUNE_PROMPT_TTL_MS: i64 = 15 * 60 * 1000;

/// What became of a tap on a `/forget` or `/prune` prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptOutcome {
    /// The job was queued.
    Queued(Box<Job>),
    /// A prune (this job) is queued or running already; nothing was queued and the prompt
    /// can be answered again once it is done.
    Busy(i64),
    /// The user said no; nothing happens.
    Cancelled,
    /// Answered before (a double tap, another bot process).
    AlreadyAnswered,
    /// Too old to act on.
    Expired,
    /// No such prompt for this user (not theirs, or made up).
    NotWaiting,
}

/// A `/prune` dry run as shown to the user: the options it was computed with.
#[derive(Clone, Debug)]
pub struct NewPrunePrompt {
    pub user_id: i64,
    pub chat_id: i64,
    pub max_repack: Option<u64>,
    pub repack_below: f64,
}

/// A `/forget` dry run as shown to the user.
#[derive(Clone, Debug)]
pub struct NewForgetPrompt<'a> {
    pub user_id: i64,
    pub chat_id: i64,
    pub root: &'a str,
    pub policy: &'a str,
    /// Short ids of the snapshots that would go.
    pub snapshots: &'a [String],
}

impl Jobs {
    /// Records a `/forget` prompt; returns its id for the buttons.
    pub async fn create_forget_prompt(&self, p: &NewForgetPrompt<'_>) -> Result<i64> {
        let snaps = serde_json::to_string(p.snapshots).expect("short ids serialise");
        let id = sqlx::query_scalar(
            "INSERT INTO forget_prompts (user_id, chat_id, root, policy, snapshots, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(p.user_id)
        .bind(p.chat_id)
        .bind(p.root)
        .bind(p.policy)
        .bind(snaps)
        .bind(self.now_ms())
        .fetch_one(self.pool())
        .await?;
        Ok(id)
    }

    /// Acts on the answer to `/forget` prompt `id` by `user_id`, once: the answer is recorded
    /// in the same transaction that queues the forget job.
    pub async fn answer_forget_prompt(
        &self,
        id: i64,
        user_id: i64,
        confirm: bool,
    ) -> Result<PromptOutcome> {
        self.answer_prompt(PromptKind::Forget, id, user_id, confirm, |row| {
            let snapshots: String = row.try_get("snapshots")?;
            Ok(JobArgs::Forget {
                path: row.try_get("root")?,
                policy: row.try_get("policy")?,
                snapshots: serde_json::from_str(&snapshots).map_err(|e| JobError::Corrupt {
                    job_id: 0,
                    field: "forget_prompts.snapshots",
                    message: e.to_string(),
                })?,
            })
        })
        .await
    }

    /// Records a `/prune` prompt; returns its id for the buttons.
    pub async fn create_prune_prompt(&self, p: &NewPrunePrompt) -> Result<i64> {
        let id = sqlx::query_scalar(
            "INSERT INTO prune_prompts (user_id, chat_id, max_repack, repack_below, created_at)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(p.user_id)
        .bind(p.chat_id)
        .bind(p.max_repack.map(|b| b as i64))
        .bind(p.repack_below)
        .bind(self.now_ms())
        .fetch_one(self.pool())
        .await?;
        Ok(id)
    }

    /// Acts on the answer to `/prune` prompt `id` by `user_id`, once, like
    /// [`Jobs::answer_forget_prompt`]; a confirmation while another prune is queued or running
    /// queues nothing ([`PromptOutcome::Busy`]).
    pub async fn answer_prune_prompt(
        &self,
        id: i64,
        user_id: i64,
        confirm: bool,
    ) -> Result<PromptOutcome> {
        self.answer_prompt(PromptKind::Prune, id, user_id, confirm, |row| {
            Ok(JobArgs::Prune {
                max_repack: row
                    .try_get::<Option<i64>, _>("max_repack")?
                    .map(|b| b as u64),
                repack_below: row.try_get("repack_below")?,
            })
        })
        .await
    }

    /// One prompt's answer: checked against the asker and the prompt's age, recorded once,
    /// and on confirmation the job made by `args` from the prompt's row queued in the same
    /// transaction.
    async fn answer_prompt(
        &self,
        kind: PromptKind,
        id: i64,
        user_id: i64,
        confirm: bool,
        args: impl FnOnce(&DbRow) -> Result<JobArgs>,
    ) -> Result<PromptOutcome> {
        let table = kind.table();
        let now = self.now_ms();
        // IMMEDIATE: this transaction reads, then writes. Begun deferred, its read snapshot
        // goes stale as soon as another connection commits (the daemon writes job progress
        // all the time), and SQLite refuses the upgrade to a write with SQLITE_BUSY at once,
        // without waiting: the tap would go unanswered.
        let mut tx = crate::catalog::begin_write(self.pool()).await?;
        let row = sqlx::query(crate::catalog::sql(format!(
            "SELECT * FROM {table} WHERE id = ? AND user_id = ?"
        )))
        .bind(id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(PromptOutcome::NotWaiting);
        };
        if row.try_get::<Option<String>, _>("answer")?.is_some() {
            return Ok(PromptOutcome::AlreadyAnswered);
        }
        if now - row.try_get::<i64, _>("created_at")? > kind.ttl_ms() {
            return Ok(PromptOutcome::Expired);
        }
        if confirm && kind == PromptKind::Prune {
            // One prune at a time: a second would copy the same sparse packs again.
            let busy: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM jobs WHERE kind = 'prune' AND state IN ('queued', 'running')
                 ORDER BY id LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(job) = busy {
                return Ok(PromptOutcome::Busy(job));
            }
        }
        let marked = sqlx::query(crate::catalog::sql(format!(
            "UPDATE {table} SET answer = ? WHERE id = ? AND answer IS NULL"
        )))
        .bind(if confirm { kind.verb() } else { "cancel" })
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() != 1 {
            return Ok(PromptOutcome::AlreadyAnswered);
        }
        if !confirm {
            tx.commit().await?;
            return Ok(PromptOutcome::Cancelled);
        }
        let args = args(&row)?;
        let job = self
            .insert(
                &mut *tx,
                &NewJob {
                    user_id,
                    chat_id: row.try_get("chat_id")?,
                    args: &args,
                    schedule_id: None,
                    owner: None,
                    host: None,
                    not_before: 0,
                },
            )
            .await?;
        sqlx::query(crate::catalog::sql(format!(
            "UPDATE {table} SET answer_job = ? WHERE id = ?"
        )))
        .bind(job.id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PromptOutcome::Queued(Box::new(job)))
    }
}

/// The questions asked with buttons, each with a table of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PromptKind {
    Forget,
    Prune,
}

impl PromptKind {
    fn table(self) -> &'static str {
        match self {
            PromptKind::Forget => "forget_prompts",
            PromptKind::Prune => "prune_prompts",
        }
    }

    /// The recorded answer of a confirmation.
    fn verb(self) -> &'static str {
        match self {
            PromptKind::Forget => "forget",
            PromptKind::Prune => "prune",
        }
    }

    fn ttl_ms(self) -> i64 {
        match self {
            PromptKind::Forget => FORGET_PROMPT_TTL_MS,
            PromptKind::Prune => PRUNE_PROMPT_TTL_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::catalog::Catalog;
    use crate::clock::ManualClock;
    use crate::ops::jobs::JobState;

    async fn setup() -> (tempfile::TempDir, Jobs, ManualClock) {
        let dir = tempfile::tempdir().unwrap();
        let url = storinator_testkit::db::url_for(&dir.path().join("p.db"));
        let catalog = Catalog::open(&url).await.unwrap();
        let clock = ManualClock::new(1_700_000_000_000);
        let jobs = Jobs::new(catalog.pool().clone()).with_clock(Arc::new(clock.clone()));
        (dir, jobs, clock)
    }

    async fn prompt(jobs: &Jobs) -> i64 {
        let snaps = vec!["aaaa1111".to_string(), "bbbb2222".to_string()];
        jobs.create_forget_prompt(&NewForgetPrompt {
            user_id: 7,
            chat_id: 70,
            root: "/srv/data",
            policy: "keep daily 7",
            snapshots: &snaps,
        })
        .await
        .unwrap()
    }

    async fn job_count(jobs: &Jobs) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(jobs.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn confirm_queues_one_forget_of_exactly_the_shown_snapshots() {
        let (_d, jobs, _c) = setup().await;
        let id = prompt(&jobs).await;
        // Someone else's tap, or a made-up id: nothing.
        assert_eq!(
            jobs.answer_forget_prompt(id, 8, true).await.unwrap(),
            PromptOutcome::NotWaiting
        );
        assert_eq!(
            jobs.answer_forget_prompt(id + 1, 7, true).await.unwrap(),
            PromptOutcome::NotWaiting
        );
        let PromptOutcome::Queued(job) = jobs.answer_forget_prompt(id, 7, true).await.unwrap()
        else {
            panic!("not queued")
        };
        assert_eq!(job.state, JobState::Queued);
        assert_eq!((job.user_id, job.chat_id), (7, 70));
        assert_eq!(
            job.args,
            JobArgs::Forget {
                path: "/srv/data".into(),
                policy: "keep daily 7".into(),
                snapshots: vec!["aaaa1111".into(), "bbbb2222".into()],
            }
        );
        // A double tap, or Cancel after Forget: answered already, no second job.
        for confirm in [true, false] {
            assert_eq!(
                jobs.answer_forget_prompt(id, 7, confirm).await.unwrap(),
                PromptOutcome::AlreadyAnswered
            );
        }
        assert_eq!(job_count(&jobs).await, 1);
    }

    /// A tap while another connection is writing (the daemon records progress all the time):
    /// the answer waits for the write lock instead of failing on a stale read snapshot.
    #[tokio::test]
    async fn an_answer_during_another_write_waits_and_succeeds() {
        let (_d, jobs, _c) = setup().await;
        let id = prompt(&jobs).await;
        let mut other = crate::catalog::begin_write(jobs.pool()).await.unwrap();
        sqlx::query(
            "INSERT INTO forget_prompts (user_id, chat_id, root, policy, snapshots, created_at)
             VALUES (8, 80, '/x', 'keep last 1', '[]', 0)",
        )
        .execute(&mut *other)
        .await
        .unwrap();
        let answering = {
            let jobs = jobs.clone();
            tokio::spawn(async move { jobs.answer_forget_prompt(id, 7, true).await })
        };
        // Long enough for a deferred transaction to have read before the other commits.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        other.commit().await.unwrap();
        let outcome = answering.await.unwrap().unwrap();
        assert!(matches!(outcome, PromptOutcome::Queued(_)), "{outcome:?}");
        assert_eq!(job_count(&jobs).await, 1);
    }

    #[tokio::test]
    async fn cancel_and_expiry_queue_nothing() {
        let (_d, jobs, clock) = setup().await;
        let id = prompt(&jobs).await;
        assert_eq!(
            jobs.answer_forget_prompt(id, 7, false).await.unwrap(),
            PromptOutcome::Cancelled
        );
        assert_eq!(
            jobs.answer_forget_prompt(id, 7, true).await.unwrap(),
            PromptOutcome::AlreadyAnswered
        );
        let old = prompt(&jobs).await;
        clock.advance(FORGET_PROMPT_TTL_MS + 1);
        assert_eq!(
            jobs.answer_forget_prompt(old, 7, true).await.unwrap(),
            PromptOutcome::Expired
        );
        assert_eq!(job_count(&jobs).await, 0);
    }

    #[tokio::test]
    async fn a_prune_prompt_queues_one_prune_with_its_options_and_never_two_at_once() {
        let (_d, jobs, clock) = setup().await;
        let new = |user_id| NewPrunePrompt {
            user_id,
            chat_id: 70,
            max_repack: Some(200 << 20),
            repack_below: 30.0,
        };
        let id = jobs.create_prune_prompt(&new(7)).await.unwrap();
        assert_eq!(
            jobs.answer_prune_prompt(id, 8, true).await.unwrap(),
            PromptOutcome::NotWaiting,
            "someone else's tap"
        );
        let PromptOutcome::Queued(job) = jobs.answer_prune_prompt(id, 7, true).await.unwrap()
        else {
            panic!("not queued")
        };
        assert_eq!(
            job.args,
            JobArgs::Prune {
                max_repack: Some(200 << 20),
                repack_below: 30.0,
            }
        );
        assert_eq!(
            jobs.answer_prune_prompt(id, 7, true).await.unwrap(),
            PromptOutcome::AlreadyAnswered
        );
        // A second prompt confirmed while that prune is queued: nothing, and it stays
        // answerable; Cancel still works.
        let second = jobs.create_prune_prompt(&new(7)).await.unwrap();
        assert_eq!(
            jobs.answer_prune_prompt(second, 7, true).await.unwrap(),
            PromptOutcome::Busy(job.id)
        );
        assert_eq!(
            jobs.answer_prune_prompt(second, 7, false).await.unwrap(),
            PromptOutcome::Cancelled
        );
        assert_eq!(job_count(&jobs).await, 1);
        // Prune prompts go stale sooner than forget prompts.
        let old = jobs.create_prune_prompt(&new(7)).await.unwrap();
        clock.advance(PRUNE_PROMPT_TTL_MS + 1);
        assert_eq!(
            jobs.answer_prune_prompt(old, 7, true).await.unwrap(),
            PromptOutcome::Expired
        );
        assert_eq!(job_count(&jobs).await, 1);
    }
}

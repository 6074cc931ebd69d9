//! Questions the bot asked with buttons whose answer queues work: today the `/forget`
//! confirmation. The question lives in the database and the buttons carry only its id, so
//! the answer is checked against the asker and acted on once, whatever the taps, bot
//! processes or restarts.

use sqlx::Row;

use super::jobs::{Job, JobArgs, JobError, Jobs, NewJob, Result};

/// How long a `/forget` prompt may be answered. After that the snapshots may have changed
/// enough that the user should look again.
pub const FORGET_PROMPT_TTL_MS: i64 = 60 * 60 * 1000;

/// What became of a tap on a `/forget` prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptOutcome {
    /// The forget job was queued.
    Queued(Box<Job>),
    /// The user said no; nothing happens.
    Cancelled,
    /// Answered before (a double tap, another bot process).
    AlreadyAnswered,
    /// Too old to act on.
    Expired,
    /// No such prompt for this user (not theirs, or made up).
    NotWaiting,
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
             VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
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
        let now = self.now_ms();
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query("SELECT * FROM forget_prompts WHERE id = ? AND user_id = ?")
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
        if now - row.try_get::<i64, _>("created_at")? > FORGET_PROMPT_TTL_MS {
            return Ok(PromptOutcome::Expired);
        }
        let marked =
            sqlx::query("UPDATE forget_prompts SET answer = ? WHERE id = ? AND answer IS NULL")
                .bind(if confirm { "forget" } else { "cancel" })
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
        let snapshots: String = row.try_get("snapshots")?;
        let args = JobArgs::Forget {
            path: row.try_get("root")?,
            policy: row.try_get("policy")?,
            snapshots: serde_json::from_str(&snapshots).map_err(|e| JobError::Corrupt {
                job_id: 0,
                field: "forget_prompts.snapshots",
                message: e.to_string(),
            })?,
        };
        let job = self
            .insert(
                &mut *tx,
                &NewJob {
                    user_id,
                    chat_id: row.try_get("chat_id")?,
                    args: &args,
                    schedule_id: None,
                    owner: None,
                    not_before: 0,
                },
            )
            .await?;
        sqlx::query("UPDATE forget_prompts SET answer_job = ? WHERE id = ?")
            .bind(job.id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(PromptOutcome::Queued(Box::new(job)))
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
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
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
}

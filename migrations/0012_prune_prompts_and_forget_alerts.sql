-- The chat's `/prune` prompts (issue 10), like `forget_prompts`: the dry run the user was
-- shown, its options kept here so the buttons carry only the prompt's id, and the answer
-- recorded once, in the same transaction that queues the prune job.
CREATE TABLE prune_prompts (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER NOT NULL,
    chat_id      INTEGER NOT NULL,
    max_repack   INTEGER,
    repack_below REAL    NOT NULL,
    created_at   INTEGER NOT NULL,
    answer       TEXT    CHECK (answer IN ('prune', 'cancel')),
    answer_job   INTEGER
);

-- A schedule's keep policy that failed to apply after a scheduled backup (the backup stands).
-- The bot tells the schedule's owner once (`alerted_at`), like the schedules' other alerts.
CREATE TABLE forget_failures (
    id          INTEGER PRIMARY KEY,
    schedule_id INTEGER NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    job_id      INTEGER NOT NULL,
    error       TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    alerted_at  INTEGER
);
CREATE INDEX forget_failures_unalerted ON forget_failures (id) WHERE alerted_at IS NULL;

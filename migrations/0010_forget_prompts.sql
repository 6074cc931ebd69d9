-- The chat's `/forget` prompts (issue 10): the dry run the user was shown, kept here so the
-- buttons carry only the prompt's id, and the answer recorded once, in the same transaction
-- that queues the forget job, so a double tap, a second bot process or a restarted bot can't
-- act on it twice. `snapshots` is the JSON list of the short ids that would go: the job
-- forgets at most those.
CREATE TABLE forget_prompts (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL,
    chat_id    INTEGER NOT NULL,
    root       TEXT    NOT NULL,
    policy     TEXT    NOT NULL,
    snapshots  TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    answer     TEXT    CHECK (answer IN ('forget', 'cancel')),
    answer_job INTEGER
);

-- The answer to a restore-conflict prompt lives with the job, so a double tap, a second bot
-- process or a restarted bot can't act on it twice: `answer` is 'overwrite' or 'keep', and
-- `answer_job` the overwriting restore it queued (pinned to the snapshot that conflicted).
ALTER TABLE jobs ADD COLUMN answer TEXT CHECK (answer IN ('overwrite', 'keep'));
ALTER TABLE jobs ADD COLUMN answer_job INTEGER;

-- What a chat user agreed to once, such as having plaintext copies of files sent into
-- Telegram by /get.
CREATE TABLE consents (
    user_id INTEGER NOT NULL,
    what    TEXT    NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (user_id, what)
);

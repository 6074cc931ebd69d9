-- What the bot has already shown for each job, so a restarted bot neither repeats nor misses a
-- notice. `shown_at` is the job's `updated_at` that the progress message last reflected;
-- `final_notified` is set once the completion / failure notice went out; `stall_notified` once
-- the user was told the worker stopped heartbeating (cleared when a worker reclaims the job).
ALTER TABLE jobs ADD COLUMN shown_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN final_notified INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN stall_notified INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_unnotified ON jobs (final_notified, state);

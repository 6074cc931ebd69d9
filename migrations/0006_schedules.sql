-- Unattended work: schedules that fire backup jobs, the alerts the bot sends about them, the
-- weekly digest, and the scrub that reads packs back within a daily budget.

-- A schedule: back up `path` for `owner` at every slot of its cadence. `cron` holds the
-- pattern every calendar form is turned into (`hourly`, `daily 03:00`, `weekly mon 03:00`, a
-- quoted cron expression), evaluated in STORINATOR_TIMEZONE; `every_ms` is the period of
-- `every <N>h` (elapsed time from `anchor_at`). Exactly one of the two is set.
-- `kind` is 'backup' for users' schedules, 'scrub' for the daily scrub (owner 'system').
CREATE TABLE schedules (
    id            INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL DEFAULT 'backup' CHECK (kind IN ('backup', 'scrub')),
    owner         TEXT    NOT NULL,
    user_id       INTEGER NOT NULL,
    chat_id       INTEGER NOT NULL,
    path          TEXT    NOT NULL,
    spec          TEXT    NOT NULL,
    cron          TEXT,
    every_ms      INTEGER,
    anchor_at     INTEGER NOT NULL,
    encrypt       INTEGER NOT NULL DEFAULT 1,
    -- The retention policy (`keep daily 7 weekly 4 monthly 12`), stored and shown here;
    -- applied by the retention work. NULL: keep everything.
    retention     TEXT,
    paused        INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    -- When the missed-backup check starts counting (creation, or the last resume).
    baseline_at   INTEGER NOT NULL,
    -- The first slot not yet handled by a scheduler.
    next_slot     INTEGER NOT NULL,
    -- Slots skipped because the schedule's previous job was still queued or running.
    skipped       INTEGER NOT NULL DEFAULT 0,
    -- Slots that passed while no scheduler ran, covered by one catch-up job.
    missed        INTEGER NOT NULL DEFAULT 0,
    -- Alert state, written by the bot: the time a "missed backup" alert went out (NULL when
    -- none is outstanding); the failures already reported and when.
    missed_alert_at   INTEGER,
    failures_reported INTEGER NOT NULL DEFAULT 0,
    failure_alert_at  INTEGER
);
CREATE INDEX schedules_by_owner ON schedules (owner, id);
CREATE UNIQUE INDEX schedules_one_scrub ON schedules (kind) WHERE kind = 'scrub';

-- One row per slot a scheduler handled: the unique key that makes a slot fire exactly once,
-- whatever the number of daemons or restarts. `outcome`: 'queued' (a job was inserted),
-- 'skipped' (the previous job was still running), 'refused' (the path or the user is no
-- longer allowed; `detail` says why).
CREATE TABLE schedule_runs (
    schedule_id INTEGER NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    slot        INTEGER NOT NULL,
    outcome     TEXT    NOT NULL CHECK (outcome IN ('queued', 'skipped', 'refused')),
    job_id      INTEGER,
    catch_up    INTEGER NOT NULL DEFAULT 0,
    detail      TEXT,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (schedule_id, slot)
) WITHOUT ROWID;

-- A job fired by a schedule carries its schedule (the retention work reads the policy through
-- it) and the owner it runs for (`local` for the CLI's schedules; NULL: `tg:<user_id>`).
ALTER TABLE jobs ADD COLUMN schedule_id INTEGER;
ALTER TABLE jobs ADD COLUMN owner TEXT;
CREATE INDEX jobs_by_schedule ON jobs (schedule_id, id) WHERE schedule_id IS NOT NULL;

-- Per chat user: the weekly digest (on unless `/digest off`) and the last digest slot sent.
CREATE TABLE user_settings (
    owner          TEXT    PRIMARY KEY,
    chat_id        INTEGER NOT NULL,
    digest         INTEGER NOT NULL DEFAULT 1,
    last_digest_at INTEGER NOT NULL DEFAULT 0
);

-- The scrub's rotation: when each pack was last read whole, and where an unfinished pass
-- stopped (the offset of the next blob to read), so a pack larger than a day's budget is read
-- over several days.
CREATE TABLE scrub_packs (
    pack_id      TEXT    PRIMARY KEY,
    last_read_at INTEGER,
    cursor       INTEGER NOT NULL DEFAULT 0,
    last_result  TEXT
);

-- Chunks a scrub found damaged (missing pack, wrong size, failed authentication). A healed
-- chunk was stored again in `healed_pack` and the catalog points there; an unhealed one is
-- listed until a heal or a backup stores it again.
CREATE TABLE damaged_chunks (
    chunk_id    BLOB    PRIMARY KEY,
    pack_id     TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    found_at    INTEGER NOT NULL,
    healed_at   INTEGER,
    healed_pack TEXT
) WITHOUT ROWID;

-- One row per scrub run, with its report (JSON) for /scrub, /verify and the digest;
-- `alerted` once the bot told the owners of damaged files.
CREATE TABLE scrub_runs (
    id          INTEGER PRIMARY KEY,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    report      TEXT    NOT NULL,
    alerted     INTEGER NOT NULL DEFAULT 0
);

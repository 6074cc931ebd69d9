-- Several storage hosts behind one bot (issue 13): every worker registers its host name and
-- the roots it serves, with a heartbeat; jobs and schedules carry the host that runs them.
-- Plain SQL that ports to PostgreSQL (no WITHOUT ROWID, no SQLite-only functions).

-- A storage host: named by its workers (STORINATOR_HOST, default the machine's hostname).
-- `last_seen` is the newest heartbeat of any of its workers (Unix milliseconds).
CREATE TABLE hosts (
    name          TEXT    PRIMARY KEY,
    registered_at INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL
);

-- The folders a host serves: `backup` roots (what `/backup` and `/restore` are routed by) and
-- `restore` roots (where a chat restore on that host may write). Replaced whole at each
-- registration, so a root removed from a worker's configuration stops being routed to it.
CREATE TABLE host_roots (
    host TEXT NOT NULL REFERENCES hosts (name) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('backup', 'restore')),
    path TEXT NOT NULL,
    PRIMARY KEY (host, kind, path)
);

-- The host whose workers may claim a job, or fire a schedule. NULL: any worker. Jobs queued
-- before this migration, and repository-wide jobs (verify, scrub, prune, forget, get), have
-- none; a single host's old schedules are given its name when it first registers and no
-- other host exists (see ops::hosts).
ALTER TABLE jobs ADD COLUMN host TEXT;
ALTER TABLE schedules ADD COLUMN host TEXT;
CREATE INDEX jobs_by_host ON jobs (host, state, not_before);

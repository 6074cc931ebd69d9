-- Runs that write to the repository (backups, recover), so that one process can tell another's
-- live run from one that crashed. A run is live while, on its own host, it holds the flock on
-- `lock_path` (a file in its spool folder); from another host, while `lease_until` (renewed by
-- the run) has not passed. Work left by a run that is not live may be reclaimed.
CREATE TABLE runs (
    id          TEXT    PRIMARY KEY,
    host        TEXT    NOT NULL,
    pid         INTEGER NOT NULL,
    lock_path   TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    lease_until INTEGER NOT NULL
);

-- One writer per backup root (owner, path): the run holding the row. It goes with its run.
CREATE TABLE root_locks (
    owner       TEXT    NOT NULL,
    root        TEXT    NOT NULL,
    run_id      TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    acquired_at INTEGER NOT NULL,
    PRIMARY KEY (owner, root)
);
CREATE INDEX root_locks_by_run ON root_locks (run_id);

-- The run uploading an unfinished (`uploading`) pack, or reclaiming it after that run died.
-- The row stays until the object is gone from storage, so an orphan is never forgotten.
ALTER TABLE packs ADD COLUMN run_id TEXT;
CREATE INDEX packs_unfinished ON packs (run_id) WHERE state = 'uploading';

-- A leaner catalog (issue 18 goal 4; SQLite: 0023): chunks are found by the first 4 bytes of
-- their id instead of a unique constraint on all 32 (see the SQLite migration for the why).
-- `index_blobs` adds chunks inside the advisory write lock and never two rows for one id;
-- `snapshots.blob_id` loses its foreign key (it needs a unique parent), and a snapshot's
-- commit checks its blob has a row instead. Runs in sqlx's transaction; safe to run again
-- should the bookkeeping row be lost.
ALTER TABLE snapshots DROP CONSTRAINT IF EXISTS snapshots_blob_id_fkey;
ALTER TABLE chunks DROP CONSTRAINT IF EXISTS chunks_id_key;
CREATE INDEX IF NOT EXISTS chunks_by_id ON chunks (substr(id, 1, 4));

-- no-transaction
-- A leaner catalog (issue 18 goal 4): chunks are found by the first 4 bytes of their id
-- instead of a UNIQUE index on all 32. That index held every chunk's id a second time (about
-- 46 bytes per small file on a 1,000,000-file catalog, the largest index of the catalog);
-- the index on the prefix is about 15.
--
-- Every statement that finds a chunk by id names the prefix with the same expression,
-- `substr(id, 1, 4)`, and compares the whole id on the rows it finds (`chunk_id_is` in
-- shared/src/catalog/mod.rs). A prefix shared by two chunks costs a lookup one more row read,
-- nothing else: by chance, a lookup among n chunks reads n / 2^32 more rows on average
-- (0.0002 at a million); ids made to share one (possible only for the unkeyed ids of
-- unencrypted data) take about 2^32 tries each, and cost the same.
--
-- What the UNIQUE constraint did is done by the one statement that adds chunks, `index_blobs`
-- (shared/src/catalog/packs.rs): it looks up the ids it is given, moves the rows that exist
-- and adds the others, inside a write transaction (SQLite's write lock, PostgreSQL's advisory
-- write lock), so no two rows name one id. `snapshots.blob_id` referenced the id; a foreign
-- key needs a unique parent, so it goes, and a snapshot's commit checks that its blob has a
-- row instead (prune never deletes a snapshot's blob: it is in the live set).
--
-- Runs outside sqlx's transaction (rebuilding tables needs foreign keys off, which SQLite
-- ignores inside a transaction); the rebuild itself is one transaction. Safe to run again
-- should the bookkeeping row be lost: both tables are copied by column name, chunks keep
-- their numbers and snapshots their ids, and the rebuild of a rebuilt table gives the same
-- table.
PRAGMA foreign_keys = OFF;
BEGIN;

DROP TABLE IF EXISTS chunks_new;
CREATE TABLE chunks_new (
    id         BLOB    NOT NULL,
    pack_no    INTEGER NOT NULL REFERENCES packs (no),
    offset     INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    raw_length INTEGER NOT NULL,
    kind       INTEGER NOT NULL,
    flags      INTEGER NOT NULL,
    no         INTEGER PRIMARY KEY
);
INSERT INTO chunks_new (id, pack_no, "offset", length, raw_length, kind, flags, no)
    SELECT id, pack_no, "offset", length, raw_length, kind, flags, no FROM chunks ORDER BY no;

DROP TABLE IF EXISTS snapshots_new;
CREATE TABLE snapshots_new (
    id            INTEGER PRIMARY KEY,
    root_id       INTEGER NOT NULL REFERENCES roots (id),
    seq           INTEGER NOT NULL,
    short_id      TEXT    NOT NULL UNIQUE,
    blob_id       BLOB    NOT NULL,
    hostname      TEXT    NOT NULL,
    encrypted     INTEGER NOT NULL,
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER NOT NULL,
    files         INTEGER NOT NULL,
    dirs          INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    bytes_read    INTEGER NOT NULL,
    new_chunks    INTEGER NOT NULL,
    bytes_stored  INTEGER NOT NULL,
    warnings      INTEGER NOT NULL,
    listing_known INTEGER NOT NULL DEFAULT 0,
    UNIQUE (root_id, seq)
);
INSERT INTO snapshots_new (id, root_id, seq, short_id, blob_id, hostname, encrypted, started_at,
                           finished_at, files, dirs, bytes, bytes_read, new_chunks, bytes_stored,
                           warnings, listing_known)
    SELECT id, root_id, seq, short_id, blob_id, hostname, encrypted, started_at, finished_at,
           files, dirs, bytes, bytes_read, new_chunks, bytes_stored, warnings, listing_known
    FROM snapshots ORDER BY id;

DROP TABLE chunks;
DROP TABLE snapshots;
ALTER TABLE chunks_new RENAME TO chunks;
ALTER TABLE snapshots_new RENAME TO snapshots;
CREATE INDEX chunks_by_pack ON chunks (pack_no);
CREATE INDEX chunks_by_id ON chunks (substr(id, 1, 4));

COMMIT;
PRAGMA foreign_keys = ON;

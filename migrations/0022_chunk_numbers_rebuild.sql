-- no-transaction
-- A leaner catalog (issue 18 goal 4), step two of two (0020 added the column): chunks are
-- numbered, and a content's chunk list names its chunks by number.
--
-- `content_chunks` held each chunk's 32-byte id again for every content using it, and
-- `chunks_by_pack` held the id a third time beside the pack number. Measured on a 100,000-file
-- catalog (one chunk per file, `dbstat`): `content_chunks` 47.9 bytes per file, `chunks`
-- 58.9, `chunks_by_pack` 43.3. Numbered, `content_chunks` holds three small integers, the
-- index by pack holds two; the id keeps a unique index of its own (a backup finds chunks by
-- id, and `snapshots.blob_id` references it).
--
-- `chunks.no` is an INTEGER PRIMARY KEY (a rowid alias: unlike an implicit rowid it keeps its
-- value through VACUUM). It is the last column, where 0020 added it. Chunks are numbered in
-- pack order, so a pack's chunks are neighbours in the table, as a restore reads them. A
-- number is never held outside the database: `chunks` rows are deleted only with their pack,
-- after prune has found no content using them.
--
-- A chunk list naming a chunk id with no chunk row (which the foreign key has always refused)
-- fails this migration on `content_chunks_new.chunk_no` rather than losing the link.
--
-- Runs outside sqlx's transaction (rebuilding tables needs foreign keys off, which SQLite
-- ignores inside a transaction); the rebuild itself is one transaction. It is safe to run
-- again should the bookkeeping row be lost: `chunks` has the same columns before and after
-- (0020), a chunk keeps a number it has, and a list entry that is already a number is kept.
PRAGMA foreign_keys = OFF;
BEGIN;

DROP TABLE IF EXISTS chunks_new;
CREATE TABLE chunks_new (
    id         BLOB    NOT NULL UNIQUE,
    pack_no    INTEGER NOT NULL REFERENCES packs (no),
    offset     INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    raw_length INTEGER NOT NULL,
    kind       INTEGER NOT NULL,
    flags      INTEGER NOT NULL,
    no         INTEGER PRIMARY KEY
);
-- Chunks numbered already keep their number; the others (all of them, the first time) are
-- numbered after them, in pack order.
INSERT INTO chunks_new (id, pack_no, "offset", length, raw_length, kind, flags, no)
    SELECT id, pack_no, "offset", length, raw_length, kind, flags, no
    FROM chunks WHERE no IS NOT NULL ORDER BY no;
INSERT INTO chunks_new (id, pack_no, "offset", length, raw_length, kind, flags)
    SELECT id, pack_no, "offset", length, raw_length, kind, flags
    FROM chunks WHERE no IS NULL ORDER BY pack_no, "offset", id;

DROP TABLE IF EXISTS content_chunks_new;
CREATE TABLE content_chunks_new (
    content_id INTEGER NOT NULL REFERENCES contents (id),
    seq        INTEGER NOT NULL,
    chunk_no   INTEGER NOT NULL REFERENCES chunks (no),
    PRIMARY KEY (content_id, seq)
) WITHOUT ROWID;
-- Read with `SELECT *` into fixed names: the third column is the chunk id the first time, its
-- number when this runs again.
WITH was (content_id, seq, chunk) AS (SELECT * FROM content_chunks)
INSERT INTO content_chunks_new (content_id, seq, chunk_no)
    SELECT was.content_id, was.seq,
           CASE WHEN typeof(was.chunk) = 'integer' THEN was.chunk
                ELSE (SELECT n.no FROM chunks_new n WHERE n.id = was.chunk) END
    FROM was ORDER BY was.content_id, was.seq;

DROP TABLE content_chunks;
DROP TABLE chunks;
ALTER TABLE chunks_new RENAME TO chunks;
ALTER TABLE content_chunks_new RENAME TO content_chunks;
CREATE INDEX chunks_by_pack ON chunks (pack_no);

COMMIT;
PRAGMA foreign_keys = ON;

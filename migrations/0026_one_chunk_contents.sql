-- no-transaction
-- A leaner catalog (issue 18 goal 4): a content of one chunk (a small file's) names that chunk
-- in its own row, `contents.chunk_no`, instead of in a row of `content_chunks`. Those rows
-- were about 14.8 bytes per small file on a 1,000,000-file catalog; the column costs about 4.
-- Lists of two chunks or more stay in `content_chunks`, and a content of no chunks (an empty
-- file) has neither. Statements that read chunk lists read both (`CHUNK_LISTS` in
-- shared/src/catalog/mod.rs, or `contents.chunk_no` beside `content_chunks` in a join).
--
-- The column has no foreign key, as `content_chunks.chunk_no` has none since 0025: deleting a
-- chunk would scan `contents` for it. Dropping a pack checks the chunk lists, both kinds, in
-- one pass (`drop_condemned_pack`, shared/src/catalog/retention.rs).
--
-- Runs outside sqlx's transaction (rebuilding tables needs foreign keys off, which SQLite
-- ignores inside a transaction); the rebuild itself is one transaction. Safe to run again
-- should the bookkeeping row be lost: the old `contents` is read through `NATURAL LEFT JOIN
-- was`, a row naming the column the first run lacks (NULL there; the table's value when it has
-- it, as in 0021), a content keeps a chunk it names, and a list already moved has no rows left.
PRAGMA foreign_keys = OFF;
BEGIN;

DROP TABLE IF EXISTS contents_new;
CREATE TABLE contents_new (
    id        INTEGER PRIMARY KEY,
    sha256    BLOB    NOT NULL,
    size      INTEGER NOT NULL,
    encrypted INTEGER NOT NULL,
    key_no    INTEGER NOT NULL DEFAULT 0,
    chunk_no  INTEGER
);
WITH was (chunk_no) AS (VALUES (NULL)),
     single (content_id, chunk_no) AS
        (SELECT content_id, MIN(chunk_no) FROM content_chunks
         GROUP BY content_id HAVING COUNT(*) = 1 AND MIN(seq) = 0)
INSERT INTO contents_new (id, sha256, size, encrypted, key_no, chunk_no)
    SELECT c.id, c.sha256, c.size, c.encrypted, c.key_no, COALESCE(c.chunk_no, s.chunk_no)
    FROM (SELECT * FROM contents NATURAL LEFT JOIN was) c
    LEFT JOIN single s ON s.content_id = c.id
    ORDER BY c.id;

DROP TABLE IF EXISTS content_chunks_new;
CREATE TABLE content_chunks_new (
    content_id INTEGER NOT NULL REFERENCES contents (id),
    seq        INTEGER NOT NULL,
    chunk_no   INTEGER NOT NULL,
    PRIMARY KEY (content_id, seq)
) WITHOUT ROWID;
INSERT INTO content_chunks_new (content_id, seq, chunk_no)
    SELECT content_id, seq, chunk_no FROM content_chunks
    WHERE content_id NOT IN (SELECT id FROM contents_new WHERE chunk_no IS NOT NULL)
    ORDER BY content_id, seq;

DROP TABLE content_chunks;
DROP TABLE contents;
ALTER TABLE contents_new RENAME TO contents;
ALTER TABLE content_chunks_new RENAME TO content_chunks;
CREATE INDEX contents_by_sha256 ON contents (substr(sha256, 1, 4));

COMMIT;
PRAGMA foreign_keys = ON;

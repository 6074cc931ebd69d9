-- no-transaction
-- A leaner catalog (issue 18 goal 4): a content of one chunk (a small file's) takes that
-- chunk's number as its id. Its chunk list is its id, so `contents.chunk_no` (0026) goes, and
-- so do its entries in `contents_by_sha256`: a backup finds a small file's content by the
-- number of its chunk, which it looks up anyway, instead of by the file's SHA-256. On a
-- 1,000,000-file catalog the index held about 14 bytes per file and the column about 4.
--
-- The ids:
-- - a content whose id is above 0 is a content of one chunk, the chunk numbered as it is;
-- - every other content has an id below 0 and its list (of any length, none for an empty
--   file) in `content_chunks`; `contents_by_sha256` holds only these.
-- Chunk numbers never change (a chunk stored again moves its row) and a chunk is never
-- deleted while a list names it (`drop_condemned_pack`), so an id above 0 always names its
-- chunk. A content on a format-1 unencrypted blob, or a second content naming the same
-- chunk, keeps a list of one in `content_chunks`: a later backup finds it by its SHA-256 and
-- moves it to the authenticated copy, as before.
--
-- Runs outside sqlx's transaction (rebuilding tables needs foreign keys off, which SQLite
-- ignores inside a transaction); the rebuild itself is one transaction. Safe to run again
-- should the bookkeeping row be lost: the old `contents` is read through a `NATURAL LEFT JOIN`
-- of a row naming the column it loses; a table without it (this layout) reads -1 there and
-- keeps every id.
PRAGMA foreign_keys = OFF;
BEGIN;

DROP TABLE IF EXISTS content_renumbering;
CREATE TABLE content_renumbering (
    old INTEGER PRIMARY KEY,
    new INTEGER NOT NULL,
    -- The chunk of a one-chunk list that moves from the content's row to `content_chunks`.
    listed_chunk INTEGER
);
-- First the contents that take their chunk's number: the first of each chunk's, on an
-- authenticated blob. Then those that keep their id (this layout's, read with -1 for the
-- column it lacks, and any below 0), then the others, counting down below the lowest id.
-- (Each step joins tables by key: a join on a CTE's rows may have no index to search.)
INSERT INTO content_renumbering (old, new)
    SELECT MIN(c.id), c.chunk_no
    FROM (SELECT * FROM contents NATURAL LEFT JOIN (SELECT -1 AS chunk_no)) c
    JOIN chunks ch ON ch.no = c.chunk_no
    WHERE c.chunk_no > 0 AND ch.flags & 3 <> 0
    GROUP BY c.chunk_no;
INSERT INTO content_renumbering (old, new, listed_chunk)
    SELECT c.id, c.id, CASE WHEN c.chunk_no > 0 THEN c.chunk_no END
    FROM (SELECT * FROM contents NATURAL LEFT JOIN (SELECT -1 AS chunk_no)) c
    LEFT JOIN content_renumbering m ON m.old = c.id
    WHERE m.old IS NULL AND (c.chunk_no = -1 OR c.id < 0);
INSERT INTO content_renumbering (old, new, listed_chunk)
    SELECT c.id,
           (SELECT MIN(COALESCE(MIN(id), 0), 0) FROM contents)
               - ROW_NUMBER() OVER (ORDER BY c.id),
           c.chunk_no
    FROM (SELECT * FROM contents NATURAL LEFT JOIN (SELECT -1 AS chunk_no)) c
    LEFT JOIN content_renumbering m ON m.old = c.id
    WHERE m.old IS NULL
    ORDER BY c.id;

DROP TABLE IF EXISTS contents_new;
CREATE TABLE contents_new (
    id        INTEGER PRIMARY KEY,
    sha256    BLOB    NOT NULL,
    size      INTEGER NOT NULL,
    encrypted INTEGER NOT NULL,
    key_no    INTEGER NOT NULL DEFAULT 0
);
INSERT INTO contents_new (id, sha256, size, encrypted, key_no)
    SELECT m.new, c.sha256, c.size, c.encrypted, c.key_no
    FROM contents c JOIN content_renumbering m ON m.old = c.id
    ORDER BY m.new;

DROP TABLE IF EXISTS content_chunks_new;
CREATE TABLE content_chunks_new (
    content_id INTEGER NOT NULL REFERENCES contents (id),
    seq        INTEGER NOT NULL,
    chunk_no   INTEGER NOT NULL,
    PRIMARY KEY (content_id, seq)
) WITHOUT ROWID;
INSERT INTO content_chunks_new (content_id, seq, chunk_no)
    SELECT m.new, cc.seq, cc.chunk_no FROM content_chunks cc
    JOIN content_renumbering m ON m.old = cc.content_id
    UNION ALL
    SELECT new, 0, listed_chunk FROM content_renumbering WHERE listed_chunk IS NOT NULL
    ORDER BY 1, 2;

UPDATE entries SET content_id = (SELECT new FROM content_renumbering WHERE old = content_id)
    WHERE content_id IN (SELECT old FROM content_renumbering WHERE new <> old);

DROP TABLE content_chunks;
DROP TABLE contents;
DROP TABLE content_renumbering;
ALTER TABLE contents_new RENAME TO contents;
ALTER TABLE content_chunks_new RENAME TO content_chunks;
CREATE INDEX contents_by_sha256 ON contents (substr(sha256, 1, 4)) WHERE id < 0;

COMMIT;
PRAGMA foreign_keys = ON;

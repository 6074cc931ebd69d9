-- no-transaction
-- Forget and prune take time in proportion to what they delete, not to what they delete times
-- the size of the catalog. SQLite checks a foreign key when its parent row is deleted by
-- looking for child rows, and two children had no index to look in: `entries.content_id`
-- (a forget deleting a content scanned every entry) and `content_chunks.chunk_no` (a prune
-- dropping a pack scanned every chunk list once per chunk). Measured on a 100,000-file catalog:
-- deleting 1,000 contents took 7.7 s, dropping a pack of 65,536 chunks 76 s; both grow with
-- the catalog, so a forget of 100,000 changed files of a 1,000,000-file tree would have run for
-- hours. An index on each would cost about 13 bytes per file (issue 18 goal 4); the checks
-- need none:
--
-- - forget deletes only the contents no entry names (that is its WHERE clause);
-- - dropping a condemned pack counts, in one pass, the chunk lists naming a chunk still placed
--   in it, and refuses if there is one (`drop_condemned_pack`, shared/src/catalog/retention.rs);
-- - a snapshot's commit looks up every chunk it names in its own transaction.
--
-- Every one of these holds the catalog's write lock (SQLite's, PostgreSQL's advisory lock), so
-- nothing changes between a check and its delete or insert. The other keys stay: their child
-- columns lead their tables' keys (a content's chunk list, a root's entries).
--
-- Runs outside sqlx's transaction (rebuilding tables needs foreign keys off, which SQLite
-- ignores inside a transaction); the rebuild itself is one transaction. Safe to run again
-- should the bookkeeping row be lost: both tables are copied by column name and keep their
-- columns.
PRAGMA foreign_keys = OFF;
BEGIN;

DROP TABLE IF EXISTS entries_new;
CREATE TABLE entries_new (
    root_id    INTEGER NOT NULL REFERENCES roots (id),
    path       TEXT    NOT NULL,
    kind       INTEGER NOT NULL CHECK (kind IN (0, 1, 2)),
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    mode       INTEGER NOT NULL,
    inode      INTEGER NOT NULL,
    content_id INTEGER,
    target     TEXT,
    from_seq   INTEGER NOT NULL,
    to_seq     INTEGER,
    owner_no   INTEGER REFERENCES owners (no),
    PRIMARY KEY (root_id, path, from_seq)
) WITHOUT ROWID;
INSERT INTO entries_new (root_id, path, kind, size, mtime_ns, mode, inode, content_id, target,
                         from_seq, to_seq, owner_no)
    SELECT root_id, path, kind, size, mtime_ns, mode, inode, content_id, target, from_seq,
           to_seq, owner_no
    FROM entries ORDER BY root_id, path, from_seq;

DROP TABLE IF EXISTS content_chunks_new;
CREATE TABLE content_chunks_new (
    content_id INTEGER NOT NULL REFERENCES contents (id),
    seq        INTEGER NOT NULL,
    chunk_no   INTEGER NOT NULL,
    PRIMARY KEY (content_id, seq)
) WITHOUT ROWID;
INSERT INTO content_chunks_new (content_id, seq, chunk_no)
    SELECT content_id, seq, chunk_no FROM content_chunks ORDER BY content_id, seq;

DROP TABLE entries;
DROP TABLE content_chunks;
ALTER TABLE entries_new RENAME TO entries;
ALTER TABLE content_chunks_new RENAME TO content_chunks;

COMMIT;
PRAGMA foreign_keys = ON;

-- no-transaction
-- A leaner catalog (issue 18 goal 4): the two columns that repeated a 32-character hex text in
-- every row of the two largest tables, and in their indexes, become small integers.
--
-- `packs.no`: the pack's number, an INTEGER PRIMARY KEY (a rowid alias: unlike an implicit
-- rowid, it keeps its value through VACUUM). The pack's id (its object's name) stays in
-- `packs.id`, unique. `chunks.pack_no` names a chunk's pack by that number, and
-- `chunks_by_pack` indexes it. A pack number is never held outside the database: once a pack
-- is forgotten (its chunk rows first, the foreign key sees to that), its number may be reused.
--
-- `contents.key_no`: the key whose chunk ids make up a content's chunk list, by number: 0 for
-- the installation key ('' in `key_id` before), otherwise the `owner_keys.id` of the owner key
-- (`key_id` held its 32-hex key id). A `key_id` naming no recorded owner key (which no code
-- path writes: a key is recorded before anything is sealed with it) fails this migration on
-- `contents_new.key_no` rather than being filed under another key.
--
-- Runs outside sqlx's transaction (rebuilding tables needs foreign keys off, which SQLite
-- ignores inside a transaction); the rebuild itself is one transaction. It is safe to run
-- again should the bookkeeping row be lost: each table is read with `SELECT *` into a CTE of
-- fixed column names (the old and the new layout have the same number of columns, the
-- converted one at the same place), and a value that is already a number is kept.
PRAGMA foreign_keys = OFF;
BEGIN;

DROP TABLE IF EXISTS packs_new;
CREATE TABLE packs_new (
    no         INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    state      TEXT    NOT NULL CHECK (state IN ('uploading', 'stored', 'missing')),
    size       INTEGER NOT NULL,
    encrypted  INTEGER NOT NULL,
    location   TEXT    NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    run_id     TEXT
);
-- The old table's implicit rowid numbers the packs (after this migration `rowid` is `no`).
INSERT INTO packs_new (no, id, state, size, encrypted, location, created_at, run_id)
    SELECT rowid, id, state, size, encrypted, location, created_at, run_id FROM packs;

DROP TABLE IF EXISTS chunks_new;
CREATE TABLE chunks_new (
    id         BLOB    PRIMARY KEY,
    pack_no    INTEGER NOT NULL REFERENCES packs (no),
    offset     INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    raw_length INTEGER NOT NULL,
    kind       INTEGER NOT NULL,
    flags      INTEGER NOT NULL
) WITHOUT ROWID;
WITH was (id, pack, "offset", length, raw_length, kind, flags) AS (SELECT * FROM chunks)
INSERT INTO chunks_new (id, pack_no, "offset", length, raw_length, kind, flags)
    SELECT was.id,
           CASE WHEN typeof(was.pack) = 'integer' THEN was.pack
                ELSE (SELECT p.no FROM packs_new p WHERE p.id = was.pack) END,
           was."offset", was.length, was.raw_length, was.kind, was.flags
    FROM was;

DROP TABLE IF EXISTS contents_new;
CREATE TABLE contents_new (
    id        INTEGER PRIMARY KEY,
    sha256    BLOB    NOT NULL,
    size      INTEGER NOT NULL,
    encrypted INTEGER NOT NULL,
    key_no    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (sha256, size, encrypted, key_no)
);
WITH was (id, sha256, size, encrypted, key) AS (SELECT * FROM contents)
INSERT INTO contents_new (id, sha256, size, encrypted, key_no)
    SELECT was.id, was.sha256, was.size, was.encrypted,
           CASE WHEN typeof(was.key) = 'integer' THEN was.key
                WHEN was.key = '' THEN 0
                ELSE (SELECT k.id FROM owner_keys k WHERE k.key_id = was.key) END
    FROM was;

DROP TABLE chunks;
DROP TABLE packs;
DROP TABLE contents;
ALTER TABLE packs_new RENAME TO packs;
ALTER TABLE chunks_new RENAME TO chunks;
ALTER TABLE contents_new RENAME TO contents;
CREATE INDEX packs_unfinished ON packs (run_id) WHERE state = 'uploading';
CREATE INDEX chunks_by_pack ON chunks (pack_no);
COMMIT;
PRAGMA foreign_keys = ON;

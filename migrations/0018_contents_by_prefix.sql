-- no-transaction
-- A leaner catalog (issue 18 goal 4): contents are found by the first 8 bytes of their
-- SHA-256 instead of a UNIQUE index on (sha256, size, encrypted, key_no), which held all 32
-- bytes and three integers again for every content (about 51 bytes per file; this index is
-- about 18).
--
-- The index serves one query: a backup looking up the contents it read among those recorded
-- (`existing_contents` in shared/src/catalog/snapshots.rs), which names the prefix with the
-- same expression, `substr(sha256, 1, 8)`, and compares the whole SHA-256, the size, the
-- encryption and the key on the rows it finds. Two contents sharing a prefix (chance, or
-- files made to collide in 64 bits) cost one more row read, nothing else. Nothing relied on
-- the UNIQUE constraint: SQLite catalogs have one writer at a time, and a content recorded
-- twice by two PostgreSQL writers at once is two rows of the same chunk list, each whole.
--
-- The constraint was declared in CREATE TABLE, so dropping it rebuilds the table (ids kept:
-- entries and content_chunks name contents by id). Runs outside sqlx's transaction (the
-- rebuild needs foreign keys off, which SQLite ignores inside a transaction); the rebuild is
-- one transaction. Safe to run again should the bookkeeping row be lost: the table is read
-- with its columns named, and the rebuild of a rebuilt table gives the same table.
PRAGMA foreign_keys = OFF;
BEGIN;

DROP TABLE IF EXISTS contents_new;
CREATE TABLE contents_new (
    id        INTEGER PRIMARY KEY,
    sha256    BLOB    NOT NULL,
    size      INTEGER NOT NULL,
    encrypted INTEGER NOT NULL,
    key_no    INTEGER NOT NULL DEFAULT 0
);
INSERT INTO contents_new (id, sha256, size, encrypted, key_no)
    SELECT id, sha256, size, encrypted, key_no FROM contents;
DROP TABLE contents;
ALTER TABLE contents_new RENAME TO contents;
CREATE INDEX contents_by_sha256 ON contents (substr(sha256, 1, 8));

COMMIT;
PRAGMA foreign_keys = ON;

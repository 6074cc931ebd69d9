-- no-transaction
-- A key per owner (issue 13). Runs outside sqlx's transaction because rebuilding `contents`
-- needs foreign keys off, which SQLite ignores inside a transaction; the rebuild itself is one
-- transaction, and every statement is safe to run again should the bookkeeping row be lost.
--
-- `owner_keys`: each owner's random master key, sealed by subkeys of the installation key
-- (`users.name = 'default'`); the same object is stored as `key-owner-<key_id>.enc` in every lane.
-- An owner's first row (lowest id) is the key its new data is sealed with, on every host;
-- later rows (two hosts racing, or found by `recover`) still open what they sealed.
--
-- `contents.key_id`: the key whose chunk ids make up a content's chunk list ('' for the
-- installation key, which sealed everything before owner keys). Two owners with the same file
-- now get two contents, each with its own chunks, where one row was shared before.
PRAGMA foreign_keys = OFF;
BEGIN;
CREATE TABLE IF NOT EXISTS owner_keys (
    id         INTEGER PRIMARY KEY,
    key_id     TEXT    NOT NULL UNIQUE,
    owner      TEXT    NOT NULL,
    sealed     BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS owner_keys_by_owner ON owner_keys (owner, id);
DROP TABLE IF EXISTS contents_new;
CREATE TABLE contents_new (
    id        INTEGER PRIMARY KEY,
    sha256    BLOB    NOT NULL,
    size      INTEGER NOT NULL,
    encrypted INTEGER NOT NULL,
    key_id    TEXT    NOT NULL DEFAULT '',
    UNIQUE (sha256, size, encrypted, key_id)
);
INSERT INTO contents_new (id, sha256, size, encrypted)
    SELECT id, sha256, size, encrypted FROM contents;
DROP TABLE contents;
ALTER TABLE contents_new RENAME TO contents;
COMMIT;
PRAGMA foreign_keys = ON;

-- no-transaction
-- A leaner catalog (issue 18 goal 4): entries are stored in the order every query reads
-- them, by (root_id, path, from_seq), as a WITHOUT ROWID table clustered on that key. The
-- rowid table held each row once and `entries_by_root` (root_id, path, from_seq) held the
-- path a second time with the rowid: about 38 bytes per file on a 100,000-file tree; the
-- clustered table is about 33 bytes per file smaller than the two together. Reading a
-- snapshot's range in path order also becomes one walk of one B-tree instead of an index
-- walk and a table lookup per row.
--
-- Nothing names an entry by its rowid any more: a commit closes a root's current row by its
-- path (a root has at most one current row per path), and a backup marks an item identical to
-- its path's current row with a flag. The key is unique: a snapshot adds at most one row per
-- path of its root.
--
-- Runs outside sqlx's transaction (rebuilding a table needs foreign keys off, which SQLite
-- ignores inside a transaction); the rebuild itself is one transaction. Safe to run again
-- should the bookkeeping row be lost: the rows are copied by column name, and the rebuild of a
-- rebuilt table gives the same table.
PRAGMA foreign_keys = OFF;
BEGIN;

DROP TABLE IF EXISTS entries_new;
CREATE TABLE entries_new (
    root_id    INTEGER NOT NULL REFERENCES roots (id),
    path       TEXT    NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('file', 'dir', 'symlink')),
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    mode       INTEGER NOT NULL,
    inode      INTEGER NOT NULL,
    content_id INTEGER REFERENCES contents (id),
    target     TEXT,
    from_seq   INTEGER NOT NULL,
    to_seq     INTEGER,
    uid        INTEGER,
    gid        INTEGER,
    user_name  TEXT,
    group_name TEXT,
    PRIMARY KEY (root_id, path, from_seq)
) WITHOUT ROWID;
INSERT INTO entries_new (root_id, path, kind, size, mtime_ns, mode, inode, content_id, target,
                         from_seq, to_seq, uid, gid, user_name, group_name)
    SELECT root_id, path, kind, size, mtime_ns, mode, inode, content_id, target,
           from_seq, to_seq, uid, gid, user_name, group_name
    FROM entries ORDER BY root_id, path, from_seq;
DROP TABLE entries;
ALTER TABLE entries_new RENAME TO entries;

-- Handles for paths where a path does not fit (the chat's buttons: Telegram's callback data
-- holds 64 bytes), which named entries by their rowid before. A handle names a path of a
-- root in every snapshot; the chat makes them for the entries it shows.
CREATE TABLE IF NOT EXISTS entry_handles (
    id      INTEGER PRIMARY KEY,
    root_id INTEGER NOT NULL REFERENCES roots (id),
    path    TEXT    NOT NULL,
    UNIQUE (root_id, path)
);

COMMIT;
PRAGMA foreign_keys = ON;

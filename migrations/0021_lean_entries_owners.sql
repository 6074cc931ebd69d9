-- no-transaction
-- A leaner catalog (issue 18 goal 4): every entry row repeated its kind as a word ('file',
-- 'dir', 'symlink') and its owner as four columns (uid, gid and both names, 'root', 'root'
-- on most rows). The kind becomes a small integer (0 file, 1 dir, 2 symlink; the catalog's
-- own numbering, the snapshot format in storage keeps its words), and the owner a number,
-- `owner_no`, naming a row of `owners`: on a 100,000-file catalog the entries' payload goes
-- from about 68 to 53 bytes per file.
--
-- `owners` holds each owner once. Its columns may be NULL (a uid without a name in the
-- passwd file, a name unknown), and UNIQUE treats NULLs as distinct, so the row's `key` is
-- what makes it unique: the four values as a JSON array (`[0,0,"root","root"]`), where
-- NULL and '' differ and no two owners read the same. An entry with no owner recorded at all
-- (rows from before owners were, 0004) has a NULL `owner_no`, never an all-NULL owner row.
-- Owners are never deleted: a catalog holds a handful (one per user and group seen), and a
-- forget or prune that drops the last entry of one leaves its row for the next backup.
--
-- Runs outside sqlx's transaction (rebuilding a table needs foreign keys off, which SQLite
-- ignores inside a transaction); the rebuild itself is one transaction, its rows copied in
-- key order. It is safe to run again should the bookkeeping row be lost: the old table is
-- read through `NATURAL LEFT JOIN was`, a row of NULLs named like the columns one layout has
-- and the other lacks (the old owner columns, the new `owner_no`), so each name is the
-- table's column when it has one and NULL otherwise (a NULL never matches the join); a kind
-- that is a number already is kept.
PRAGMA foreign_keys = OFF;
BEGIN;

CREATE TABLE IF NOT EXISTS owners (
    no         INTEGER PRIMARY KEY,
    uid        INTEGER,
    gid        INTEGER,
    user_name  TEXT,
    group_name TEXT,
    key        TEXT NOT NULL UNIQUE
);
WITH was (uid, gid, user_name, group_name, owner_no) AS (VALUES (NULL, NULL, NULL, NULL, NULL))
INSERT OR IGNORE INTO owners (uid, gid, user_name, group_name, key)
    SELECT DISTINCT uid, gid, user_name, group_name,
           json_array(uid, gid, user_name, group_name)
    FROM entries NATURAL LEFT JOIN was
    WHERE uid IS NOT NULL OR gid IS NOT NULL OR user_name IS NOT NULL OR group_name IS NOT NULL
    ORDER BY uid, gid, user_name, group_name;

DROP TABLE IF EXISTS entries_new;
CREATE TABLE entries_new (
    root_id    INTEGER NOT NULL REFERENCES roots (id),
    path       TEXT    NOT NULL,
    kind       INTEGER NOT NULL CHECK (kind IN (0, 1, 2)),
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    mode       INTEGER NOT NULL,
    inode      INTEGER NOT NULL,
    content_id INTEGER REFERENCES contents (id),
    target     TEXT,
    from_seq   INTEGER NOT NULL,
    to_seq     INTEGER,
    owner_no   INTEGER REFERENCES owners (no),
    PRIMARY KEY (root_id, path, from_seq)
) WITHOUT ROWID;
WITH was (uid, gid, user_name, group_name, owner_no) AS (VALUES (NULL, NULL, NULL, NULL, NULL))
INSERT INTO entries_new (root_id, path, kind, size, mtime_ns, mode, inode, content_id, target,
                         from_seq, to_seq, owner_no)
    SELECT e.root_id, e.path,
           CASE e.kind WHEN 'file' THEN 0 WHEN 'dir' THEN 1 WHEN 'symlink' THEN 2 ELSE e.kind END,
           e.size, e.mtime_ns, e.mode, e.inode, e.content_id, e.target, e.from_seq, e.to_seq,
           COALESCE(e.owner_no, (SELECT o.no FROM owners o WHERE o.key = e.owner_key))
    -- (The key is made out here: inside the lookup, `uid` would name the owners' column.)
    FROM (SELECT *, json_array(uid, gid, user_name, group_name) AS owner_key
          FROM entries NATURAL LEFT JOIN was) e
    ORDER BY e.root_id, e.path, e.from_seq;
DROP TABLE entries;
ALTER TABLE entries_new RENAME TO entries;

COMMIT;
PRAGMA foreign_keys = ON;

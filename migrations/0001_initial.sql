-- T-Storinator catalog and job table. Migrations are append-only: never edit a released one.
--
-- The catalog is a cache of what lives (encrypted) in storage; `recover` rebuilds it from
-- pack trailers and snapshot objects. Times are Unix milliseconds.

-- Key material. The master secret is random; it is stored wrapped (sealed) under a key
-- derived from the passphrase with Argon2id, so a passphrase change re-wraps only.
CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    key_id      TEXT    NOT NULL,
    kdf_salt    BLOB    NOT NULL,
    kdf_m_kib   INTEGER NOT NULL,
    kdf_t_cost  INTEGER NOT NULL,
    kdf_p_cost  INTEGER NOT NULL,
    wrapped_key BLOB    NOT NULL,
    created_at  INTEGER NOT NULL
);

-- One pack is one stored object (one Telegram document) named `<id>.enc`.
CREATE TABLE packs (
    id         TEXT    PRIMARY KEY,
    state      TEXT    NOT NULL CHECK (state IN ('uploading', 'stored', 'missing')),
    size       INTEGER NOT NULL,
    encrypted  INTEGER NOT NULL,
    location   TEXT    NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL
);

-- A blob in a pack: a data chunk, a piece of a snapshot listing, or a snapshot object.
-- `id` is HMAC-SHA256(chunk-id key, plaintext) for encrypted blobs, SHA-256 otherwise; the IV
-- travels inside the sealed blob (header | IV | ciphertext | MAC).
CREATE TABLE chunks (
    id         BLOB    PRIMARY KEY,
    pack_id    TEXT    NOT NULL REFERENCES packs (id),
    offset     INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    raw_length INTEGER NOT NULL,
    kind       INTEGER NOT NULL,
    flags      INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX chunks_by_pack ON chunks (pack_id);

-- A file's content, shared by every entry (in any snapshot) with the same bytes.
CREATE TABLE contents (
    id        INTEGER PRIMARY KEY,
    sha256    BLOB    NOT NULL,
    size      INTEGER NOT NULL,
    encrypted INTEGER NOT NULL,
    UNIQUE (sha256, size, encrypted)
);

-- The ordered chunk list of a content.
CREATE TABLE content_chunks (
    content_id INTEGER NOT NULL REFERENCES contents (id),
    seq        INTEGER NOT NULL,
    chunk_id   BLOB    NOT NULL REFERENCES chunks (id),
    PRIMARY KEY (content_id, seq)
) WITHOUT ROWID;

-- A backed-up folder of one owner: one timeline of snapshots.
CREATE TABLE roots (
    id    INTEGER PRIMARY KEY,
    owner TEXT    NOT NULL,
    path  TEXT    NOT NULL,
    UNIQUE (owner, path)
);

CREATE TABLE snapshots (
    id           INTEGER PRIMARY KEY,
    root_id      INTEGER NOT NULL REFERENCES roots (id),
    seq          INTEGER NOT NULL,
    short_id     TEXT    NOT NULL UNIQUE,
    blob_id      BLOB    NOT NULL REFERENCES chunks (id),
    hostname     TEXT    NOT NULL,
    encrypted    INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    files        INTEGER NOT NULL,
    dirs         INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    bytes_read   INTEGER NOT NULL,
    new_chunks   INTEGER NOT NULL,
    bytes_stored INTEGER NOT NULL,
    warnings     INTEGER NOT NULL,
    UNIQUE (root_id, seq)
);

-- Snapshot contents as a temporal table: an entry belongs to snapshots from_seq ..= to_seq-1
-- of its root (to_seq NULL: still current). An unchanged re-backup writes no entry rows at
-- all; a changed file closes its old row and adds one. Entries of snapshot S:
--   root_id = ? AND from_seq <= S AND (to_seq IS NULL OR to_seq > S)
CREATE TABLE entries (
    id         INTEGER PRIMARY KEY,
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
    to_seq     INTEGER
);
CREATE INDEX entries_current ON entries (root_id, path) WHERE to_seq IS NULL;
CREATE INDEX entries_by_root ON entries (root_id, path, from_seq);

-- The only channel between bot and worker.
CREATE TABLE jobs (
    id                  INTEGER PRIMARY KEY,
    kind                TEXT    NOT NULL,
    args                TEXT    NOT NULL,
    user_id             INTEGER NOT NULL,
    chat_id             INTEGER NOT NULL,
    state               TEXT    NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    phase               TEXT    NOT NULL DEFAULT 'starting',
    files_done          INTEGER NOT NULL DEFAULT 0,
    files_total         INTEGER NOT NULL DEFAULT 0,
    bytes_done          INTEGER NOT NULL DEFAULT 0,
    bytes_total         INTEGER NOT NULL DEFAULT 0,
    bytes_stored        INTEGER NOT NULL DEFAULT 0,
    estimate            TEXT,
    result              TEXT,
    error               TEXT,
    attempt             INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL DEFAULT 3,
    lease_owner         TEXT,
    lease_until         INTEGER,
    not_before          INTEGER NOT NULL DEFAULT 0,
    cancel_requested    INTEGER NOT NULL DEFAULT 0,
    progress_message_id INTEGER,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    updated_at          INTEGER NOT NULL,
    finished_at         INTEGER
);
CREATE INDEX jobs_by_state ON jobs (state, not_before);
CREATE INDEX jobs_by_user ON jobs (user_id, id);

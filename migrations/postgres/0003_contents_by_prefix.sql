-- Contents found by the first 8 bytes of their SHA-256: the PostgreSQL twin of
-- `migrations/0018_contents_by_prefix.sql` (read it for the why). The UNIQUE constraint on
-- (sha256, size, encrypted, key_no) and its index go; an index on `substr(sha256, 1, 8)`, the
-- expression the lookup names, comes. PostgreSQL drops a constraint without rebuilding the
-- table. Runs in sqlx's transaction; safe to run again should the bookkeeping row be lost.

ALTER TABLE contents DROP CONSTRAINT IF EXISTS contents_sha256_size_encrypted_key_no_key;
CREATE INDEX IF NOT EXISTS contents_by_sha256 ON contents (substr(sha256, 1, 8));

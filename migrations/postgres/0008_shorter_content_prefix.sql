-- A leaner catalog (issue 18 goal 4; SQLite: 0024): contents are found by the first 4 bytes
-- of their SHA-256 instead of 8, as chunks are by their id's. Runs in sqlx's transaction; safe
-- to run again should the bookkeeping row be lost.
DROP INDEX IF EXISTS contents_by_sha256;
CREATE INDEX contents_by_sha256 ON contents (substr(sha256, 1, 4));

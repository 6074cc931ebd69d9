-- A leaner catalog (issue 18 goal 4): contents are found by the first 4 bytes of their
-- SHA-256 instead of 8 (0018), as chunks are by their id's (0023): the index is about 4 bytes
-- per file smaller. A prefix shared by two contents costs a lookup one more row read, nothing
-- else (by chance n / 2^32 more rows per lookup among n contents; a prefix made to collide
-- takes about 2^32 tries per file). `existing_contents_sql` in shared/src/catalog/snapshots.rs
-- names the same expression. An index, not a table: this runs in sqlx's transaction.
DROP INDEX IF EXISTS contents_by_sha256;
CREATE INDEX contents_by_sha256 ON contents (substr(sha256, 1, 4));

-- A leaner catalog (issue 18 goal 4; SQLite: 0027, which says why): a content of one chunk
-- takes that chunk's number as its id, and `contents.chunk_no` (0010) goes. Every other
-- content gets an id below 0 and its list in `content_chunks` (a content on a format-1
-- unencrypted blob, or a second content naming the same chunk, keeps a list of one there);
-- `contents_by_sha256` holds only those. One transaction.
CREATE TEMPORARY TABLE content_renumbering (
    old          BIGINT PRIMARY KEY,
    new          BIGINT NOT NULL,
    listed_chunk BIGINT
) ON COMMIT DROP;
-- First the contents that take their chunk's number (the first of each chunk's, on an
-- authenticated blob), then any below 0, which keep theirs, then the others, counting down
-- below the lowest id.
INSERT INTO content_renumbering (old, new)
    SELECT MIN(c.id), c.chunk_no FROM contents c JOIN chunks ch ON ch.no = c.chunk_no
    WHERE ch.flags & 3 <> 0 GROUP BY c.chunk_no;
INSERT INTO content_renumbering (old, new, listed_chunk)
    SELECT c.id, c.id, c.chunk_no FROM contents c
    LEFT JOIN content_renumbering m ON m.old = c.id
    WHERE m.old IS NULL AND c.id < 0;
INSERT INTO content_renumbering (old, new, listed_chunk)
    SELECT c.id,
           (SELECT LEAST(COALESCE(MIN(id), 0), 0) FROM contents)
               - ROW_NUMBER() OVER (ORDER BY c.id),
           c.chunk_no
    FROM contents c LEFT JOIN content_renumbering m ON m.old = c.id
    WHERE m.old IS NULL;

-- Keys are checked row by row: every id moves out of the way first (below any new id), then
-- to its new value.
ALTER TABLE content_chunks DROP CONSTRAINT IF EXISTS content_chunks_content_id_fkey;
UPDATE contents SET id = -id - 4611686018427387904;
UPDATE contents c SET id = m.new FROM content_renumbering m
    WHERE c.id = -m.old - 4611686018427387904;
UPDATE content_chunks SET content_id = -content_id - 4611686018427387904;
UPDATE content_chunks cc SET content_id = m.new FROM content_renumbering m
    WHERE cc.content_id = -m.old - 4611686018427387904;
INSERT INTO content_chunks (content_id, seq, chunk_no)
    SELECT new, 0, listed_chunk FROM content_renumbering WHERE listed_chunk IS NOT NULL;
UPDATE entries e SET content_id = m.new FROM content_renumbering m
    WHERE e.content_id = m.old AND m.new <> m.old;
ALTER TABLE content_chunks
    ADD CONSTRAINT content_chunks_content_id_fkey FOREIGN KEY (content_id) REFERENCES contents (id);

ALTER TABLE contents DROP COLUMN chunk_no;
DROP INDEX IF EXISTS contents_by_sha256;
CREATE INDEX contents_by_sha256 ON contents (substr(sha256, 1, 4)) WHERE id < 0;

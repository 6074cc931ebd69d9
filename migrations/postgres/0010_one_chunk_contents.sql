-- A leaner catalog (issue 18 goal 4; SQLite: 0026, which says why): a content of one chunk
-- names that chunk in its own row, `contents.chunk_no`, instead of in a row of
-- `content_chunks`; longer lists stay there. No foreign key, as `content_chunks.chunk_no` has
-- none since 0009. One transaction.
ALTER TABLE contents ADD COLUMN chunk_no BIGINT;
UPDATE contents k SET chunk_no = s.chunk_no
    FROM (SELECT content_id, MIN(chunk_no) AS chunk_no FROM content_chunks
          GROUP BY content_id HAVING COUNT(*) = 1 AND MIN(seq) = 0) s
    WHERE s.content_id = k.id;
DELETE FROM content_chunks cc USING contents k
    WHERE k.id = cc.content_id AND k.chunk_no IS NOT NULL;

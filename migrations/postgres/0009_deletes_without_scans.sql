-- Forget and prune take time in proportion to what they delete (SQLite: 0025, which says why):
-- the foreign keys of `entries.content_id` and `content_chunks.chunk_no` made every deleted
-- content and chunk a scan of the entries or of the chunk lists. The statements that delete
-- check what they checked. One transaction; safe to run again.
ALTER TABLE entries DROP CONSTRAINT IF EXISTS entries_content_id_fkey;
ALTER TABLE content_chunks DROP CONSTRAINT IF EXISTS content_chunks_chunk_no_fkey;

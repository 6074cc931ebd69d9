-- A leaner catalog (issue 18 goal 4), step one of two (the rebuild is 0022): chunks get a
-- number, `no`, which `content_chunks` will name instead of the 32-byte chunk id.
--
-- This step only adds the column, inside sqlx's transaction, so it is recorded together with
-- its bookkeeping row and never runs twice. It gives the rebuild one layout to read whether it
-- runs for the first time or again (a rebuild runs outside sqlx's transaction, so a kill
-- between its commit and its bookkeeping row runs it again): `chunks` has the same eight
-- columns, in the same order, before and after it.
ALTER TABLE chunks ADD COLUMN no INTEGER;

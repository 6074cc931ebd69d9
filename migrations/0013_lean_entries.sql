-- A leaner catalog (issue 18 goal 4): `entries_current` indexed (root_id, path) for the rows
-- still current, which `entries_by_root` (root_id, path, from_seq) already serves: every query
-- on current rows names the root, and a root's rows are read in path order from that index and
-- filtered on `to_seq IS NULL`. One index fewer is about 36 bytes less per file.
DROP INDEX IF EXISTS entries_current;

-- Owners of snapshot entries (snapshot format 2, issue 15 item 6): the numeric uid and gid and,
-- where the backup host could name them, the user and group names. NULL for entries backed up
-- before this migration (a restore then leaves ownership to the restoring user and strips
-- setuid/setgid bits).
ALTER TABLE entries ADD COLUMN uid INTEGER;
ALTER TABLE entries ADD COLUMN gid INTEGER;
ALTER TABLE entries ADD COLUMN user_name TEXT;
ALTER TABLE entries ADD COLUMN group_name TEXT;

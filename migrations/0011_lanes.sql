-- Storage lanes (issue 14): several Telegram accounts or chats, each pack kept in
-- STORINATOR_COPIES of them. Each pack's lanes are recorded in `packs.location`
-- (`lanes:<lane>=<location>,...`); a location without that prefix is a pack stored before
-- lanes existed, in the first configured lane, so existing catalogs need no rewrite.

-- The canary: each lane probed daily. `state`: 'ok'; 'silent' (it did not answer: `detail`
-- says how); 'lost' (it answers but no longer holds `missing` of the `copies` the catalog
-- places there). `since`: when the current state began. `told_state` / `told_missing`: what
-- chat users were last told about the lane (NULL: nothing), so each change is told once.
CREATE TABLE lane_health (
    lane         TEXT    PRIMARY KEY,
    state        TEXT    NOT NULL CHECK (state IN ('ok', 'silent', 'lost')),
    detail       TEXT    NOT NULL DEFAULT '',
    since        INTEGER NOT NULL,
    checked_at   INTEGER NOT NULL,
    copies       INTEGER NOT NULL DEFAULT 0,
    missing      INTEGER NOT NULL DEFAULT 0,
    told_state   TEXT,
    told_missing INTEGER NOT NULL DEFAULT 0
);

-- Retention (issue 10): forget and prune.

-- Packs prune decided to delete: every chunk in them was unreferenced when the row was written
-- (in the same write transaction that checked it), and from then on no backup may deduplicate
-- against them or commit a snapshot that uses them (`USABLE_PACK` leaves them out). The row
-- stays until the object is gone from storage and the catalog forgot the pack, so a prune that
-- dies midway is finished by the next one.
CREATE TABLE condemned_packs (
    pack_id      TEXT    PRIMARY KEY,
    condemned_at INTEGER NOT NULL
);

-- The listing chunks of each snapshot (its object names them), so that prune knows what a
-- snapshot uses without reading every snapshot object. `listing_known` is 0 for snapshots
-- committed before this migration until prune reads their object and fills the rows in.
CREATE TABLE snapshot_listing (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    chunk_id    BLOB    NOT NULL,
    PRIMARY KEY (snapshot_id, seq)
) WITHOUT ROWID;
CREATE INDEX snapshot_listing_by_chunk ON snapshot_listing (chunk_id);
ALTER TABLE snapshots ADD COLUMN listing_known INTEGER NOT NULL DEFAULT 0;

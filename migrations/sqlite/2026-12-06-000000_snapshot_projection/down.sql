ALTER TABLE crdt_snapshots DROP COLUMN projection;

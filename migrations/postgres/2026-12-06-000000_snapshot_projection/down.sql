ALTER TABLE crdt_snapshots DROP COLUMN IF EXISTS projection;

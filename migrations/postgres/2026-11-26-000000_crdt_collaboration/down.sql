DROP TABLE IF EXISTS crdt_snapshots;
DROP INDEX IF EXISTS collaboration_events_run_order;
DROP INDEX IF EXISTS collaboration_events_run_change;
ALTER TABLE collaboration_events
    DROP COLUMN IF EXISTS change_hash,
    DROP COLUMN IF EXISTS run_seq,
    DROP COLUMN IF EXISTS lamport_timestamp,
    DROP COLUMN IF EXISTS source_region,
    DROP COLUMN IF EXISTS crdt_changes;

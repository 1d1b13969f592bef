DROP TABLE IF EXISTS crdt_snapshots;
DROP TABLE IF EXISTS collaboration_events;

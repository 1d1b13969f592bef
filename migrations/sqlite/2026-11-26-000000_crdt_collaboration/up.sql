-- The embedded (SQLite) form of the same schema: UUIDs as 16-byte BLOBs, timestamps as TEXT.
-- A row with crdt_changes NULL is a legacy operational-transform event (its format: see the
-- PostgreSQL migration and README, "Migrating from the OT log").
CREATE TABLE IF NOT EXISTS collaboration_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id BLOB NOT NULL,
    event_type VARCHAR(50) NOT NULL,
    payload TEXT,
    user_id VARCHAR(255),
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    crdt_changes BLOB,
    source_region VARCHAR(50),
    lamport_timestamp BIGINT,
    run_seq BIGINT,
    change_hash BLOB
);

CREATE UNIQUE INDEX IF NOT EXISTS collaboration_events_run_change
    ON collaboration_events (run_id, change_hash);
-- Loading a run reads its events in order, after a snapshot's position. Unique, so two writers
-- of one run can never interleave their logs silently: the second insert fails instead.
-- (Legacy rows have no run_seq; NULLs never collide.)
CREATE UNIQUE INDEX IF NOT EXISTS collaboration_events_run_order
    ON collaboration_events (run_id, run_seq);

CREATE TABLE IF NOT EXISTS crdt_snapshots (
    id BLOB PRIMARY KEY NOT NULL,
    run_id BLOB NOT NULL,
    snapshot_data BLOB NOT NULL,
    lamport_timestamp BIGINT NOT NULL,
    region VARCHAR(50) NOT NULL,
    created_at TIMESTAMP NOT NULL,
    event_count INTEGER
);

CREATE INDEX IF NOT EXISTS crdt_snapshots_run_newest
    ON crdt_snapshots (run_id, event_count DESC, created_at DESC);

-- Deleted runs (see the PostgreSQL migration). UUIDs as 16-byte BLOBs.
CREATE TABLE IF NOT EXISTS crdt_tombstones (
    run_id BLOB PRIMARY KEY NOT NULL,
    deleted BOOLEAN NOT NULL,
    decided_at BIGINT NOT NULL,
    region VARCHAR(50) NOT NULL,
    decided_by VARCHAR(255),
    purged BOOLEAN NOT NULL DEFAULT FALSE,
    recorded_at BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS crdt_tombstones_due ON crdt_tombstones (recorded_at)
    WHERE deleted AND NOT purged;

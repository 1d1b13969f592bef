-- Deleted runs. A row is the last decision about a run: deleted, or restored. Regions exchange
-- these; the later decision wins (decided_at, unix milliseconds, then region), so every region
-- reaches the same one. The row outlives the purge of the run's events and snapshots: it is
-- what refuses a late change from a region that was cut off when the run was deleted.
-- recorded_at (unix ms) is when this region recorded the decision: the grace period before the
-- purge counts from it, not from decided_at, which another region's clock wrote.
CREATE TABLE IF NOT EXISTS crdt_tombstones (
    run_id UUID PRIMARY KEY,
    deleted BOOLEAN NOT NULL,
    decided_at BIGINT NOT NULL,
    region VARCHAR(50) NOT NULL,
    decided_by VARCHAR(255),
    purged BOOLEAN NOT NULL DEFAULT FALSE,
    recorded_at BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS crdt_tombstones_due ON crdt_tombstones (recorded_at)
    WHERE deleted AND NOT purged;

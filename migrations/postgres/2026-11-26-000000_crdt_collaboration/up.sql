-- The event log. Deployments migrating from the operational-transform system already have this
-- table (id, run_id, event_type, payload, user_id, created_at); the CRDT columns are added to it,
-- as the specification's ALTER TABLE says. A row with crdt_changes NULL is a legacy OT event:
--   event_type  GRAFT | PRUNE | UNPRUNE | SET_FLAG | DELETE_FLAG
--   payload     JSON: {"agent", "afterStep"} (GRAFT), {"stepId"} (PRUNE, UNPRUNE),
--               {"key", "value"} (SET_FLAG), {"key"} (DELETE_FLAG), each with "user" and "region"
--   user_id, created_at as the old system wrote them.
-- Such rows are replayed into the run's CRDT document, in stored order, deterministically (see
-- README, "Migrating from the OT log"); they are never rewritten.
CREATE TABLE IF NOT EXISTS collaboration_events (
    id BIGSERIAL PRIMARY KEY,
    run_id UUID NOT NULL,
    event_type VARCHAR(50) NOT NULL,
    payload TEXT,
    user_id VARCHAR(255),
    created_at TIMESTAMP NOT NULL DEFAULT now()
);

ALTER TABLE collaboration_events
    ADD COLUMN IF NOT EXISTS crdt_changes BYTEA,           -- Binary Automerge change log
    ADD COLUMN IF NOT EXISTS source_region VARCHAR(50),    -- Originating region
    ADD COLUMN IF NOT EXISTS lamport_timestamp BIGINT,     -- Logical clock
    ADD COLUMN IF NOT EXISTS run_seq BIGINT,               -- Position in the run's CRDT log (1, 2, ...)
    ADD COLUMN IF NOT EXISTS change_hash BYTEA;            -- Automerge change hash, for dedup

-- A change is stored once per run, whichever path brought it.
CREATE UNIQUE INDEX IF NOT EXISTS collaboration_events_run_change
    ON collaboration_events (run_id, change_hash);
-- Loading a run reads its events in order, after a snapshot's position. Unique, so two writers
-- of one run can never interleave their logs silently: the second insert fails instead.
-- (Legacy rows have no run_seq; NULLs never collide.)
CREATE UNIQUE INDEX IF NOT EXISTS collaboration_events_run_order
    ON collaboration_events (run_id, run_seq);

CREATE TABLE IF NOT EXISTS crdt_snapshots (
    id UUID PRIMARY KEY,
    run_id UUID NOT NULL,
    snapshot_data BYTEA NOT NULL,        -- Full CRDT document state
    lamport_timestamp BIGINT NOT NULL,
    region VARCHAR(50) NOT NULL,
    created_at TIMESTAMP NOT NULL,
    event_count INTEGER                  -- run_seq of the last event the snapshot covers
);

CREATE INDEX IF NOT EXISTS crdt_snapshots_run_newest
    ON crdt_snapshots (run_id, event_count DESC, created_at DESC);

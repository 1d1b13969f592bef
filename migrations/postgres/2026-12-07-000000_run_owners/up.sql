-- One owner per run among the pods of a region that share this database (crdt.cluster).
-- A pod is a member while its lease (in the database's own time, so pods' clocks do not
-- matter) has not lapsed; each start is a new member, so a restarted pod never inherits what
-- its previous life held.
CREATE TABLE IF NOT EXISTS crdt_pods (
    member VARCHAR(200) PRIMARY KEY,
    pod VARCHAR(200) NOT NULL,
    region VARCHAR(50) NOT NULL,
    address VARCHAR(500) NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_expires TIMESTAMPTZ NOT NULL
);

-- A run's owner and its fencing epoch. Every claim raises the epoch; every write of the owner
-- carries the epoch it claimed, and the database takes the write only while this row still
-- names that member and epoch. A released run keeps its row (member NULL), so epochs never
-- repeat.
CREATE TABLE IF NOT EXISTS crdt_run_owners (
    run_id UUID PRIMARY KEY,
    member VARCHAR(200),
    epoch BIGINT NOT NULL,
    since TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Work one pod of the region does for all (delivering webhooks): held like a run, by a live
-- member, and taken over when its lease lapses.
CREATE TABLE IF NOT EXISTS crdt_roles (
    role VARCHAR(100) PRIMARY KEY,
    member VARCHAR(200),
    since TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The ownership epoch an event was appended under (a region's pods sharing this database):
-- along a run's log the epochs never go down, which is what fencing promises.
ALTER TABLE collaboration_events ADD COLUMN IF NOT EXISTS owner_epoch BIGINT;

CREATE INDEX IF NOT EXISTS crdt_run_owners_member ON crdt_run_owners (member)
    WHERE member IS NOT NULL;

-- The run's read model at the snapshot's heads (run_doc::Projection, deflated JSON), written
-- with the snapshot: a cold run answers its first read from it while the document loads.
-- NULL for snapshots written before it, which load as before.
ALTER TABLE crdt_snapshots ADD COLUMN IF NOT EXISTS projection BYTEA;

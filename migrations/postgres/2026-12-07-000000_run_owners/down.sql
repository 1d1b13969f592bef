ALTER TABLE collaboration_events DROP COLUMN IF EXISTS owner_epoch;
DROP TABLE IF EXISTS crdt_roles;
DROP TABLE IF EXISTS crdt_run_owners;
DROP TABLE IF EXISTS crdt_pods;

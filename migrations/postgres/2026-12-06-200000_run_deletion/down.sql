DROP TABLE IF EXISTS crdt_tombstones;

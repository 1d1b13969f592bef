-- One row per run with its latest activity, so the runs list (newest first) reads a page of an
-- index instead of grouping the whole event log. Kept up to date by every append, in the same
-- transaction; filled here from the events already stored (legacy runs included).
CREATE TABLE IF NOT EXISTS crdt_runs (
    run_id UUID PRIMARY KEY,
    last_activity TIMESTAMP NOT NULL
);

CREATE INDEX IF NOT EXISTS crdt_runs_newest ON crdt_runs (last_activity DESC, run_id DESC);

INSERT INTO crdt_runs (run_id, last_activity)
SELECT run_id, MAX(created_at) FROM collaboration_events GROUP BY run_id
ON CONFLICT (run_id) DO NOTHING;

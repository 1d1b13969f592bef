-- The change feed (see the PostgreSQL migration): what each change did, webhook subscriptions
-- and their outbox. UUIDs as 16-byte BLOBs.
ALTER TABLE collaboration_events ADD COLUMN event_kind VARCHAR(20);
ALTER TABLE collaboration_events ADD COLUMN event_content TEXT;
CREATE INDEX IF NOT EXISTS collaboration_events_run_cursor
    ON collaboration_events (run_id, id);

CREATE TABLE IF NOT EXISTS crdt_webhooks (
    id VARCHAR(64) PRIMARY KEY NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    runs TEXT,
    kinds TEXT,
    origin VARCHAR(10) NOT NULL,
    created_at TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS crdt_webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription_id VARCHAR(64) NOT NULL,
    event_id BIGINT NOT NULL,
    run_id BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMP NOT NULL,
    state VARCHAR(10) NOT NULL DEFAULT 'pending',
    last_error TEXT,
    created_at TIMESTAMP NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS crdt_webhook_outbox_event
    ON crdt_webhook_outbox (subscription_id, event_id);
CREATE INDEX IF NOT EXISTS crdt_webhook_outbox_due
    ON crdt_webhook_outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS crdt_webhook_outbox_run_order
    ON crdt_webhook_outbox (subscription_id, run_id, event_id);

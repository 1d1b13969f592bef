-- The change feed: what each change did (run_doc::Described), written with the change, so the
-- feed and webhooks read the log without loading runs. NULL on rows written before the feed
-- (described then from event_type and payload, or as "other") and on legacy OT rows.
ALTER TABLE collaboration_events
    ADD COLUMN IF NOT EXISTS event_kind VARCHAR(20),
    ADD COLUMN IF NOT EXISTS event_content TEXT;
-- A run's stream reads its events by cursor (the row id).
CREATE INDEX IF NOT EXISTS collaboration_events_run_cursor
    ON collaboration_events (run_id, id);

-- Webhook subscriptions: from the configuration (origin 'config') and the API ('api').
-- runs / kinds: comma-separated filters (run ids in simple hex form, event kinds); NULL = all.
CREATE TABLE IF NOT EXISTS crdt_webhooks (
    id VARCHAR(64) PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    runs TEXT,
    kinds TEXT,
    origin VARCHAR(10) NOT NULL,
    created_at TIMESTAMP NOT NULL
);

-- The outbox: one row per (subscription, event) to deliver, written in the transaction that
-- appends the event. Deleted once delivered; state 'dead' after the last attempt failed.
CREATE TABLE IF NOT EXISTS crdt_webhook_outbox (
    id BIGSERIAL PRIMARY KEY,
    subscription_id VARCHAR(64) NOT NULL,
    event_id BIGINT NOT NULL,
    run_id UUID NOT NULL,
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

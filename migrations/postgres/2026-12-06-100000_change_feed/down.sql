DROP TABLE IF EXISTS crdt_webhook_outbox;
DROP TABLE IF EXISTS crdt_webhooks;
DROP INDEX IF EXISTS collaboration_events_run_cursor;
ALTER TABLE collaboration_events DROP COLUMN IF EXISTS event_kind, DROP COLUMN IF EXISTS event_content;

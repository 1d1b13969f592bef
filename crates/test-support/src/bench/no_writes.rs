//! A store that acknowledges appends without writing them, for one benchmark row: the most the
//! node's write path could do if the database cost nothing. It exists only in this dev crate;
//! the node has no such mode.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::NaiveDateTime;
use run_store::{
    Attempted, Delivery, FeedRow, NewEvent, RunActivity, Snapshot, Store, StoreError, StoredEvent,
    Tombstone, Webhook,
};
use uuid::Uuid;

/// The store it holds, with its appends dropped: everything else (snapshots, reads, webhooks)
/// reaches it.
pub struct NoDurableWrites(pub Arc<dyn Store>);

#[async_trait]
impl Store for NoDurableWrites {
    async fn append(&self, events: &[NewEvent]) -> Result<usize, StoreError> {
        Ok(events.len())
    }
    async fn latest_snapshot(
        &self,
        run_id: Uuid,
        below: Option<i32>,
    ) -> Result<Option<Snapshot>, StoreError> {
        self.0.latest_snapshot(run_id, below).await
    }
    async fn events_after(
        &self,
        run_id: Uuid,
        after_seq: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.0.events_after(run_id, after_seq).await
    }
    async fn save_snapshot(&self, snapshot: &Snapshot, keep: usize) -> Result<(), StoreError> {
        self.0.save_snapshot(snapshot, keep).await
    }
    async fn list_runs(&self, after: Option<Uuid>, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        self.0.list_runs(after, limit).await
    }
    async fn recent_runs(
        &self,
        after: Option<&RunActivity>,
        limit: i64,
    ) -> Result<Vec<RunActivity>, StoreError> {
        self.0.recent_runs(after, limit).await
    }
    async fn feed(
        &self,
        after: i64,
        run: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<FeedRow>, StoreError> {
        self.0.feed(after, run, limit).await
    }
    async fn last_event_id(&self) -> Result<i64, StoreError> {
        self.0.last_event_id().await
    }
    async fn event_run(&self, id: i64) -> Result<Option<Uuid>, StoreError> {
        self.0.event_run(id).await
    }
    async fn save_webhook(&self, webhook: &Webhook) -> Result<(), StoreError> {
        self.0.save_webhook(webhook).await
    }
    async fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        self.0.delete_webhook(id).await
    }
    async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        self.0.webhooks().await
    }
    async fn due_deliveries(
        &self,
        now: NaiveDateTime,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.0.due_deliveries(now, limit).await
    }
    async fn attempted(&self, delivery: i64, outcome: &Attempted) -> Result<(), StoreError> {
        self.0.attempted(delivery, outcome).await
    }
    async fn dead_letters(
        &self,
        subscription: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.0.dead_letters(subscription, after, limit).await
    }
    async fn replay_dead(
        &self,
        subscription: &str,
        only: Option<Vec<i64>>,
        now: NaiveDateTime,
    ) -> Result<usize, StoreError> {
        self.0.replay_dead(subscription, only, now).await
    }
    async fn outbox_depth(&self) -> Result<(i64, i64), StoreError> {
        self.0.outbox_depth().await
    }
    async fn tombstone(&self, run_id: Uuid) -> Result<Option<Tombstone>, StoreError> {
        self.0.tombstone(run_id).await
    }
    async fn save_tombstone(&self, t: &Tombstone) -> Result<bool, StoreError> {
        self.0.save_tombstone(t).await
    }
    async fn purge_due(&self, recorded_before: i64, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        self.0.purge_due(recorded_before, limit).await
    }
    async fn purge_run(&self, run_id: Uuid) -> Result<bool, StoreError> {
        self.0.purge_run(run_id).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().await
    }
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    fn wal_backlog(&self) -> Option<i64> {
        self.0.wal_backlog()
    }
}

//! The change feed: every committed change of every run, as events read from the log by cursor.
//!
//! The log is the feed's buffer. A reader replays from the log after its cursor (the row id),
//! then follows the tail: one task reads new rows after each commit and broadcasts them to every
//! live reader through one bounded ring. Appends are serialized (see `run_store::Store::feed`),
//! so cursors become visible in order and a reader that has seen cursor N never meets an event
//! below it later. With no live reader the tail reads nothing; the first reader sets its
//! position under the same lock the tail reads under, so nothing committed meanwhile falls
//! between the reader's replay and the tail.

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use run_store::{Attempted, Delivery, FeedRow, Store, StoreError, Webhook};
use serde_json::{json, Value as Json};
use tokio::sync::{broadcast, watch, Mutex, Notify};
use uuid::Uuid;

/// Events held in the ring for live readers; a reader further behind is told it lagged.
const RING: usize = 4096;
/// Content larger than this stays in the log: the ring carries the event without it and a
/// reader fetches it there, so the ring holds at most `RING` × this (16 MiB).
const RING_CONTENT_MAX: usize = 4 * 1024;
/// Rows read from the log at a time (a replaying stream holds at most one page).
pub const PAGE: i64 = 100;
/// The tail also reads this often without being woken (a commit it was not told about).
const TAIL_POLL: Duration = Duration::from_secs(1);

/// One committed change as the feed shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEvent {
    /// The cursor: the event's row in this node's log.
    pub id: i64,
    pub run_id: Uuid,
    pub kind: String,
    /// The event as JSON (`data:` of an SSE event, the body of a webhook); `None` when it was
    /// too large for the ring and is to be read from the log.
    pub json: Option<Arc<str>>,
}

impl FeedEvent {
    pub fn from_row(row: &FeedRow) -> Self {
        let (kind, content) = describe_row(row);
        let user = row
            .user_id
            .clone()
            .or_else(|| run_doc::entry_user(&content).map(str::to_string));
        let event = json!({
            "id": row.id,
            "runId": row.run_id,
            "changeHash": row.change_hash.as_ref().map(hex::encode),
            "lamport": row.lamport,
            "region": row.source_region,
            "user": user,
            "time": time(row.created_at),
            "kind": kind,
            "content": content,
        });
        FeedEvent {
            id: row.id,
            run_id: row.run_id,
            kind,
            json: Some(event.to_string().into()),
        }
    }

    /// The same event without its JSON, if that is large (for the ring).
    fn for_ring(mut self) -> Self {
        if self
            .json
            .as_ref()
            .is_some_and(|j| j.len() > RING_CONTENT_MAX)
        {
            self.json = None;
        }
        self
    }
}

fn time(t: NaiveDateTime) -> String {
    t.and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The kind and content of a row: as written with it, or for rows written before the feed
/// and legacy OT rows, from their event type and payload.
fn describe_row(row: &FeedRow) -> (String, Json) {
    let parsed = |s: &Option<String>| {
        s.as_deref()
            .and_then(|p| serde_json::from_str::<Json>(p).ok())
            .unwrap_or(Json::Null)
    };
    if let Some(kind) = &row.kind {
        return (kind.clone(), parsed(&row.content));
    }
    let payload = parsed(&row.payload);
    if row.change_hash.is_none() {
        return (
            "legacy".into(),
            json!({"eventType": row.event_type, "payload": payload}),
        );
    }
    let (kind, content) = match row.event_type.as_str() {
        "GRAFT" => ("graft", json!({ "graft": payload })),
        "PRUNE" => ("prune", payload),
        "UNPRUNE" => ("unprune", payload),
        "SET_FLAG" => ("setFlag", payload),
        "DELETE_FLAG" => ("deleteFlag", payload),
        // Synced before changes were described: what it touched was not recorded.
        _ => ("other", json!({ "touched": [] })),
    };
    (kind.into(), content)
}

/// Where the tail stands: the last cursor broadcast, or `None` while nobody listens.
struct Tail {
    position: Option<i64>,
}

pub struct ChangeFeed {
    store: Arc<dyn Store>,
    ring: broadcast::Sender<FeedEvent>,
    tail: Mutex<Tail>,
    wake: Notify,
    /// Counts commits, for whoever else follows them (webhook delivery).
    commits: watch::Sender<u64>,
    /// On a database the region's pods share: the others' commits wake nothing here, so the
    /// tail polls more often, and one pod of the region delivers webhooks.
    cluster: Option<Arc<super::ownership::Ownership>>,
    /// Until when this pod is known to hold the delivery role.
    delivering_until: std::sync::Mutex<Option<std::time::Instant>>,
}

/// The tail's poll on a shared database, where other pods' commits are not announced here.
const CLUSTER_TAIL_POLL: Duration = Duration::from_millis(200);

/// The role of the pod that delivers the region's webhooks.
const DELIVERY_ROLE: &str = "webhooks";

impl ChangeFeed {
    pub fn new(
        store: Arc<dyn Store>,
        cluster: Option<Arc<super::ownership::Ownership>>,
    ) -> Arc<Self> {
        Arc::new(ChangeFeed {
            store,
            ring: broadcast::channel(RING).0,
            tail: Mutex::new(Tail { position: None }),
            wake: Notify::new(),
            commits: watch::channel(0).0,
            cluster,
            delivering_until: std::sync::Mutex::new(None),
        })
    }

    /// Whether this pod delivers webhooks: always alone; on a shared database, while it holds
    /// the region's delivery role (checked again every third of a lease). A pod whose lease
    /// lapses may overlap its successor by that much: deliveries are at least once, and carry
    /// their id for the receiver to drop a repeat.
    async fn delivers(&self) -> bool {
        let Some(cluster) = &self.cluster else {
            return true;
        };
        let now = std::time::Instant::now();
        let known = *self
            .delivering_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if known.is_some_and(|until| now < until) {
            return true;
        }
        let holds = cluster.claim_role(DELIVERY_ROLE).await.unwrap_or_else(|e| {
            log::warn!("webhooks: claiming the delivery role failed: {e}");
            false
        });
        *self
            .delivering_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = holds.then(|| now + cluster.renew_every());
        holds
    }

    /// Follows the log's tail until the process ends (spawn it once).
    pub async fn run_tail(self: Arc<Self>) {
        loop {
            let poll = if self.cluster.is_some() {
                CLUSTER_TAIL_POLL
            } else {
                TAIL_POLL
            };
            let _ = tokio::time::timeout(poll, self.wake.notified()).await;
            if let Err(e) = self.read_tail().await {
                log::warn!("change feed: reading the log failed: {e}");
                tokio::time::sleep(TAIL_POLL).await;
            }
        }
    }

    /// Something was committed: the tail reads it (if anyone listens).
    pub fn wake(&self) {
        self.wake.notify_one();
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes each time something is committed.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    async fn read_tail(&self) -> Result<(), StoreError> {
        let mut tail = self.tail.lock().await;
        if self.ring.receiver_count() == 0 {
            tail.position = None;
            return Ok(());
        }
        let Some(mut position) = tail.position else {
            return Ok(());
        };
        loop {
            let rows = self.store.feed(position, None, PAGE).await?;
            for row in &rows {
                position = row.id;
                let _ = self.ring.send(FeedEvent::from_row(row).for_ring());
            }
            tail.position = Some(position);
            if (rows.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }

    /// A live reader: every event the tail broadcasts from now on. Replay from the log after
    /// subscribing; events up to the replay's end then arrive twice and are skipped by cursor.
    pub async fn subscribe(&self) -> Result<broadcast::Receiver<FeedEvent>, StoreError> {
        let mut tail = self.tail.lock().await;
        if tail.position.is_none() {
            tail.position = Some(self.store.last_event_id().await?);
        }
        Ok(self.ring.subscribe())
    }

    /// Live readers.
    pub fn readers(&self) -> usize {
        self.ring.receiver_count()
    }

    /// Up to [`PAGE`] events after `after`, of one run or of all.
    pub async fn page(&self, after: i64, run: Option<Uuid>) -> Result<Vec<FeedEvent>, StoreError> {
        let rows = self.store.feed(after, run, PAGE).await?;
        Ok(rows.iter().map(FeedEvent::from_row).collect())
    }

    /// The event at cursor `id` in full (one the ring carried without its JSON).
    pub async fn event(&self, id: i64, run: Uuid) -> Result<Option<FeedEvent>, StoreError> {
        let rows = self.store.feed(id - 1, Some(run), 1).await?;
        Ok(rows.iter().find(|r| r.id == id).map(FeedEvent::from_row))
    }

    /// Whether `cursor` names a point of this node's log. Any event's id is a position in it,
    /// also on one run's stream: a stream that was told to resume after another run's event
    /// (the last one it passed over) resumes there.
    pub async fn knows(&self, cursor: i64) -> Result<bool, StoreError> {
        if cursor == 0 {
            return Ok(true);
        }
        Ok(self.store.event_run(cursor).await?.is_some())
    }

    /// The newest cursor.
    pub async fn last(&self) -> Result<i64, StoreError> {
        self.store.last_event_id().await
    }
}

/// Webhook subscriptions and their outbox (filled by the log's appends, see
/// `run_store::Store::append`), for the webhook edge.
impl ChangeFeed {
    pub async fn save_webhook(&self, webhook: &Webhook) -> Result<(), StoreError> {
        self.store.save_webhook(webhook).await
    }

    pub async fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        self.store.delete_webhook(id).await
    }

    pub async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        self.store.webhooks().await
    }

    pub async fn due_deliveries(&self, limit: i64) -> Result<Vec<Delivery>, StoreError> {
        if !self.delivers().await {
            return Ok(Vec::new());
        }
        let now = chrono::Utc::now().naive_utc();
        self.store.due_deliveries(now, limit).await
    }

    pub async fn attempted(&self, delivery: i64, outcome: &Attempted) -> Result<(), StoreError> {
        self.store.attempted(delivery, outcome).await
    }

    pub async fn dead_letters(
        &self,
        subscription: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.store.dead_letters(subscription, after, limit).await
    }

    pub async fn replay_dead(
        &self,
        subscription: &str,
        only: Option<Vec<i64>>,
    ) -> Result<usize, StoreError> {
        let now = chrono::Utc::now().naive_utc();
        self.store.replay_dead(subscription, only, now).await
    }

    /// Deliveries pending and dead.
    pub async fn outbox_depth(&self) -> Result<(i64, i64), StoreError> {
        self.store.outbox_depth().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: Option<&str>, content: Option<&str>, event_type: &str) -> FeedRow {
        FeedRow {
            id: 7,
            run_id: Uuid::nil(),
            event_type: event_type.into(),
            payload: Some(r#"{"id":"g","agent":"A","afterStep":"s","user":"ann"}"#.into()),
            user_id: None,
            created_at: NaiveDateTime::default(),
            change_hash: Some(vec![1, 2]),
            source_region: Some("us".into()),
            lamport: Some(3),
            kind: kind.map(str::to_string),
            content: content.map(str::to_string),
        }
    }

    fn parsed(e: &FeedEvent) -> Json {
        serde_json::from_str(e.json.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn an_event_carries_its_description_and_the_writer() {
        let e = FeedEvent::from_row(&row(
            Some("prune"),
            Some(r#"{"stepId":"s","user":"bo"}"#),
            "CRDT_SYNC",
        ));
        let j = parsed(&e);
        assert_eq!(j["kind"], "prune");
        assert_eq!(
            j["user"], "bo",
            "the entry's author when the row names none"
        );
        assert_eq!(j["changeHash"], "0102");
        assert_eq!(
            (j["id"].as_i64(), j["lamport"].as_i64()),
            (Some(7), Some(3))
        );
    }

    #[test]
    fn rows_from_before_the_feed_are_described_from_their_payload() {
        let j = parsed(&FeedEvent::from_row(&row(None, None, "GRAFT")));
        assert_eq!(j["kind"], "graft");
        assert_eq!(j["content"]["graft"]["agent"], "A");
        assert_eq!(j["user"], "ann");
        let mut legacy = row(None, None, "GRAFT");
        legacy.change_hash = None;
        let j = parsed(&FeedEvent::from_row(&legacy));
        assert_eq!(j["kind"], "legacy");
        assert_eq!(j["content"]["eventType"], "GRAFT");
    }

    #[test]
    fn large_events_leave_the_ring_without_their_json() {
        let big = format!(
            r#"{{"key":"k","value":"{}"}}"#,
            "x".repeat(RING_CONTENT_MAX)
        );
        let e = FeedEvent::from_row(&row(Some("setFlag"), Some(&big), "SET_FLAG")).for_ring();
        assert!(e.json.is_none());
        let small = FeedEvent::from_row(&row(Some("unprune"), Some("{}"), "UNPRUNE")).for_ring();
        assert!(small.json.is_some());
    }
}

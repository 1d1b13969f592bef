//! Durable storage of runs: the event log (`collaboration_events`) and snapshots
//! (`crdt_snapshots`).
//!
//! [`Store`] is shaped by what the runtime needs and nothing more. Two implementations sit behind
//! it: PostgreSQL (production) and SQLite (the embedded default, so the node runs with no
//! database server). [`GroupCommitter`] batches appends from many runs into one transaction.
//! This module knows bytes and rows, not Automerge documents.

/// The columns the feed reads of `collaboration_events` (as `FeedColumns`), for either
/// backend's table module.
macro_rules! feed_columns {
    ($ev:ident) => {
        (
            $ev::id,
            $ev::run_id,
            $ev::event_type,
            $ev::payload,
            $ev::user_id,
            $ev::created_at,
            $ev::change_hash,
            $ev::source_region,
            $ev::lamport_timestamp,
            $ev::event_kind,
            $ev::event_content,
        )
    };
}

mod group_commit;
mod migrate;
pub mod ownership;
mod postgres;
pub mod schema;
mod sqlite;
#[cfg(test)]
mod testing;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::NaiveDateTime;
use uuid::Uuid;

pub use group_commit::{CommitMetrics, GroupCommitter};
pub use ownership::{Claim, Fence, Joining, Member, Owner};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL {url:?} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("the group committer has stopped")]
    CommitterStopped,
    /// The write's fence is no longer the run's: another member owns it now (or nobody does).
    #[error("this pod no longer owns run(s) {}", .0.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "))]
    Fenced(Vec<Uuid>),
    /// This member's lease lapsed: it may claim nothing until it renews.
    #[error("this pod's membership lease has lapsed")]
    LeaseLapsed,
    #[error("{0} is not supported by this database (use PostgreSQL)")]
    Unsupported(&'static str),
}

impl StoreError {
    /// Whether the database refused the data rather than being out of reach: only then can
    /// one bad row be at fault, and retrying the rows apart makes sense.
    pub fn is_refusal(&self) -> bool {
        use diesel::result::{DatabaseErrorKind as K, Error as E};
        matches!(self, StoreError::Fenced(_))
            || matches!(self, StoreError::Query(E::DatabaseError(kind, _))
            if !matches!(kind, K::ClosedConnection | K::UnableToSendCommand))
    }
}

/// One CRDT change to append to a run's log.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub run_id: Uuid,
    /// Position in the run's log, assigned by the run's actor (1, 2, …).
    pub run_seq: i64,
    pub event_type: String,
    /// A JSON description of the mutation, for people reading the log.
    pub payload: Option<String>,
    pub user_id: Option<String>,
    pub created_at: NaiveDateTime,
    pub crdt_changes: Vec<u8>,
    pub change_hash: Vec<u8>,
    pub source_region: String,
    pub lamport: i64,
    /// What the change did (`run_doc::Kind`), for the change feed and webhook filters.
    pub kind: Option<String>,
    /// The description's content, JSON.
    pub content: Option<String>,
    /// The writer's ownership of the run, on a database pods share: the append is refused
    /// unless it is still the run's.
    pub fence: Option<Fence>,
}

/// An event read back for replay. `crdt_changes` is `None` for a legacy OT event.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub run_seq: Option<i64>,
    pub event_type: String,
    pub payload: Option<String>,
    pub crdt_changes: Option<Vec<u8>>,
    pub lamport: Option<i64>,
    pub user_id: Option<String>,
    pub created_at: NaiveDateTime,
}

/// The columns `events_after` selects, in order; both backends read them the same way.
type EventColumns = (
    Option<i64>,
    String,
    Option<String>,
    Option<Vec<u8>>,
    Option<i64>,
    Option<String>,
    NaiveDateTime,
);

impl From<EventColumns> for StoredEvent {
    fn from(
        (run_seq, event_type, payload, crdt_changes, lamport, user_id, created_at): EventColumns,
    ) -> Self {
        StoredEvent {
            run_seq,
            event_type,
            payload,
            crdt_changes,
            lamport,
            user_id,
            created_at,
        }
    }
}

/// An event as the change feed reads it: by cursor (the row id), without its change bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedRow {
    pub id: i64,
    pub run_id: Uuid,
    pub event_type: String,
    pub payload: Option<String>,
    pub user_id: Option<String>,
    pub created_at: NaiveDateTime,
    /// `None` for a legacy OT event.
    pub change_hash: Option<Vec<u8>>,
    pub source_region: Option<String>,
    pub lamport: Option<i64>,
    pub kind: Option<String>,
    pub content: Option<String>,
}

/// The columns `feed` selects, in order (the run id as each backend stores it).
type FeedColumns<R> = (
    i64,
    R,
    String,
    Option<String>,
    Option<String>,
    NaiveDateTime,
    Option<Vec<u8>>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

impl FeedRow {
    fn from_columns<R>(
        (
            id,
            run_id,
            event_type,
            payload,
            user_id,
            created_at,
            change_hash,
            source_region,
            lamport,
            kind,
            content,
        ): FeedColumns<R>,
        run: impl FnOnce(R) -> Uuid,
    ) -> Self {
        FeedRow {
            id,
            run_id: run(run_id),
            event_type,
            payload,
            user_id,
            created_at,
            change_hash,
            source_region,
            lamport,
            kind,
            content,
        }
    }
}

/// A webhook subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub secret: String,
    /// Only these runs' events; `None`: every run's.
    pub runs: Option<Vec<Uuid>>,
    /// Only events of these kinds; `None`: every kind.
    pub kinds: Option<Vec<String>>,
    /// `config` or `api`.
    pub origin: String,
    pub created_at: NaiveDateTime,
}

impl Webhook {
    /// The filters as stored: comma-separated run ids (simple hex, as both backends spell a
    /// run id in the outbox's filter) and kinds.
    fn stored_filters(&self) -> (Option<String>, Option<String>) {
        (
            self.runs.as_ref().map(|runs| {
                runs.iter()
                    .map(|r| r.simple().to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            self.kinds.as_ref().map(|k| k.join(",")),
        )
    }

    fn from_stored((id, url, secret, runs, kinds, origin, created_at): WebhookColumns) -> Webhook {
        let split = |s: Option<String>| {
            s.map(|s| {
                s.split(',')
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
        };
        Webhook {
            id,
            url,
            secret,
            runs: split(runs).map(|r| r.iter().filter_map(|r| Uuid::parse_str(r).ok()).collect()),
            kinds: split(kinds),
            origin,
            created_at,
        }
    }
}

type WebhookColumns = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    NaiveDateTime,
);

/// One event waiting in a subscription's outbox, or dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The outbox row.
    pub id: i64,
    pub subscription_id: String,
    pub attempts: i32,
    /// `pending` or `dead`.
    pub state: String,
    pub last_error: Option<String>,
    pub next_attempt_at: NaiveDateTime,
    /// When the event entered the outbox (its commit).
    pub queued_at: NaiveDateTime,
    pub event: FeedRow,
}

/// An outbox row as selected (without its event).
#[derive(Debug, Clone, diesel::QueryableByName)]
struct OutboxRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    subscription_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    event_id: i64,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Text)]
    state: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Timestamp)]
    next_attempt_at: NaiveDateTime,
    #[diesel(sql_type = diesel::sql_types::Timestamp)]
    created_at: NaiveDateTime,
}

/// The outbox's queries, the same text on both backends (`$n` placeholders, each first used
/// in order, which SQLite numbers alike).
mod outbox_sql {
    /// Due deliveries of live subscriptions, at most `$2` of each (one slow endpoint cannot
    /// fill the window the others are read through), `$3` in all.
    pub const DUE: &str = "SELECT id, subscription_id, event_id, attempts, state, last_error, \
        next_attempt_at, created_at FROM (SELECT o.id, o.subscription_id, o.event_id, \
        o.attempts, o.state, o.last_error, o.next_attempt_at, o.created_at, \
        ROW_NUMBER() OVER (PARTITION BY o.subscription_id ORDER BY o.event_id) AS rn \
        FROM crdt_webhook_outbox o JOIN crdt_webhooks w ON w.id = o.subscription_id \
        WHERE o.state = 'pending' AND o.next_attempt_at <= $1 \
        AND NOT EXISTS (SELECT 1 FROM crdt_webhook_outbox p \
            WHERE p.subscription_id = o.subscription_id AND p.run_id = o.run_id \
            AND p.state = 'pending' AND p.event_id < o.event_id)) d \
        WHERE rn <= $2 ORDER BY event_id LIMIT $3";
    pub const DEAD: &str = "SELECT o.id, o.subscription_id, o.event_id, o.attempts, o.state, \
        o.last_error, o.next_attempt_at, o.created_at FROM crdt_webhook_outbox o \
        WHERE o.subscription_id = $1 AND o.state = 'dead' AND o.id > $2 \
        ORDER BY o.id LIMIT $3";
    pub const DELIVERED: &str = "DELETE FROM crdt_webhook_outbox WHERE id = $1";
    pub const RETRY: &str = "UPDATE crdt_webhook_outbox SET attempts = attempts + 1, \
        last_error = $1, next_attempt_at = $2 WHERE id = $3";
    pub const KILL: &str = "UPDATE crdt_webhook_outbox SET attempts = attempts + 1, \
        last_error = $1, state = 'dead' WHERE id = $2";
    pub const REPLAY: &str = "UPDATE crdt_webhook_outbox SET state = 'pending', attempts = 0, \
        next_attempt_at = $1 WHERE subscription_id = $2 AND state = 'dead'";
    pub const REPLAY_ONE: &str = "UPDATE crdt_webhook_outbox SET state = 'pending', \
        attempts = 0, next_attempt_at = $1 WHERE subscription_id = $2 AND state = 'dead' \
        AND id = $3";
    pub const DROP_OUTBOX: &str = "DELETE FROM crdt_webhook_outbox WHERE subscription_id = $1";
    pub const DROP_WEBHOOK: &str = "DELETE FROM crdt_webhooks WHERE id = $1";
    pub const SAVE_WEBHOOK: &str = "INSERT INTO crdt_webhooks \
        (id, url, secret, runs, kinds, origin, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
        ON CONFLICT (id) DO UPDATE SET url = excluded.url, secret = excluded.secret, \
        runs = excluded.runs, kinds = excluded.kinds, origin = excluded.origin";
    pub const WEBHOOKS: &str = "SELECT id, url, secret, runs, kinds, origin, created_at \
        FROM crdt_webhooks ORDER BY created_at, id";
    pub const DEPTH: &str = "SELECT state, COUNT(*) AS n FROM crdt_webhook_outbox GROUP BY state";
}

#[derive(diesel::QueryableByName)]
struct WebhookRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    url: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    secret: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    runs: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    kinds: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    origin: String,
    #[diesel(sql_type = diesel::sql_types::Timestamp)]
    created_at: NaiveDateTime,
}

impl From<WebhookRow> for Webhook {
    fn from(r: WebhookRow) -> Self {
        Webhook::from_stored((
            r.id,
            r.url,
            r.secret,
            r.runs,
            r.kinds,
            r.origin,
            r.created_at,
        ))
    }
}

#[derive(diesel::QueryableByName)]
struct DepthRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    state: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn depth(rows: Vec<DepthRow>) -> (i64, i64) {
    let count = |state: &str| rows.iter().filter(|r| r.state == state).map(|r| r.n).sum();
    (count("pending"), count("dead"))
}

/// Due deliveries of one subscription read at a time (see `outbox_sql::DUE`).
const DUE_PER_SUBSCRIPTION: i64 = 50;

/// Joins outbox rows with their events (rows whose event is gone are left out).
fn deliveries(rows: Vec<OutboxRow>, events: Vec<FeedRow>) -> Vec<Delivery> {
    let events: std::collections::HashMap<i64, FeedRow> =
        events.into_iter().map(|e| (e.id, e)).collect();
    rows.into_iter()
        .filter_map(|r| {
            Some(Delivery {
                event: events.get(&r.event_id)?.clone(),
                id: r.id,
                subscription_id: r.subscription_id,
                attempts: r.attempts,
                state: r.state,
                last_error: r.last_error,
                next_attempt_at: r.next_attempt_at,
                queued_at: r.created_at,
            })
        })
        .collect()
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempted {
    /// Delivered: the row leaves the outbox.
    Delivered,
    /// Failed; tried again at `next` (or dead-lettered if `None`).
    Failed {
        error: String,
        next: Option<NaiveDateTime>,
    },
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: Uuid,
    pub run_id: Uuid,
    pub data: Vec<u8>,
    pub lamport: i64,
    pub region: String,
    pub created_at: NaiveDateTime,
    /// The `run_seq` of the last event the snapshot covers.
    pub event_count: i32,
    /// The run's read model at the snapshot's heads (`run_doc::Projection`, encoded), if
    /// written with it.
    pub projection: Option<Vec<u8>>,
    /// As [`NewEvent::fence`]: a deposed owner's snapshot is refused.
    pub fence: Option<Fence>,
}

/// The last decision about a run's deletion: deleted, or restored. Regions exchange them and
/// the later decision wins ([`Tombstone::supersedes`]), so every region reaches the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub run_id: Uuid,
    pub deleted: bool,
    /// When it was decided, unix milliseconds: the clock the later decision is chosen by.
    pub decided_at: i64,
    /// The region that decided; breaks a tie of `decided_at`.
    pub region: String,
    pub by: Option<String>,
    /// The run's events and snapshots are gone (only this row is left of it).
    pub purged: bool,
}

impl Tombstone {
    /// Whether this decision wins over `other` (the same rule as `SAVE_TOMBSTONE`'s).
    pub fn supersedes(&self, other: &Tombstone) -> bool {
        (self.decided_at, self.region.as_str()) > (other.decided_at, other.region.as_str())
    }
}

/// The filter that leaves deleted runs (their tombstone says so) out of a list of `table`.
fn not_deleted(table: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM crdt_tombstones t \
        WHERE t.run_id = {table}.run_id AND t.deleted)"
    )
}

mod tombstone_sql {
    pub const GET: &str = "SELECT deleted, decided_at, region, decided_by, purged \
        FROM crdt_tombstones WHERE run_id = $1";
    /// Last writer wins: a decision is recorded only over an earlier one. A restore clears
    /// `purged` (the run comes back from its peers); a deletion keeps it. `collate` makes the
    /// region tie-break compare bytes, as `Tombstone::supersedes` does.
    pub fn save(collate: &str) -> String {
        format!(
            "INSERT INTO crdt_tombstones \
            (run_id, deleted, decided_at, region, decided_by, purged, recorded_at) \
            VALUES ($1, $2, $3, $4, $5, FALSE, $6) \
            ON CONFLICT (run_id) DO UPDATE SET deleted = excluded.deleted, \
            decided_at = excluded.decided_at, region = excluded.region, \
            decided_by = excluded.decided_by, recorded_at = excluded.recorded_at, \
            purged = CASE WHEN excluded.deleted THEN crdt_tombstones.purged ELSE FALSE END \
            WHERE excluded.decided_at > crdt_tombstones.decided_at \
            OR (excluded.decided_at = crdt_tombstones.decided_at \
                AND excluded.region{collate} > crdt_tombstones.region{collate})"
        )
    }
    /// Deleted runs this region recorded before `$1` (the grace period counts from when the
    /// decision reached this region, whatever clock made it).
    pub const DUE: &str = "SELECT run_id FROM crdt_tombstones \
        WHERE deleted AND NOT purged AND recorded_at < $1 ORDER BY recorded_at LIMIT $2";
    /// The purge's first statement: only a run still deleted, not yet purged.
    pub const MARK_PURGED: &str = "UPDATE crdt_tombstones SET purged = TRUE \
        WHERE run_id = $1 AND deleted AND NOT purged";
    /// Everything else stored of a run.
    pub const PURGE: [&str; 4] = [
        "DELETE FROM crdt_webhook_outbox WHERE run_id = $1",
        "DELETE FROM crdt_snapshots WHERE run_id = $1",
        "DELETE FROM collaboration_events WHERE run_id = $1",
        "DELETE FROM crdt_runs WHERE run_id = $1",
    ];
}

#[derive(diesel::QueryableByName)]
struct TombstoneRow {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    deleted: bool,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    decided_at: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    region: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    decided_by: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    purged: bool,
}

impl TombstoneRow {
    fn of(self, run_id: Uuid) -> Tombstone {
        Tombstone {
            run_id,
            deleted: self.deleted,
            decided_at: self.decided_at,
            region: self.region,
            by: self.decided_by,
            purged: self.purged,
        }
    }
}

/// A run and when it last had an event appended: an entry of the runs list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunActivity {
    pub run_id: Uuid,
    pub last_activity: NaiveDateTime,
}

/// The latest `created_at` per run among `events`, for the runs list.
fn activity(events: &[NewEvent]) -> Vec<RunActivity> {
    let mut latest: std::collections::HashMap<Uuid, NaiveDateTime> = Default::default();
    for e in events {
        let t = latest.entry(e.run_id).or_insert(e.created_at);
        *t = (*t).max(e.created_at);
    }
    latest
        .into_iter()
        .map(|(run_id, last_activity)| RunActivity {
            run_id,
            last_activity,
        })
        .collect()
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends events in one transaction; events whose change is already stored for the run
    /// are skipped. Returns how many rows were inserted.
    async fn append(&self, events: &[NewEvent]) -> Result<usize, StoreError>;
    /// The run's newest snapshot, or with `below`, the newest covering fewer events than that
    /// (to fall back from a snapshot that does not load).
    async fn latest_snapshot(
        &self,
        run_id: Uuid,
        below: Option<i32>,
    ) -> Result<Option<Snapshot>, StoreError>;
    /// The run's events after position `after_seq` (legacy events, which have no position,
    /// only when `after_seq` is 0), in log order.
    async fn events_after(
        &self,
        run_id: Uuid,
        after_seq: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// Writes a snapshot and keeps only the newest `keep` for its run.
    async fn save_snapshot(&self, snapshot: &Snapshot, keep: usize) -> Result<(), StoreError>;
    /// Up to `limit` ids of runs that have events, in id order, after `after` (a page).
    async fn list_runs(&self, after: Option<Uuid>, limit: i64) -> Result<Vec<Uuid>, StoreError>;
    /// Up to `limit` runs, most recently active first, continuing after `after` (the last
    /// entry of the previous page).
    async fn recent_runs(
        &self,
        after: Option<&RunActivity>,
        limit: i64,
    ) -> Result<Vec<RunActivity>, StoreError>;
    /// Up to `limit` events after cursor `after` (a row id), of one run or of all, in cursor
    /// order. Cursors follow commit order: appends are serialized, so a reader that has seen
    /// cursor N never later finds a new event below it.
    async fn feed(
        &self,
        after: i64,
        run: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<FeedRow>, StoreError>;
    /// The newest event's cursor (0 for an empty log).
    async fn last_event_id(&self) -> Result<i64, StoreError>;
    /// The run of the event at cursor `id`, if there is one.
    async fn event_run(&self, id: i64) -> Result<Option<Uuid>, StoreError>;
    /// Adds or replaces a webhook subscription.
    async fn save_webhook(&self, webhook: &Webhook) -> Result<(), StoreError>;
    /// Removes a subscription and its outbox; false if there was none.
    async fn delete_webhook(&self, id: &str) -> Result<bool, StoreError>;
    async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError>;
    /// Up to `limit` pending deliveries due by `now`, each the oldest pending one of its
    /// subscription and run (a run's events are delivered in order), oldest first.
    async fn due_deliveries(
        &self,
        now: NaiveDateTime,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError>;
    /// Records an attempt: delivered rows leave the outbox; failed ones wait for their next
    /// attempt, or stay dead-lettered.
    async fn attempted(&self, delivery: i64, outcome: &Attempted) -> Result<(), StoreError>;
    /// A subscription's dead-lettered deliveries, oldest first, after outbox row `after`.
    async fn dead_letters(
        &self,
        subscription: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError>;
    /// Puts a subscription's dead letters back in line (all, or those listed); how many.
    async fn replay_dead(
        &self,
        subscription: &str,
        only: Option<Vec<i64>>,
        now: NaiveDateTime,
    ) -> Result<usize, StoreError>;
    /// Deliveries pending and dead, in all.
    async fn outbox_depth(&self) -> Result<(i64, i64), StoreError>;
    /// Checks the database answers.
    /// The last decision about the run's deletion, if any was ever made.
    async fn tombstone(&self, run_id: Uuid) -> Result<Option<Tombstone>, StoreError>;
    /// Records `t` unless a later decision is stored (and when it was recorded: now); whether
    /// it was recorded.
    async fn save_tombstone(&self, t: &Tombstone) -> Result<bool, StoreError>;
    /// Runs whose deletion this store recorded before `recorded_before` (unix ms) and not yet
    /// purged, oldest first.
    async fn purge_due(&self, recorded_before: i64, limit: i64) -> Result<Vec<Uuid>, StoreError>;
    /// Removes every row of a deleted run but its tombstone; false if it is no longer deleted
    /// or was purged already (nothing is removed then).
    async fn purge_run(&self, run_id: Uuid) -> Result<bool, StoreError>;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Joins the pods sharing this database as `who`, with a lease of `lease_secs`.
    async fn join(&self, _who: &Joining, _lease_secs: f64) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }
    /// Renews the member's lease; whether it was still running (if not, others may have
    /// claimed its runs meanwhile).
    async fn renew(&self, _member: &str, _lease_secs: f64) -> Result<bool, StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }
    /// Releases every run of the member and ends its membership.
    async fn leave(&self, _member: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }
    /// Claims the run for the member unless a live member holds it.
    async fn claim(&self, _run_id: Uuid, _member: &Arc<str>) -> Result<Claim, StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }
    /// The run's live holder, if any (reads only: claims nothing, locks nothing).
    async fn holder(&self, _run_id: Uuid) -> Result<Option<Owner>, StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }
    /// Gives the run up, if the fence still holds it.
    async fn release(&self, _run_id: Uuid, _fence: &Fence) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }
    /// Takes (or keeps) a role one member of the region plays for all, unless a live member
    /// holds it; whether this member holds it now.
    async fn claim_role(&self, _role: &str, _member: &str) -> Result<bool, StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }
    /// Gives a role up, if this member holds it.
    async fn release_role(&self, _role: &str, _member: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }
    /// The members, with how many runs each owns.
    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        Err(StoreError::Unsupported("sharing a database among pods"))
    }

    /// "postgres" or "sqlite".
    fn backend(&self) -> &'static str;

    /// Pages written to the log's WAL but not yet copied back into the database file, as the
    /// last checkpoint left them: SQLite's only (PostgreSQL checkpoints on its own). It grows
    /// while a reader holds an old snapshot, and the WAL file with it.
    fn wal_backlog(&self) -> Option<i64> {
        None
    }
}

/// Opens the store a database URL names, running embedded migrations first.
/// `postgres://` / `postgresql://` → PostgreSQL; `sqlite://PATH` or a plain path → SQLite.
pub async fn open(
    url: &str,
    pool_size: usize,
    create_if_missing: bool,
) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        if create_if_missing {
            postgres::create_database(url).await?;
        }
        migrate::run(migrate::Target::Postgres(url.to_string()))
            .await
            .map_err(|e| match e {
                // The first thing a newcomer with a fresh server meets: say how to get past it.
                StoreError::Unavailable(why) if why.contains("does not exist") => {
                    StoreError::Unavailable(format!(
                        "{why} (create it, or set DATABASE_CREATE_IF_MISSING=true and the \
                         node creates it)"
                    ))
                }
                other => other,
            })?;
        Ok(Arc::new(postgres::PgStore::connect(url, pool_size)?))
    } else {
        let path = sqlite_path(url)?;
        migrate::run(migrate::Target::Sqlite(path.clone())).await?;
        Ok(Arc::new(sqlite::SqliteStore::connect(&path, pool_size)?))
    }
}

fn sqlite_path(url: &str) -> Result<String, StoreError> {
    let path = url.strip_prefix("sqlite://").unwrap_or(url);
    let bad = |reason: &str| StoreError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if path.is_empty() {
        return Err(bad("no file path"));
    }
    if path.contains("://") {
        return Err(bad("use postgres://… or sqlite://PATH or a file path"));
    }
    if path == ":memory:" {
        return Err(bad(
            "an in-memory database would lose every run on restart; give a file path",
        ));
    }
    if let Some(dir) = std::path::Path::new(path).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| bad(&format!("cannot create {}: {e}", dir.display())))?;
        }
    }
    Ok(path.to_string())
}

fn pool_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/x.db");
        let url = format!("sqlite://{}", file.display());
        assert_eq!(sqlite_path(&url).unwrap(), file.display().to_string());
        assert!(file.parent().unwrap().is_dir());
        assert!(sqlite_path("sqlite://").is_err());
        assert!(sqlite_path(":memory:").is_err());
        assert!(sqlite_path("mysql://x").is_err());
    }
}

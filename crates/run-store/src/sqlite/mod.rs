//! SQLite store (the embedded default): plain diesel connections from an r2d2 pool, each
//! operation a whole blocking task.
//!
//! Not diesel-async's wrapper: a query future of that wrapper dropped mid-flight (a request
//! cancelled, a runtime shutting down) blocks in place, which panics on actix's single-threaded
//! runtimes. A `spawn_blocking` task dropped unfinished simply runs to its end.
//!
//! WAL mode lets loads read while the group committer writes; `synchronous=FULL` makes every
//! committed transaction survive a power cut, which is what an acknowledgement promises.
//! Each connection keeps up to 8 MiB of pages (SQLite's default is 2 MiB; 64 MiB at most for
//! the pool of 8): the group committer's inserts land on index pages all over the log (a
//! thousand runs written at once), and re-reading them was part of each commit (1.06× durable
//! grafts/s under wrk, BENCHMARKS.md). The WAL is copied back into the database by a thread of
//! its own soon after each write ([`checkpoint`]); the automatic checkpoint inside a commit waits
//! for 16,384 pages, by when the thread has copied nearly all of them.
//!
//! Appends and snapshots are written through one connection of their own. In WAL mode a
//! connection drops its whole page cache when it begins a transaction after another connection
//! wrote, so writes spread over the pool found their index pages cold and read them again; and
//! two writers of ours met in SQLite's busy handler, which sleeps. One writer behind a mutex
//! keeps its cache and queues in order.

use std::time::Duration;

use async_trait::async_trait;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{
    ConnectionManager, CustomizeConnection, Pool, PooledConnection, R2D2Connection,
};
use diesel::SqliteConnection;
use uuid::Uuid;

mod checkpoint;
mod prepared;

use super::schema::sqlite::{
    collaboration_events as ev, crdt_runs as runs, crdt_snapshots as snap,
};
use super::{
    activity, deliveries, depth, not_deleted, outbox_sql as sql, pool_error, tombstone_sql as tomb,
    Attempted, Delivery, DepthRow, EventColumns, FeedColumns, FeedRow, NewEvent, OutboxRow,
    RunActivity, Snapshot, Store, StoreError, StoredEvent, Tombstone, TombstoneRow, Webhook,
    WebhookRow, DUE_PER_SUBSCRIPTION,
};
use chrono::NaiveDateTime;
use diesel::sql_types::{BigInt, Binary, Bool, Nullable, Text, Timestamp};

type Conn = PooledConnection<ConnectionManager<SqliteConnection>>;

pub struct SqliteStore {
    pool: Pool<ConnectionManager<SqliteConnection>>,
    /// One permit per connection the pool has for reads. Reads queue here, first come first
    /// served and without a deadline, rather than in the pool's own wait: that one gives up
    /// after its connection timeout and serves its waiters in no order, so a burst of thousands
    /// of loads (each a blocking task waiting for a connection) could leave some waiting past
    /// the timeout and refuse them as "database unavailable".
    readers: std::sync::Arc<tokio::sync::Semaphore>,
    /// The connection appends and snapshots are written through (see the module's notes).
    writer: std::sync::Arc<std::sync::Mutex<Conn>>,
    /// Wakes the thread that copies the WAL back beside the commits (see [`checkpoint`]).
    checkpoint: checkpoint::Wake,
}

// busy_timeout first: the others may need a lock that a neighbouring connection holds.
// wal_autocheckpoint: the WAL's bound and its restart under a writer that never pauses (see
// `checkpoint`).
const PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
                       PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
                       PRAGMA cache_size = -8192; PRAGMA wal_autocheckpoint = 16384;";

#[derive(QueryableByName)]
struct AppendStart {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    before: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    hooks: bool,
}

/// The outbox rows of the events this transaction appended (ids past the first `?`): one per
/// webhook subscription whose filters take the event.
const FILL_OUTBOX: &str = "INSERT INTO crdt_webhook_outbox \
    (subscription_id, event_id, run_id, attempts, next_attempt_at, state, created_at) \
    SELECT s.id, e.id, e.run_id, 0, ?2, 'pending', ?2 \
    FROM collaboration_events e JOIN crdt_webhooks s \
    ON (s.runs IS NULL OR ',' || s.runs || ',' LIKE '%,' || lower(hex(e.run_id)) || ',%') \
    AND (s.kinds IS NULL OR ',' || s.kinds || ',' LIKE '%,' || COALESCE(e.event_kind, 'other') || ',%') \
    WHERE e.id > ?1 \
    ON CONFLICT DO NOTHING";

#[derive(Debug)]
struct Pragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(PRAGMAS)
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

#[derive(Insertable, Queryable)]
#[diesel(table_name = snap)]
struct SnapshotRow {
    id: Vec<u8>,
    run_id: Vec<u8>,
    snapshot_data: Vec<u8>,
    lamport_timestamp: i64,
    region: String,
    created_at: chrono::NaiveDateTime,
    event_count: Option<i32>,
    projection: Option<Vec<u8>>,
}

impl SqliteStore {
    pub fn connect(path: &str, pool_size: usize) -> Result<Self, StoreError> {
        Self::connect_waiting(path, pool_size, Duration::from_secs(5))
    }

    /// As [`SqliteStore::connect`], the pool waiting at most `wait` for a connection.
    fn connect_waiting(path: &str, pool_size: usize, wait: Duration) -> Result<Self, StoreError> {
        let size = pool_size.clamp(2, 8);
        let pool = Pool::builder()
            .max_size(u32::try_from(size).unwrap_or(8))
            .min_idle(Some(1))
            .connection_timeout(wait)
            .connection_customizer(Box::new(Pragmas))
            .build(ConnectionManager::new(path))
            .map_err(pool_error)?;
        // Held for the store's life: the pool keeps the rest for reads and rarer writes.
        let writer = pool.get().map_err(pool_error)?;
        Ok(SqliteStore {
            pool,
            readers: std::sync::Arc::new(tokio::sync::Semaphore::new(size - 1)),
            writer: std::sync::Arc::new(std::sync::Mutex::new(writer)),
            checkpoint: checkpoint::start(path)?,
        })
    }

    /// Runs `work` with the writer connection on the blocking pool.
    async fn with_writer<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    {
        let (writer, pool) = (self.writer.clone(), self.pool.clone());
        let checkpoint = self.checkpoint.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(|poisoned| {
                writer.clear_poison();
                poisoned.into_inner()
            });
            // A connection left in a transaction (a panic mid-way) or in error (a commit and its
            // rollback both failed, as on a full disk) would refuse every later write: it is
            // replaced, as the pool discards such a connection when it comes back, and dropping
            // it closes it, which rolls back what it held and releases the write lock.
            if R2D2Connection::is_broken(&mut **conn) {
                *conn = pool.get().map_err(pool_error)?;
            }
            let done = work(&mut conn);
            checkpoint.committed();
            done
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("SQLite task failed: {e}")))?
    }

    /// As [`SqliteStore::with_conn`], for a write: the checkpoint thread is woken after it.
    async fn with_conn_writing<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    {
        let done = self.with_conn(work).await;
        self.checkpoint.committed();
        done
    }

    /// Runs `work` with a pooled connection on the blocking pool.
    async fn with_conn<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let turn = self
            .readers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the SQLite store is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            // Held until the work ends, even if the caller stops waiting for it.
            let _turn = turn;
            let mut conn = pool.get().map_err(pool_error)?;
            work(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("SQLite task failed: {e}")))?
    }
}

/// Outbox rows with their events.
fn with_events(c: &mut Conn, rows: Vec<OutboxRow>) -> Result<Vec<Delivery>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.event_id).collect();
    let events: Vec<FeedColumns<Vec<u8>>> = ev::table
        .select(feed_columns!(ev))
        .filter(ev::id.eq_any(ids))
        .load(c)?;
    let events = events
        .into_iter()
        .map(|r| FeedRow::from_columns(r, |id| Uuid::from_slice(&id).unwrap_or_default()))
        .collect();
    Ok(deliveries(rows, events))
}

/// Inserts `events` inside the caller's transaction, with their runs' activity and outbox
/// rows; how many were new. The statements every append runs stay prepared on the connection
/// (the outbox's runs only while subscriptions exist).
fn append_in(c: &mut SqliteConnection, events: &[NewEvent]) -> QueryResult<usize> {
    let start: AppendStart = prepared::BeginAppend.get_result(c)?;
    let mut n = 0;
    for e in events {
        // Every column bound, empty ones as NULL: an `Insertable` struct leaves out its `None`
        // fields, so its SQL varied with the event, one prepared statement per mix of empty
        // columns.
        n += diesel::insert_into(ev::table)
            .values((
                ev::run_id.eq(e.run_id.as_bytes().as_slice()),
                ev::event_type.eq(e.event_type.as_str()),
                ev::payload.eq(e.payload.as_deref()),
                ev::user_id.eq(e.user_id.as_deref()),
                ev::created_at.eq(e.created_at),
                ev::crdt_changes.eq(e.crdt_changes.as_slice()),
                ev::source_region.eq(e.source_region.as_str()),
                ev::lamport_timestamp.eq(e.lamport),
                ev::run_seq.eq(e.run_seq),
                ev::change_hash.eq(e.change_hash.as_slice()),
                ev::event_kind.eq(e.kind.as_deref()),
                ev::event_content.eq(e.content.as_deref()),
            ))
            // A change already stored is skipped; a clash on run_seq is an error.
            .on_conflict((ev::run_id, ev::change_hash))
            .do_nothing()
            .execute(c)?;
    }
    for a in activity(events) {
        prepared::TouchRun {
            run_id: a.run_id.as_bytes(),
            last_activity: a.last_activity,
        }
        .execute(c)?;
    }
    if n > 0 && start.hooks {
        diesel::sql_query(FILL_OUTBOX)
            .bind::<diesel::sql_types::BigInt, _>(start.before)
            .bind::<diesel::sql_types::Timestamp, _>(chrono::Utc::now().naive_utc())
            .execute(c)?;
    }
    Ok(n)
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, events: &[NewEvent]) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        if events.iter().any(|e| e.fence.is_some()) {
            return Err(StoreError::Unsupported("sharing a database among pods"));
        }
        let events = events.to_vec();
        self.with_writer(move |c| {
            // Immediate: the write lock from the start, so the ids read below are this
            // transaction's own.
            let n = c.immediate_transaction(|c| append_in(c, &events))?;
            Ok(n)
        })
        .await
    }

    async fn latest_snapshot(
        &self,
        run_id: Uuid,
        below: Option<i32>,
    ) -> Result<Option<Snapshot>, StoreError> {
        let row: Option<SnapshotRow> = self
            .with_conn(move |c| {
                let mut query = snap::table.into_boxed();
                query = query.filter(snap::run_id.eq(run_id.as_bytes().to_vec()));
                if let Some(below) = below {
                    query = query.filter(snap::event_count.lt(below));
                }
                Ok(query
                    .order((snap::event_count.desc(), snap::created_at.desc()))
                    .first(c)
                    .optional()?)
            })
            .await?;
        Ok(row.map(|r| Snapshot {
            id: Uuid::from_slice(&r.id).unwrap_or_default(),
            run_id,
            data: r.snapshot_data,
            lamport: r.lamport_timestamp,
            region: r.region,
            created_at: r.created_at,
            event_count: r.event_count.unwrap_or(0),
            projection: r.projection,
            fence: None,
        }))
    }

    async fn events_after(
        &self,
        run_id: Uuid,
        after_seq: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<EventColumns> = self
            .with_conn(move |c| {
                let mut query = ev::table
                    .filter(ev::run_id.eq(run_id.as_bytes().to_vec()))
                    .select((
                        ev::run_seq,
                        ev::event_type,
                        ev::payload,
                        ev::crdt_changes,
                        ev::lamport_timestamp,
                        ev::user_id,
                        ev::created_at,
                    ))
                    // SQLite sorts NULLs first in ascending order: legacy rows come first.
                    .order((ev::run_seq.asc(), ev::id.asc()))
                    .into_boxed();
                if after_seq > 0 {
                    query = query.filter(ev::run_seq.gt(after_seq));
                }
                Ok(query.load(c)?)
            })
            .await?;
        Ok(rows.into_iter().map(StoredEvent::from).collect())
    }

    async fn feed(
        &self,
        after: i64,
        run: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<FeedRow>, StoreError> {
        let rows: Vec<FeedColumns<Vec<u8>>> = self
            .with_conn(move |c| {
                let mut query = ev::table
                    .select(feed_columns!(ev))
                    .filter(ev::id.gt(after))
                    .order(ev::id.asc())
                    .limit(limit)
                    .into_boxed();
                if let Some(run) = run {
                    query = query.filter(ev::run_id.eq(run.as_bytes().to_vec()));
                }
                Ok(query.load(c)?)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| FeedRow::from_columns(r, |id| Uuid::from_slice(&id).unwrap_or_default()))
            .collect())
    }

    async fn last_event_id(&self) -> Result<i64, StoreError> {
        self.with_conn(|c| {
            let max: Option<i64> = ev::table.select(diesel::dsl::max(ev::id)).first(c)?;
            Ok(max.unwrap_or(0))
        })
        .await
    }

    async fn event_run(&self, id: i64) -> Result<Option<Uuid>, StoreError> {
        let run: Option<Vec<u8>> = self
            .with_conn(move |c| {
                Ok(ev::table
                    .select(ev::run_id)
                    .filter(ev::id.eq(id))
                    .first(c)
                    .optional()?)
            })
            .await?;
        Ok(run.map(|r| Uuid::from_slice(&r).unwrap_or_default()))
    }

    async fn save_webhook(&self, w: &Webhook) -> Result<(), StoreError> {
        let (runs, kinds) = w.stored_filters();
        let w = w.clone();
        self.with_conn_writing(move |c| {
            diesel::sql_query(sql::SAVE_WEBHOOK)
                .bind::<Text, _>(&w.id)
                .bind::<Text, _>(&w.url)
                .bind::<Text, _>(&w.secret)
                .bind::<Nullable<Text>, _>(runs)
                .bind::<Nullable<Text>, _>(kinds)
                .bind::<Text, _>(&w.origin)
                .bind::<Timestamp, _>(w.created_at)
                .execute(c)?;
            Ok(())
        })
        .await
    }

    async fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.with_conn_writing(move |c| {
            let n = c.immediate_transaction(|c| {
                diesel::sql_query(sql::DROP_OUTBOX)
                    .bind::<Text, _>(&id)
                    .execute(c)?;
                diesel::sql_query(sql::DROP_WEBHOOK)
                    .bind::<Text, _>(&id)
                    .execute(c)
            })?;
            Ok(n > 0)
        })
        .await
    }

    async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        self.with_conn(|c| {
            let rows: Vec<WebhookRow> = diesel::sql_query(sql::WEBHOOKS).load(c)?;
            Ok(rows.into_iter().map(Webhook::from).collect())
        })
        .await
    }

    async fn due_deliveries(
        &self,
        now: NaiveDateTime,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.with_conn(move |c| {
            let rows: Vec<OutboxRow> = diesel::sql_query(sql::DUE)
                .bind::<Timestamp, _>(now)
                .bind::<BigInt, _>(DUE_PER_SUBSCRIPTION.min(limit))
                .bind::<BigInt, _>(limit)
                .load(c)?;
            with_events(c, rows)
        })
        .await
    }

    async fn attempted(&self, delivery: i64, outcome: &Attempted) -> Result<(), StoreError> {
        let outcome = outcome.clone();
        self.with_conn_writing(move |c| {
            match &outcome {
                Attempted::Delivered => diesel::sql_query(sql::DELIVERED)
                    .bind::<BigInt, _>(delivery)
                    .execute(c)?,
                Attempted::Failed {
                    error,
                    next: Some(at),
                } => diesel::sql_query(sql::RETRY)
                    .bind::<Text, _>(error)
                    .bind::<Timestamp, _>(*at)
                    .bind::<BigInt, _>(delivery)
                    .execute(c)?,
                Attempted::Failed { error, next: None } => diesel::sql_query(sql::KILL)
                    .bind::<Text, _>(error)
                    .bind::<BigInt, _>(delivery)
                    .execute(c)?,
            };
            Ok(())
        })
        .await
    }

    async fn dead_letters(
        &self,
        subscription: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let subscription = subscription.to_string();
        self.with_conn(move |c| {
            let rows: Vec<OutboxRow> = diesel::sql_query(sql::DEAD)
                .bind::<Text, _>(&subscription)
                .bind::<BigInt, _>(after)
                .bind::<BigInt, _>(limit)
                .load(c)?;
            with_events(c, rows)
        })
        .await
    }

    async fn replay_dead(
        &self,
        subscription: &str,
        only: Option<Vec<i64>>,
        now: NaiveDateTime,
    ) -> Result<usize, StoreError> {
        let subscription = subscription.to_string();
        self.with_conn_writing(move |c| {
            Ok(c.immediate_transaction(|c| match only {
                None => diesel::sql_query(sql::REPLAY)
                    .bind::<Timestamp, _>(now)
                    .bind::<Text, _>(&subscription)
                    .execute(c),
                Some(ids) => {
                    let mut n = 0;
                    for id in ids {
                        n += diesel::sql_query(sql::REPLAY_ONE)
                            .bind::<Timestamp, _>(now)
                            .bind::<Text, _>(&subscription)
                            .bind::<BigInt, _>(id)
                            .execute(c)?;
                    }
                    Ok::<_, diesel::result::Error>(n)
                }
            })?)
        })
        .await
    }

    async fn outbox_depth(&self) -> Result<(i64, i64), StoreError> {
        self.with_conn(|c| {
            let rows: Vec<DepthRow> = diesel::sql_query(sql::DEPTH).load(c)?;
            Ok(depth(rows))
        })
        .await
    }

    async fn save_snapshot(&self, s: &Snapshot, keep: usize) -> Result<(), StoreError> {
        if s.fence.is_some() {
            return Err(StoreError::Unsupported("sharing a database among pods"));
        }
        let row = SnapshotRow {
            id: s.id.as_bytes().to_vec(),
            run_id: s.run_id.as_bytes().to_vec(),
            snapshot_data: s.data.clone(),
            lamport_timestamp: s.lamport,
            region: s.region.clone(),
            created_at: s.created_at,
            event_count: Some(s.event_count),
            projection: s.projection.clone(),
        };
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        self.with_writer(move |c| {
            c.transaction(|c| {
                diesel::insert_into(snap::table).values(&row).execute(c)?;
                let newest: Vec<Vec<u8>> = snap::table
                    .filter(snap::run_id.eq(row.run_id.clone()))
                    .order((snap::event_count.desc(), snap::created_at.desc()))
                    .select(snap::id)
                    .limit(keep)
                    .load(c)?;
                diesel::delete(
                    snap::table
                        .filter(snap::run_id.eq(row.run_id.clone()))
                        .filter(snap::id.ne_all(newest)),
                )
                .execute(c)?;
                Ok::<_, diesel::result::Error>(())
            })?;
            Ok(())
        })
        .await
    }

    async fn list_runs(&self, after: Option<Uuid>, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<Vec<u8>> = self
            .with_conn(move |c| {
                let mut query = ev::table
                    .select(ev::run_id)
                    .filter(diesel::dsl::sql::<Bool>(&not_deleted(
                        "collaboration_events",
                    )))
                    .distinct()
                    .order(ev::run_id.asc())
                    .limit(limit)
                    .into_boxed();
                if let Some(after) = after {
                    query = query.filter(ev::run_id.gt(after.as_bytes().to_vec()));
                }
                Ok(query.load(c)?)
            })
            .await?;
        // Ids written by this node are always 16 bytes; anything else is skipped, not fatal.
        Ok(ids
            .into_iter()
            .filter_map(|b| Uuid::from_slice(&b).ok())
            .collect())
    }

    async fn recent_runs(
        &self,
        after: Option<&RunActivity>,
        limit: i64,
    ) -> Result<Vec<RunActivity>, StoreError> {
        let after = after.cloned();
        let rows: Vec<(Vec<u8>, chrono::NaiveDateTime)> = self
            .with_conn(move |c| {
                let mut query = runs::table
                    .select((runs::run_id, runs::last_activity))
                    // Ids this node writes are 16 bytes; others would end a page early.
                    .filter(diesel::dsl::sql::<Bool>("length(run_id) = 16"))
                    .filter(diesel::dsl::sql::<Bool>(&not_deleted("crdt_runs")))
                    .order((runs::last_activity.desc(), runs::run_id.desc()))
                    .limit(limit)
                    .into_boxed();
                if let Some(a) = after {
                    // The `<=` bound lets the index range start at the cursor.
                    let id = a.run_id.as_bytes().to_vec();
                    query = query.filter(
                        runs::last_activity.le(a.last_activity).and(
                            runs::last_activity
                                .lt(a.last_activity)
                                .or(runs::run_id.lt(id)),
                        ),
                    );
                }
                Ok(query.load(c)?)
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, last_activity)| {
                Some(RunActivity {
                    run_id: Uuid::from_slice(&id).ok()?,
                    last_activity,
                })
            })
            .collect())
    }

    async fn tombstone(&self, run_id: Uuid) -> Result<Option<Tombstone>, StoreError> {
        let row: Option<TombstoneRow> = self
            .with_conn(move |c| {
                Ok(diesel::sql_query(tomb::GET)
                    .bind::<Binary, _>(run_id.as_bytes().to_vec())
                    .get_result(c)
                    .optional()?)
            })
            .await?;
        Ok(row.map(|r| r.of(run_id)))
    }

    async fn save_tombstone(&self, t: &Tombstone) -> Result<bool, StoreError> {
        let t = t.clone();
        self.with_conn_writing(move |c| {
            let n = diesel::sql_query(tomb::save(""))
                .bind::<Binary, _>(t.run_id.as_bytes().to_vec())
                .bind::<Bool, _>(t.deleted)
                .bind::<BigInt, _>(t.decided_at)
                .bind::<Text, _>(&t.region)
                .bind::<Nullable<Text>, _>(t.by.as_deref())
                .bind::<BigInt, _>(chrono::Utc::now().timestamp_millis())
                .execute(c)?;
            Ok(n > 0)
        })
        .await
    }

    async fn purge_due(&self, recorded_before: i64, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        #[derive(QueryableByName)]
        struct Due {
            #[diesel(sql_type = Binary)]
            run_id: Vec<u8>,
        }
        let rows: Vec<Due> = self
            .with_conn(move |c| {
                Ok(diesel::sql_query(tomb::DUE)
                    .bind::<BigInt, _>(recorded_before)
                    .bind::<BigInt, _>(limit)
                    .load(c)?)
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Uuid::from_slice(&r.run_id).ok())
            .collect())
    }

    async fn purge_run(&self, run_id: Uuid) -> Result<bool, StoreError> {
        self.with_conn_writing(move |c| {
            let id = run_id.as_bytes().to_vec();
            Ok(c.immediate_transaction(|c| {
                let marked = diesel::sql_query(tomb::MARK_PURGED)
                    .bind::<Binary, _>(&id)
                    .execute(c)?;
                if marked == 0 {
                    return Ok::<_, diesel::result::Error>(false);
                }
                for statement in tomb::PURGE {
                    diesel::sql_query(statement)
                        .bind::<Binary, _>(&id)
                        .execute(c)?;
                }
                Ok(true)
            })?)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|c| {
            diesel::sql_query("SELECT 1").execute(c)?;
            Ok(())
        })
        .await
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn wal_backlog(&self) -> Option<i64> {
        Some(self.checkpoint.backlog())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{event, within, Prepared};

    /// A migrated database in a folder of its own (kept while the folder is).
    async fn migrated_db() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db").display().to_string();
        crate::migrate::run(crate::migrate::Target::Sqlite(path.clone()))
            .await
            .expect("migrations");
        (dir, path)
    }

    /// Every statement an append runs is prepared once per connection, whichever optional
    /// columns its events fill: diesel re-prepares what it cannot cache, which was 12% of
    /// the writer's time.
    #[tokio::test]
    async fn an_appends_statements_are_prepared_once() {
        let (_dir, path) = migrated_db().await;
        let mut c = SqliteConnection::establish(&path).expect("open");
        let prepared = Prepared::default();
        c.set_instrumentation(prepared.watch());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = [event(a, 1, true), event(b, 1, true)];
        let n = c
            .immediate_transaction(|c| append_in(c, &first))
            .expect("append");
        assert_eq!(n, 2);
        prepared.assert_holds(&[
            "MAX(id)",
            "INSERT INTO `collaboration_events`",
            "INSERT INTO crdt_runs",
        ]);
        let after_first = prepared.statements();
        // Empty optional columns this time, and a third run.
        let second = [
            event(a, 2, false),
            event(b, 2, false),
            event(Uuid::new_v4(), 1, false),
        ];
        let n = c
            .immediate_transaction(|c| append_in(c, &second))
            .expect("append");
        assert_eq!(n, 3);
        assert_eq!(
            prepared.statements(),
            after_first,
            "the second append prepared statements again"
        );
    }

    /// Waits up to 10 s for the database file alone (read past the WAL) to hold `n` events of
    /// `run`.
    async fn file_holds(path: &str, run: Uuid, n: i64) {
        // Immutable: SQLite reads the database file and ignores the WAL.
        let file_alone = format!("file:{path}?mode=ro&immutable=1");
        let what = format!("the database file does not hold the {n} events");
        within(10, &what, || {
            // Read without locks, so a read racing a checkpoint may fail: try again.
            let count = SqliteConnection::establish(&file_alone)
                .map_err(|e| e.to_string())
                .and_then(|mut c| {
                    ev::table
                        .filter(ev::run_id.eq(run.as_bytes().to_vec()))
                        .count()
                        .get_result::<i64>(&mut c)
                        .map_err(|e| e.to_string())
                });
            if count == Ok(n) {
                Ok(())
            } else {
                Err(count)
            }
        })
        .await;
    }

    /// The WAL is copied back into the database file soon after each write, by the checkpoint
    /// thread: the file alone holds what was appended, far below the writer's own checkpoint
    /// threshold, with no later commit to run it.
    #[tokio::test]
    async fn appends_reach_the_database_file_soon_after_their_commit() {
        let (_dir, path) = migrated_db().await;
        let store = SqliteStore::connect(&path, 2).expect("store");
        let run = Uuid::new_v4();
        let events: Vec<NewEvent> = (1..=50).map(|seq| event(run, seq, true)).collect();
        assert_eq!(store.append(&events).await.expect("append"), 50);
        file_holds(&path, run, 50).await;
    }

    /// A checkpoint that a reader held back is tried again once the reader is done, with no
    /// write to wake it.
    #[tokio::test]
    async fn a_checkpoint_held_back_by_a_reader_is_finished_later() {
        let (_dir, path) = migrated_db().await;
        let store = SqliteStore::connect(&path, 2).expect("store");
        let run = Uuid::new_v4();
        // A reader whose snapshot predates the append: the WAL's frames past it stay.
        let mut reader = SqliteConnection::establish(&path).expect("open");
        reader
            .batch_execute("BEGIN; SELECT COUNT(*) FROM collaboration_events;")
            .expect("read");
        let events: Vec<NewEvent> = (1..=50).map(|seq| event(run, seq, true)).collect();
        assert_eq!(store.append(&events).await.expect("append"), 50);
        // The checkpoint after the append has run (at most 10 ms later) and left them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = store.wal_backlog().expect("SQLite reports its WAL");
        assert!(held > 0, "the reader held back no pages: {held}");
        reader.batch_execute("COMMIT;").expect("end the read");
        file_holds(&path, run, 50).await;
        // The file holds them once a checkpoint copied everything, which it reports.
        within(10, "the backlog stays", || match store.wal_backlog() {
            Some(0) => Ok(()),
            left => Err(left),
        })
        .await;
    }

    /// Reads queue for the pool's connections in order, however long the wait: with one read
    /// connection held past the pool's connection timeout, twenty reads behind it are all
    /// answered (the pool's own wait refused them as "database unavailable").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_wait_their_turn_past_the_pools_timeout() {
        let (_dir, path) = migrated_db().await;
        // Two connections: the writer's and one for reads.
        let store = std::sync::Arc::new(
            SqliteStore::connect_waiting(&path, 2, Duration::from_millis(100)).expect("store"),
        );
        let holder = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .with_conn(|_| {
                        std::thread::sleep(Duration::from_millis(600));
                        Ok(())
                    })
                    .await
            })
        };
        // The holder has the read connection before the others ask.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reads = (0..20).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.latest_snapshot(Uuid::new_v4(), None).await })
        });
        for read in reads.collect::<Vec<_>>() {
            let answer = read.await.expect("read task");
            assert!(matches!(answer, Ok(None)), "{answer:?}");
        }
        holder.await.expect("holder").expect("held read");
    }
}

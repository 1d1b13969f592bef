//! PostgreSQL store through diesel-async and a deadpool connection pool.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diesel::prelude::*;
use diesel::sql_types;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{
    AnsiTransactionManager, AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection,
    TransactionManager,
};
use uuid::Uuid;

mod connections;
mod prepared;

use super::ownership::sql as own;
use super::schema::pg::{collaboration_events as ev, crdt_runs as runs, crdt_snapshots as snap};
use super::{
    deliveries, depth, not_deleted, outbox_sql as sql, pool_error, tombstone_sql as tomb,
    Attempted, Delivery, DepthRow, EventColumns, FeedColumns, FeedRow, NewEvent, OutboxRow,
    RunActivity, Snapshot, Store, StoreError, StoredEvent, Tombstone, TombstoneRow, Webhook,
    WebhookRow, DUE_PER_SUBSCRIPTION,
};
use super::{Claim, Fence, Joining, Member, Owner};
use chrono::NaiveDateTime;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamp};

/// What [`prepared::AppendEvents`] answers.
#[derive(QueryableByName)]
struct Appended {
    /// Events inserted (a change the run held already is not).
    #[diesel(sql_type = sql_types::BigInt)]
    appended: i64,
}

pub struct PgStore {
    pool: Pool<AsyncPgConnection>,
}

#[derive(Insertable, Queryable)]
#[diesel(table_name = snap)]
struct SnapshotRow {
    id: Uuid,
    run_id: Uuid,
    snapshot_data: Vec<u8>,
    lamport_timestamp: i64,
    region: String,
    created_at: chrono::NaiveDateTime,
    event_count: Option<i32>,
    projection: Option<Vec<u8>>,
}

/// Creates the database `url` names unless it exists, connecting to the server's `postgres`
/// database to do it.
pub async fn create_database(url: &str) -> Result<(), StoreError> {
    let bad = |reason: String| StoreError::BadUrl {
        url: url.to_string(),
        reason,
    };
    let mut admin = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    // The name as the server sees it: decoded, as tokio-postgres decodes it to connect.
    let name = percent_encoding::percent_decode_str(admin.path().trim_start_matches('/'))
        .decode_utf8()
        .map_err(|e| bad(e.to_string()))?
        .to_string();
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(bad(format!(
            "{name:?} is not a database name this node creates"
        )));
    }
    admin.set_path("/postgres");
    let mut conn = AsyncPgConnection::establish(admin.as_str())
        .await
        .map_err(|e| StoreError::Unavailable(format!("connecting to create {name}: {e}")))?;
    #[derive(QueryableByName)]
    struct Exists {
        #[diesel(sql_type = sql_types::Bool)]
        exists: bool,
    }
    let found: Exists =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS exists")
            .bind::<sql_types::Text, _>(&name)
            .get_result(&mut conn)
            .await?;
    if !found.exists {
        log::info!("storage: creating database {name}");
        let quoted = name.replace('"', "\"\"");
        match diesel::sql_query(format!("CREATE DATABASE \"{quoted}\""))
            .execute(&mut conn)
            .await
        {
            Ok(_) => {}
            // Another pod created it at the same moment.
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            )) => {}
            Err(e) if e.to_string().contains("already exists") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

impl PgStore {
    pub fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let mut config = ManagerConfig::default();
        // A broken connection shows itself on first use and is then dropped; checking each
        // checkout with a query would cost a round trip per commit.
        config.recycling_method = RecyclingMethod::Fast;
        config.custom_setup = connections::open_on_driver();
        let manager =
            AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(2))
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(pool_error)?;
        Ok(PgStore { pool })
    }
}

impl PgStore {
    /// Outbox rows with their events.
    async fn with_events(
        &self,
        conn: &mut AsyncPgConnection,
        rows: Vec<OutboxRow>,
    ) -> Result<Vec<Delivery>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.event_id).collect();
        let events: Vec<FeedColumns<Uuid>> = ev::table
            .select(feed_columns!(ev))
            .filter(ev::id.eq_any(ids))
            .load(conn)
            .await?;
        let events = events
            .into_iter()
            .map(|r| FeedRow::from_columns(r, |id| id))
            .collect();
        Ok(deliveries(rows, events))
    }
}

/// The distinct fences of a write, by run.
fn fences_of<'a>(
    writes: impl IntoIterator<Item = (Uuid, Option<&'a Fence>)>,
) -> Vec<(Uuid, Fence)> {
    let mut out: Vec<(Uuid, Fence)> = writes
        .into_iter()
        .filter_map(|(run, f)| f.map(|f| (run, f.clone())))
        .collect();
    out.sort_by_key(|(run, f)| (*run, f.epoch));
    out.dedup();
    out
}

#[derive(QueryableByName)]
struct FenceRow {
    #[diesel(sql_type = sql_types::Uuid)]
    run_id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    member: Option<String>,
    #[diesel(sql_type = BigInt)]
    epoch: i64,
}

/// The runs among `fences` whose row no longer names the fence's member and epoch. The rows
/// stay locked (shared) until the transaction ends, so no claim lands between this check and
/// the commit: a claim's later load sees everything this write commits.
async fn check_fences(
    c: &mut AsyncPgConnection,
    fences: &[(Uuid, Fence)],
) -> Result<Vec<Uuid>, diesel::result::Error> {
    if fences.is_empty() {
        return Ok(Vec::new());
    }
    let runs: Vec<Uuid> = fences.iter().map(|(r, _)| *r).collect();
    let rows: Vec<FenceRow> = prepared::CheckFences { runs: &runs }.load(c).await?;
    let holds = |run: Uuid, f: &Fence| {
        rows.iter().any(|r| {
            r.run_id == run && r.epoch == f.epoch && r.member.as_deref() == Some(&*f.member)
        })
    };
    let mut refused: Vec<Uuid> = fences
        .iter()
        .filter(|(run, f)| !holds(*run, f))
        .map(|(run, _)| *run)
        .collect();
    refused.dedup();
    Ok(refused)
}

#[derive(QueryableByName)]
struct Epoch {
    #[diesel(sql_type = BigInt)]
    epoch: i64,
}

#[derive(QueryableByName)]
struct Holder {
    #[diesel(sql_type = Nullable<Text>)]
    member: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    address: Option<String>,
    #[diesel(sql_type = sql_types::Bool)]
    live: bool,
    #[diesel(sql_type = sql_types::Bool)]
    joined: bool,
}

#[derive(QueryableByName)]
struct Running {
    #[diesel(sql_type = Nullable<sql_types::Bool>)]
    running: Option<bool>,
}

#[derive(QueryableByName)]
struct MemberRow {
    #[diesel(sql_type = Text)]
    member: String,
    #[diesel(sql_type = Text)]
    pod: String,
    #[diesel(sql_type = Text)]
    address: String,
    #[diesel(sql_type = sql_types::Bool)]
    live: bool,
    #[diesel(sql_type = BigInt)]
    runs: i64,
}

/// Appends `events` in a transaction of their own that holds the append lock: how many were
/// new, or the runs whose fence no longer holds (then nothing is written).
async fn append_locked(
    c: &mut AsyncPgConnection,
    events: &[NewEvent],
) -> Result<Result<usize, Vec<Uuid>>, diesel::result::Error> {
    if let Err(e) = AnsiTransactionManager::begin_transaction_sql(c, prepared::BEGIN_LOCKED).await {
        // The server refused the lock after opening the transaction, which diesel does not know
        // of (on a connection already in one it refuses before sending anything).
        if matches!(e, diesel::result::Error::DatabaseError(..)) {
            let _ = c.batch_execute("ROLLBACK").await;
        }
        return Err(e);
    }
    match append_in(c, events).await {
        Ok(done) => {
            AnsiTransactionManager::commit_transaction(c).await?;
            Ok(done)
        }
        // As diesel's own `transaction`: the write's error, unless the rollback failed too.
        Err(e) => match AnsiTransactionManager::rollback_transaction(c).await {
            Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(e),
            Err(rollback) => Err(rollback),
        },
    }
}

/// Inserts `events` inside the caller's transaction, which holds the append lock, with their
/// runs' activity and outbox rows: how many were new, or the runs whose fence no longer holds
/// (then nothing is written).
async fn append_in(
    c: &mut AsyncPgConnection,
    events: &[NewEvent],
) -> Result<Result<usize, Vec<Uuid>>, diesel::result::Error> {
    let fences = fences_of(events.iter().map(|e| (e.run_id, e.fence.as_ref())));
    let refused = check_fences(c, &fences).await?;
    if !refused.is_empty() {
        // Nothing written: the empty transaction commits, the caller is told.
        return Ok(Err(refused));
    }
    let now = chrono::Utc::now().naive_utc();
    let mut n = 0;
    for chunk in prepared::chunks_by_bytes(events) {
        let done: Appended = prepared::AppendEvents::new(chunk, now)
            .get_result(c)
            .await?;
        n += usize::try_from(done.appended).unwrap_or(0);
    }
    Ok(Ok(n))
}

#[async_trait]
impl Store for PgStore {
    async fn append(&self, events: &[NewEvent]) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let inserted = append_locked(&mut conn, events).await?;
        inserted.map_err(StoreError::Fenced)
    }

    async fn latest_snapshot(
        &self,
        run_id: Uuid,
        below: Option<i32>,
    ) -> Result<Option<Snapshot>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let mut query = snap::table.into_boxed();
        query = query.filter(snap::run_id.eq(run_id));
        if let Some(below) = below {
            query = query.filter(snap::event_count.lt(below));
        }
        let row: Option<SnapshotRow> = query
            .order((
                snap::event_count.desc().nulls_last(),
                snap::created_at.desc(),
            ))
            .first(&mut conn)
            .await
            .optional()?;
        Ok(row.map(|r| Snapshot {
            id: r.id,
            run_id: r.run_id,
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
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let mut query = ev::table
            .filter(ev::run_id.eq(run_id))
            .select((
                ev::run_seq,
                ev::event_type,
                ev::payload,
                ev::crdt_changes,
                ev::lamport_timestamp,
                ev::user_id,
                ev::created_at,
            ))
            .order((ev::run_seq.asc().nulls_first(), ev::id.asc()))
            .into_boxed();
        query = if after_seq > 0 {
            query.filter(ev::run_seq.gt(after_seq))
        } else {
            query
        };
        let rows: Vec<EventColumns> = query.load(&mut conn).await?;
        Ok(rows.into_iter().map(StoredEvent::from).collect())
    }

    async fn save_snapshot(&self, s: &Snapshot, keep: usize) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let row = SnapshotRow {
            id: s.id,
            run_id: s.run_id,
            snapshot_data: s.data.clone(),
            lamport_timestamp: s.lamport,
            region: s.region.clone(),
            created_at: s.created_at,
            event_count: Some(s.event_count),
            projection: s.projection.clone(),
        };
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let fences = fences_of([(s.run_id, s.fence.as_ref())]);
        let refused = conn
            .transaction(async |c| {
                let refused = check_fences(c, &fences).await?;
                if !refused.is_empty() {
                    return Ok(refused);
                }
                diesel::insert_into(snap::table)
                    .values(&row)
                    .execute(c)
                    .await?;
                let newest: Vec<Uuid> = snap::table
                    .filter(snap::run_id.eq(row.run_id))
                    .order((
                        snap::event_count.desc().nulls_last(),
                        snap::created_at.desc(),
                    ))
                    .select(snap::id)
                    .limit(keep)
                    .load(c)
                    .await?;
                diesel::delete(
                    snap::table
                        .filter(snap::run_id.eq(row.run_id))
                        .filter(snap::id.ne_all(newest)),
                )
                .execute(c)
                .await?;
                Ok::<_, diesel::result::Error>(Vec::new())
            })
            .await?;
        if refused.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Fenced(refused))
        }
    }

    async fn list_runs(&self, after: Option<Uuid>, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let mut query = ev::table
            .select(ev::run_id)
            .filter(diesel::dsl::sql::<sql_types::Bool>(&not_deleted(
                "collaboration_events",
            )))
            .distinct()
            .order(ev::run_id.asc())
            .limit(limit)
            .into_boxed();
        if let Some(after) = after {
            query = query.filter(ev::run_id.gt(after));
        }
        Ok(query.load(&mut conn).await?)
    }

    async fn recent_runs(
        &self,
        after: Option<&RunActivity>,
        limit: i64,
    ) -> Result<Vec<RunActivity>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let mut query = runs::table
            .select((runs::run_id, runs::last_activity))
            .filter(diesel::dsl::sql::<sql_types::Bool>(&not_deleted(
                "crdt_runs",
            )))
            .order((runs::last_activity.desc(), runs::run_id.desc()))
            .limit(limit)
            .into_boxed();
        if let Some(a) = after {
            // The `<=` bound lets the index range start at the cursor.
            query = query.filter(
                runs::last_activity.le(a.last_activity).and(
                    runs::last_activity
                        .lt(a.last_activity)
                        .or(runs::run_id.lt(a.run_id)),
                ),
            );
        }
        let rows: Vec<(Uuid, chrono::NaiveDateTime)> = query.load(&mut conn).await?;
        Ok(rows
            .into_iter()
            .map(|(run_id, last_activity)| RunActivity {
                run_id,
                last_activity,
            })
            .collect())
    }

    async fn feed(
        &self,
        after: i64,
        run: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<FeedRow>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let mut query = ev::table
            .select(feed_columns!(ev))
            .filter(ev::id.gt(after))
            .order(ev::id.asc())
            .limit(limit)
            .into_boxed();
        if let Some(run) = run {
            query = query.filter(ev::run_id.eq(run));
        }
        let rows: Vec<FeedColumns<Uuid>> = query.load(&mut conn).await?;
        Ok(rows
            .into_iter()
            .map(|r| FeedRow::from_columns(r, |id| id))
            .collect())
    }

    async fn last_event_id(&self) -> Result<i64, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let max: Option<i64> = ev::table
            .select(diesel::dsl::max(ev::id))
            .get_result(&mut conn)
            .await?;
        Ok(max.unwrap_or(0))
    }

    async fn event_run(&self, id: i64) -> Result<Option<Uuid>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        Ok(ev::table
            .select(ev::run_id)
            .filter(ev::id.eq(id))
            .first(&mut conn)
            .await
            .optional()?)
    }

    async fn save_webhook(&self, w: &Webhook) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let (runs, kinds) = w.stored_filters();
        let w = w.clone();
        conn.transaction(async |c| {
            // Not beside an append: one that found no subscription must not commit after it.
            prepared::TakeAppendLock.execute(c).await?;
            diesel::sql_query(sql::SAVE_WEBHOOK)
                .bind::<Text, _>(&w.id)
                .bind::<Text, _>(&w.url)
                .bind::<Text, _>(&w.secret)
                .bind::<Nullable<Text>, _>(runs)
                .bind::<Nullable<Text>, _>(kinds)
                .bind::<Text, _>(&w.origin)
                .bind::<Timestamp, _>(w.created_at)
                .execute(c)
                .await
        })
        .await?;
        Ok(())
    }

    async fn delete_webhook(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let id = id.to_string();
        let n = conn
            .transaction(async |c| {
                // Not beside an append: one filling the outbox from a snapshot that still
                // holds the subscription would leave rows behind it.
                prepared::TakeAppendLock.execute(c).await?;
                diesel::sql_query(sql::DROP_OUTBOX)
                    .bind::<Text, _>(&id)
                    .execute(c)
                    .await?;
                diesel::sql_query(sql::DROP_WEBHOOK)
                    .bind::<Text, _>(&id)
                    .execute(c)
                    .await
            })
            .await?;
        Ok(n > 0)
    }

    async fn webhooks(&self) -> Result<Vec<Webhook>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let rows: Vec<WebhookRow> = diesel::sql_query(sql::WEBHOOKS).load(&mut conn).await?;
        Ok(rows.into_iter().map(Webhook::from).collect())
    }

    async fn due_deliveries(
        &self,
        now: NaiveDateTime,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let rows: Vec<OutboxRow> = diesel::sql_query(sql::DUE)
            .bind::<Timestamp, _>(now)
            .bind::<BigInt, _>(DUE_PER_SUBSCRIPTION.min(limit))
            .bind::<BigInt, _>(limit)
            .load(&mut conn)
            .await?;
        self.with_events(&mut conn, rows).await
    }

    async fn attempted(&self, delivery: i64, outcome: &Attempted) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        match outcome {
            Attempted::Delivered => {
                diesel::sql_query(sql::DELIVERED)
                    .bind::<BigInt, _>(delivery)
                    .execute(&mut conn)
                    .await?
            }
            Attempted::Failed {
                error,
                next: Some(at),
            } => {
                diesel::sql_query(sql::RETRY)
                    .bind::<Text, _>(error)
                    .bind::<Timestamp, _>(*at)
                    .bind::<BigInt, _>(delivery)
                    .execute(&mut conn)
                    .await?
            }
            Attempted::Failed { error, next: None } => {
                diesel::sql_query(sql::KILL)
                    .bind::<Text, _>(error)
                    .bind::<BigInt, _>(delivery)
                    .execute(&mut conn)
                    .await?
            }
        };
        Ok(())
    }

    async fn dead_letters(
        &self,
        subscription: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let rows: Vec<OutboxRow> = diesel::sql_query(sql::DEAD)
            .bind::<Text, _>(subscription)
            .bind::<BigInt, _>(after)
            .bind::<BigInt, _>(limit)
            .load(&mut conn)
            .await?;
        self.with_events(&mut conn, rows).await
    }

    async fn replay_dead(
        &self,
        subscription: &str,
        only: Option<Vec<i64>>,
        now: NaiveDateTime,
    ) -> Result<usize, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let subscription = subscription.to_string();
        Ok(conn
            .transaction(async |c| match only {
                None => {
                    diesel::sql_query(sql::REPLAY)
                        .bind::<Timestamp, _>(now)
                        .bind::<Text, _>(&subscription)
                        .execute(c)
                        .await
                }
                Some(ids) => {
                    let mut n = 0;
                    for id in ids {
                        n += diesel::sql_query(sql::REPLAY_ONE)
                            .bind::<Timestamp, _>(now)
                            .bind::<Text, _>(&subscription)
                            .bind::<BigInt, _>(id)
                            .execute(c)
                            .await?;
                    }
                    Ok(n)
                }
            })
            .await?)
    }

    async fn outbox_depth(&self) -> Result<(i64, i64), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let rows: Vec<DepthRow> = diesel::sql_query(sql::DEPTH).load(&mut conn).await?;
        Ok(depth(rows))
    }

    async fn tombstone(&self, run_id: Uuid) -> Result<Option<Tombstone>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let row: Option<TombstoneRow> = diesel::sql_query(tomb::GET)
            .bind::<sql_types::Uuid, _>(run_id)
            .get_result(&mut conn)
            .await
            .optional()?;
        Ok(row.map(|r| r.of(run_id)))
    }

    async fn save_tombstone(&self, t: &Tombstone) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let n = diesel::sql_query(tomb::save(" COLLATE \"C\""))
            .bind::<sql_types::Uuid, _>(t.run_id)
            .bind::<sql_types::Bool, _>(t.deleted)
            .bind::<BigInt, _>(t.decided_at)
            .bind::<Text, _>(&t.region)
            .bind::<Nullable<Text>, _>(t.by.as_deref())
            .bind::<BigInt, _>(chrono::Utc::now().timestamp_millis())
            .execute(&mut conn)
            .await?;
        Ok(n > 0)
    }

    async fn purge_due(&self, recorded_before: i64, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        #[derive(QueryableByName)]
        struct Due {
            #[diesel(sql_type = sql_types::Uuid)]
            run_id: Uuid,
        }
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let rows: Vec<Due> = diesel::sql_query(tomb::DUE)
            .bind::<BigInt, _>(recorded_before)
            .bind::<BigInt, _>(limit)
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|r| r.run_id).collect())
    }

    async fn purge_run(&self, run_id: Uuid) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let purged = conn
            .transaction(async |c| {
                let marked = diesel::sql_query(tomb::MARK_PURGED)
                    .bind::<sql_types::Uuid, _>(run_id)
                    .execute(c)
                    .await?;
                if marked == 0 {
                    return Ok::<_, diesel::result::Error>(false);
                }
                for statement in tomb::PURGE {
                    diesel::sql_query(statement)
                        .bind::<sql_types::Uuid, _>(run_id)
                        .execute(c)
                        .await?;
                }
                Ok(true)
            })
            .await?;
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }

    async fn join(&self, who: &Joining, lease_secs: f64) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let member: &str = &who.member;
        conn.transaction(async |c| {
            diesel::sql_query(own::JOIN)
                .bind::<Text, _>(member)
                .bind::<Text, _>(&who.pod)
                .bind::<Text, _>(&who.region)
                .bind::<Text, _>(&who.address)
                .bind::<sql_types::Double, _>(lease_secs)
                .execute(c)
                .await?;
            diesel::sql_query(own::END_EARLIER)
                .bind::<Text, _>(member)
                .bind::<Text, _>(&who.pod)
                .execute(c)
                .await?;
            diesel::sql_query(own::FORGET_GONE).execute(c).await?;
            Ok::<_, diesel::result::Error>(())
        })
        .await?;
        Ok(())
    }

    async fn renew(&self, member: &str, lease_secs: f64) -> Result<bool, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let row: Option<Running> = diesel::sql_query(own::RENEW)
            .bind::<Text, _>(member)
            .bind::<sql_types::Double, _>(lease_secs)
            .get_result(&mut conn)
            .await
            .optional()?;
        // No row: forgotten after an hour gone; the caller joins again.
        Ok(row.and_then(|r| r.running).unwrap_or(false))
    }

    async fn leave(&self, member: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        conn.transaction(async |c| {
            diesel::sql_query(own::LEAVE_RUNS)
                .bind::<Text, _>(member)
                .execute(c)
                .await?;
            diesel::sql_query(own::LEAVE_ROLES)
                .bind::<Text, _>(member)
                .execute(c)
                .await?;
            diesel::sql_query(own::LEAVE)
                .bind::<Text, _>(member)
                .execute(c)
                .await?;
            Ok::<_, diesel::result::Error>(())
        })
        .await?;
        Ok(())
    }

    async fn holder(&self, run_id: Uuid) -> Result<Option<Owner>, StoreError> {
        #[derive(QueryableByName)]
        struct Live {
            #[diesel(sql_type = Text)]
            member: String,
            #[diesel(sql_type = Text)]
            address: String,
        }
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let live: Option<Live> = diesel::sql_query(own::LIVE_HOLDER)
            .bind::<sql_types::Uuid, _>(run_id)
            .get_result(&mut conn)
            .await
            .optional()?;
        Ok(live.map(|l| Owner {
            member: l.member,
            address: l.address,
        }))
    }

    async fn claim(&self, run_id: Uuid, member: &Arc<str>) -> Result<Claim, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        // A holder that releases between the read and the claim is claimed from on the next
        // try.
        for _ in 0..3 {
            // Read first: a claim's upsert locks the row even when its condition refuses it,
            // and the holder's appends lock the same row.
            let holder: Option<Holder> = diesel::sql_query(own::HOLDER)
                .bind::<sql_types::Uuid, _>(run_id)
                .bind::<Text, _>(&**member)
                .get_result(&mut conn)
                .await
                .optional()?;
            match &holder {
                Some(h) if !h.joined => return Err(StoreError::LeaseLapsed),
                Some(Holder {
                    member: Some(m),
                    address: Some(address),
                    live: true,
                    ..
                }) if **m != **member => {
                    return Ok(Claim::Held(Owner {
                        member: m.clone(),
                        address: address.clone(),
                    }))
                }
                _ => {}
            }
            let won: Option<Epoch> = diesel::sql_query(own::CLAIM)
                .bind::<sql_types::Uuid, _>(run_id)
                .bind::<Text, _>(&**member)
                .get_result(&mut conn)
                .await
                .optional()?;
            if let Some(won) = won {
                return Ok(Claim::Owned(Fence {
                    member: member.clone(),
                    epoch: won.epoch,
                }));
            }
            // No row and no claim: this member's lease is not running.
            if holder.is_none() {
                return Err(StoreError::LeaseLapsed);
            }
        }
        Err(StoreError::Unavailable(format!(
            "run {run_id}: its ownership kept changing while claimed"
        )))
    }

    async fn release(&self, run_id: Uuid, fence: &Fence) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        diesel::sql_query(own::RELEASE)
            .bind::<sql_types::Uuid, _>(run_id)
            .bind::<Text, _>(&*fence.member)
            .bind::<BigInt, _>(fence.epoch)
            .execute(&mut conn)
            .await?;
        Ok(())
    }

    async fn claim_role(&self, role: &str, member: &str) -> Result<bool, StoreError> {
        #[derive(QueryableByName)]
        struct Held {
            #[diesel(sql_type = Text)]
            #[allow(dead_code)]
            member: String,
        }
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let won: Option<Held> = diesel::sql_query(own::CLAIM_ROLE)
            .bind::<Text, _>(role)
            .bind::<Text, _>(member)
            .get_result(&mut conn)
            .await
            .optional()?;
        Ok(won.is_some())
    }

    async fn release_role(&self, role: &str, member: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        diesel::sql_query(own::RELEASE_ROLE)
            .bind::<Text, _>(role)
            .bind::<Text, _>(member)
            .execute(&mut conn)
            .await?;
        Ok(())
    }

    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let rows: Vec<MemberRow> = diesel::sql_query(own::MEMBERS).load(&mut conn).await?;
        Ok(rows
            .into_iter()
            .map(|r| Member {
                member: r.member,
                pod: r.pod,
                address: r.address,
                live: r.live,
                runs: r.runs,
            })
            .collect())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{event, Prepared};

    /// A migrated database of its own on the test server: its URL, and a guard that drops it.
    async fn scratch_database() -> (String, Scratch) {
        let admin = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("crdt_unit_{}", Uuid::new_v4().simple());
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        create_database(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {base} is required for this test: {e}"));
        crate::migrate::run(crate::migrate::Target::Postgres(url.clone()))
            .await
            .expect("migrations");
        (url, Scratch { admin, name })
    }

    struct Scratch {
        admin: String,
        name: String,
    }

    impl Scratch {
        async fn drop_database(self) {
            let mut admin = AsyncPgConnection::establish(&self.admin)
                .await
                .expect("admin");
            diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await
            .expect("dropped");
        }
    }

    /// An append abandoned while it holds the append lock (the group committer's timeout
    /// drops it between statements, and its connection waits in the pool idle in that
    /// transaction) holds later appends only until the server ends the idle session.
    #[tokio::test]
    async fn an_abandoned_append_gives_the_lock_back() {
        let (url, scratch) = scratch_database().await;
        let mut abandoned = AsyncPgConnection::establish(&url).await.expect("connects");
        AnsiTransactionManager::begin_transaction_sql(&mut abandoned, prepared::BEGIN_LOCKED)
            .await
            .expect("holds the lock");
        let store = PgStore::connect(&url, 2).expect("pool");
        let appended = tokio::time::timeout(
            Duration::from_secs(60),
            store.append(&[event(Uuid::new_v4(), 1, true)]),
        )
        .await
        .expect("the append still waits for the abandoned one's lock");
        assert_eq!(appended.expect("append"), 1);
        assert!(
            abandoned.batch_execute("SELECT 1").await.is_err(),
            "the abandoned session should have been ended by the server"
        );
        drop(store);
        scratch.drop_database().await;
    }

    /// A pooled connection's socket is driven by a task. Opened by whichever thread first
    /// needed it, that task ran on that thread's runtime (every actix arbiter has its own), so
    /// while that thread was busy (the snapshot thread saving a large run, a run actor applying
    /// a large sync) every query on the connection waited, whoever made it: appends on one hot
    /// run waited 0.5-2.5 s now and then. Here a connection is opened from a thread that then
    /// blocks for 6 s; an append from another runtime through the same pool, which finds only
    /// that connection idle, must not wait for it.
    #[tokio::test]
    async fn a_busy_thread_does_not_hold_the_connections_it_opened() {
        let (url, scratch) = scratch_database().await;
        let store = std::sync::Arc::new(PgStore::connect(&url, 2).expect("pool"));
        let (opened, opened_rx) = std::sync::mpsc::channel();
        let busy = {
            let store = store.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    // The pool's first connection, opened from here, back in the pool after.
                    store
                        .latest_snapshot(Uuid::new_v4(), None)
                        .await
                        .expect("read");
                    let _ = opened.send(());
                    // Busy, as a thread saving a snapshot is: its runtime polls nothing.
                    std::thread::sleep(Duration::from_secs(6));
                });
            })
        };
        opened_rx
            .recv()
            .expect("the busy thread opened a connection");
        let started = std::time::Instant::now();
        let appended = tokio::time::timeout(
            Duration::from_secs(3),
            store.append(&[event(Uuid::new_v4(), 1, true)]),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the append waited {:?} for a busy thread",
                started.elapsed()
            )
        });
        assert_eq!(appended.expect("append"), 1);
        busy.join().expect("the busy thread");
        drop(store);
        scratch.drop_database().await;
    }

    /// Every statement an append runs is prepared once per connection, whatever the batch's
    /// size (diesel-async spends a round trip preparing each statement it cannot cache, and
    /// PostgreSQL parses and plans it again), and an append is three round trips.
    #[tokio::test]
    async fn an_appends_statements_are_prepared_once() {
        let (url, scratch) = scratch_database().await;
        let mut c = AsyncPgConnection::establish(&url).await.expect("connects");
        let prepared = Prepared::default();
        c.set_instrumentation(prepared.watch());
        let first = [event(Uuid::new_v4(), 1, true)];
        let n = append_locked(&mut c, &first).await.expect("append");
        assert_eq!(n, Ok(1));
        prepared.assert_holds(&[
            "INSERT INTO collaboration_events",
            "INSERT INTO crdt_runs",
            "INSERT INTO crdt_webhook_outbox",
        ]);
        let after_first = prepared.statements();
        // A bigger batch over several runs, its optional columns empty.
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let second = [event(a, 1, false), event(b, 1, false), event(a, 2, true)];
        let before = prepared.started().len();
        let n = append_locked(&mut c, &second).await.expect("append");
        assert_eq!(n, Ok(3));
        assert_eq!(
            prepared.statements(),
            after_first,
            "the second append prepared statements again"
        );
        // Three round trips: the transaction's start with the lock, the append, the commit.
        let started = prepared.started().split_off(before);
        assert_eq!(started.len(), 3, "{started:#?}");
        assert!(
            started[0].contains("pg_advisory_xact_lock"),
            "{}",
            started[0]
        );
        assert!(started[1].contains("INSERT INTO collaboration_events"));
        assert!(started[2].contains("COMMIT"), "{}", started[2]);
        // A fenced append checks its runs' owners first, a prepared statement too: here the
        // run has no owner, so nothing is written.
        let run = Uuid::new_v4();
        let fenced = [NewEvent {
            fence: Some(Fence {
                member: "pod-a".into(),
                epoch: 1,
            }),
            ..event(run, 1, true)
        }];
        let before = prepared.started().len();
        assert_eq!(
            append_locked(&mut c, &fenced).await.expect("append"),
            Err(vec![run])
        );
        let started = prepared.started().split_off(before);
        assert_eq!(started.len(), 3, "{started:#?}");
        assert!(started[1].contains("FOR SHARE"), "{}", started[1]);
        prepared.assert_holds(&["FROM crdt_run_owners"]);
        drop(c);
        scratch.drop_database().await;
    }
}

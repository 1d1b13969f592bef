//! SQLite store (the embedded default) through diesel-async's wrapper of the sync connection.
//!
//! WAL mode lets loads read while the group committer writes; `synchronous=FULL` makes every
//! committed transaction survive a power cut, which is what an acknowledgement promises.

use std::time::Duration;

use async_trait::async_trait;
use diesel::prelude::*;
use diesel::SqliteConnection;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use futures_util::FutureExt;
use uuid::Uuid;

use super::schema::sqlite::{collaboration_events as ev, crdt_snapshots as snap};
use super::{pool_error, EventColumns, NewEvent, Snapshot, Store, StoreError, StoredEvent};

type Conn = SyncConnectionWrapper<SqliteConnection>;

pub struct SqliteStore {
    pool: Pool<Conn>,
}

// busy_timeout first: the others may need a lock that a neighbouring connection holds.
const PRAGMAS: &str = "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
                       PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;";

#[derive(Insertable)]
#[diesel(table_name = ev)]
struct EventRow<'a> {
    run_id: &'a [u8],
    event_type: &'a str,
    payload: Option<&'a str>,
    user_id: Option<&'a str>,
    created_at: chrono::NaiveDateTime,
    crdt_changes: Option<&'a [u8]>,
    source_region: Option<&'a str>,
    lamport_timestamp: Option<i64>,
    run_seq: Option<i64>,
    change_hash: Option<&'a [u8]>,
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
}

impl SqliteStore {
    pub fn connect(path: &str, pool_size: usize) -> Result<Self, StoreError> {
        let mut config = ManagerConfig::default();
        config.recycling_method = RecyclingMethod::Fast;
        config.custom_setup = Box::new(|url| {
            let url = url.to_string();
            async move {
                let mut conn = Conn::establish(&url).await?;
                conn.batch_execute(PRAGMAS)
                    .await
                    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                Ok(conn)
            }
            .boxed()
        });
        let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(path, config);
        let pool = Pool::builder(manager)
            .max_size(pool_size.clamp(2, 8))
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(pool_error)?;
        Ok(SqliteStore { pool })
    }
}

fn event_row(e: &NewEvent) -> EventRow<'_> {
    EventRow {
        run_id: e.run_id.as_bytes(),
        event_type: &e.event_type,
        payload: e.payload.as_deref(),
        user_id: e.user_id.as_deref(),
        created_at: e.created_at,
        crdt_changes: Some(&e.crdt_changes),
        source_region: Some(&e.source_region),
        lamport_timestamp: Some(e.lamport),
        run_seq: Some(e.run_seq),
        change_hash: Some(&e.change_hash),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, events: &[NewEvent]) -> Result<usize, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let events = events.to_vec();
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        // The whole transaction in one blocking task: SQLite is in-process, so a hop to the
        // blocking pool per statement would cost more than the inserts themselves.
        let inserted = conn
            .spawn_blocking(move |c| {
                diesel::Connection::transaction(c, |c| {
                    let mut n = 0;
                    for e in &events {
                        let insert = diesel::insert_into(ev::table)
                            .values(event_row(e))
                            // A change already stored is skipped; a clash on run_seq is an error.
                            .on_conflict((ev::run_id, ev::change_hash))
                            .do_nothing();
                        n += diesel::RunQueryDsl::execute(insert, c)?;
                    }
                    Ok::<_, diesel::result::Error>(n)
                })
            })
            .await?;
        Ok(inserted)
    }

    async fn latest_snapshot(
        &self,
        run_id: Uuid,
        below: Option<i32>,
    ) -> Result<Option<Snapshot>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let mut query = snap::table.into_boxed();
        query = query.filter(snap::run_id.eq(run_id.as_bytes().to_vec()));
        if let Some(below) = below {
            query = query.filter(snap::event_count.lt(below));
        }
        let row: Option<SnapshotRow> = query
            .order((snap::event_count.desc(), snap::created_at.desc()))
            .first(&mut conn)
            .await
            .optional()?;
        Ok(row.map(|r| Snapshot {
            id: Uuid::from_slice(&r.id).unwrap_or_default(),
            run_id,
            data: r.snapshot_data,
            lamport: r.lamport_timestamp,
            region: r.region,
            created_at: r.created_at,
            event_count: r.event_count.unwrap_or(0),
        }))
    }

    async fn events_after(
        &self,
        run_id: Uuid,
        after_seq: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let mut query = ev::table
            .filter(ev::run_id.eq(run_id.as_bytes().to_vec()))
            .select((
                ev::run_seq,
                ev::event_type,
                ev::payload,
                ev::crdt_changes,
                ev::lamport_timestamp,
            ))
            // SQLite sorts NULLs first in ascending order: legacy rows come first.
            .order((ev::run_seq.asc(), ev::id.asc()))
            .into_boxed();
        if after_seq > 0 {
            query = query.filter(ev::run_seq.gt(after_seq));
        }
        let rows: Vec<EventColumns> = query.load(&mut conn).await?;
        Ok(rows.into_iter().map(StoredEvent::from).collect())
    }

    async fn save_snapshot(&self, s: &Snapshot, keep: usize) -> Result<(), StoreError> {
        let row = SnapshotRow {
            id: s.id.as_bytes().to_vec(),
            run_id: s.run_id.as_bytes().to_vec(),
            snapshot_data: s.data.clone(),
            lamport_timestamp: s.lamport,
            region: s.region.clone(),
            created_at: s.created_at,
            event_count: Some(s.event_count),
        };
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        conn.transaction(async |c| {
            diesel::insert_into(snap::table)
                .values(&row)
                .execute(c)
                .await?;
            let newest: Vec<Vec<u8>> = snap::table
                .filter(snap::run_id.eq(row.run_id.clone()))
                .order((snap::event_count.desc(), snap::created_at.desc()))
                .select(snap::id)
                .limit(keep)
                .load(c)
                .await?;
            diesel::delete(
                snap::table
                    .filter(snap::run_id.eq(row.run_id.clone()))
                    .filter(snap::id.ne_all(newest)),
            )
            .execute(c)
            .await?;
            Ok::<_, diesel::result::Error>(())
        })
        .await?;
        Ok(())
    }

    async fn list_runs(&self, after: Option<Uuid>, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        let mut query = ev::table
            .select(ev::run_id)
            .distinct()
            .order(ev::run_id.asc())
            .limit(limit)
            .into_boxed();
        if let Some(after) = after {
            query = query.filter(ev::run_id.gt(after.as_bytes().to_vec()));
        }
        let ids: Vec<Vec<u8>> = query.load(&mut conn).await?;
        // Ids written by this node are always 16 bytes; anything else is skipped, not fatal.
        Ok(ids
            .into_iter()
            .filter_map(|b| Uuid::from_slice(&b).ok())
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.get().await.map_err(pool_error)?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

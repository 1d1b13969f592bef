//! The append's statements as query fragments that diesel-async keeps prepared.
//!
//! diesel-async prepares a statement it cannot cache (a `sql_query`, a multi-row insert whose
//! text grows with its rows) in a round trip of its own before running it, and PostgreSQL
//! parses and plans it again each time. These have fixed text and a type of their own to be
//! cached by; the events go in as one array per column.
//!
//! Every commit queues behind the one before, so an append's round trips are the committer's
//! time: three now ([`BEGIN_LOCKED`], [`AppendEvents`], the commit), a fenced one four
//! ([`CheckFences`] first). It was six: the transaction's start, the lock, reading where the
//! log ended, the insert, the runs' activity and the commit, one more with webhook
//! subscriptions, and two more with fences.

use chrono::NaiveDateTime;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Binary, Nullable, Text, Timestamp, Untyped};
use diesel::QueryResult;
use uuid::Uuid;

use crate::NewEvent;

/// The statement that takes the append lock (a macro, so [`BEGIN_LOCKED`] can hold it too).
macro_rules! append_lock {
    () => {
        "SELECT pg_advisory_xact_lock(7263010451)"
    };
}

/// Takes the lock that serializes appends (and the webhook changes beside them) until the
/// transaction ends: cursors (row ids) then become visible in order, where with overlapping
/// transactions an id drawn earlier could commit later, behind a feed reader that had already
/// passed it.
pub(super) struct TakeAppendLock;

/// Opens an append's transaction and takes [`TakeAppendLock`]'s lock, in one message (the
/// simple protocol runs its statements in order). The statements after it begin once the lock
/// is held, so each reads the database with every earlier append in it: a statement reads the
/// database as it stood when it began, so one that also waited for the lock would miss what
/// committed meanwhile.
///
/// The isolation level is named: under a stricter default the transaction's snapshot would be
/// taken by the lock statement, before it waited. An append its caller gave up on (the group
/// committer's timeout drops it between statements) leaves its connection idle in a
/// transaction that holds the lock, back in the pool until its next checkout, while every
/// other append waits on the lock: the server ends such a session after 20 s idle, which
/// releases it. An append's own statements follow each other at once, so only an abandoned
/// one is ever idle that long.
pub(super) const BEGIN_LOCKED: &str = concat!(
    "BEGIN ISOLATION LEVEL READ COMMITTED; \
    SET LOCAL idle_in_transaction_session_timeout = '20s'; ",
    append_lock!()
);

/// The owner rows of a fenced append's runs, locked (shared) until the transaction ends, so
/// no claim lands between this check and the commit. Read as `super::FenceRow`.
pub(super) struct CheckFences<'a> {
    pub runs: &'a [Uuid],
}

/// Inserts events in their order, skipping a change the run already holds, and in the same
/// statement records each run's latest activity (never moving it back; runs in id order) and
/// the outbox rows of the events it inserted: one per webhook subscription whose filters take
/// the event. Read as [`super::Appended`].
pub(super) struct AppendEvents<'a> {
    events: InsertEvents<'a>,
    run_ids: Vec<Uuid>,
    times: Vec<NaiveDateTime>,
    now: NaiveDateTime,
}

impl<'a> AppendEvents<'a> {
    pub fn new(events: &'a [NewEvent], now: NaiveDateTime) -> Self {
        // In run id order: two writers touching the same runs take their row locks alike.
        let mut touched = crate::activity(events);
        touched.sort_by_key(|a| a.run_id);
        AppendEvents {
            events: InsertEvents::new(events),
            run_ids: touched.iter().map(|a| a.run_id).collect(),
            times: touched.iter().map(|a| a.last_activity).collect(),
            now,
        }
    }
}

/// The events' columns, one array each.
struct InsertEvents<'a> {
    run_ids: Vec<Uuid>,
    event_types: Vec<&'a str>,
    payloads: Vec<Option<&'a str>>,
    user_ids: Vec<Option<&'a str>>,
    created_at: Vec<NaiveDateTime>,
    changes: Vec<&'a [u8]>,
    regions: Vec<&'a str>,
    lamports: Vec<i64>,
    seqs: Vec<i64>,
    hashes: Vec<&'a [u8]>,
    kinds: Vec<Option<&'a str>>,
    contents: Vec<Option<&'a str>>,
    epochs: Vec<Option<i64>>,
}

impl<'a> InsertEvents<'a> {
    fn new(events: &'a [NewEvent]) -> Self {
        InsertEvents {
            run_ids: events.iter().map(|e| e.run_id).collect(),
            event_types: events.iter().map(|e| e.event_type.as_str()).collect(),
            payloads: events.iter().map(|e| e.payload.as_deref()).collect(),
            user_ids: events.iter().map(|e| e.user_id.as_deref()).collect(),
            created_at: events.iter().map(|e| e.created_at).collect(),
            changes: events.iter().map(|e| e.crdt_changes.as_slice()).collect(),
            regions: events.iter().map(|e| e.source_region.as_str()).collect(),
            lamports: events.iter().map(|e| e.lamport).collect(),
            seqs: events.iter().map(|e| e.run_seq).collect(),
            hashes: events.iter().map(|e| e.change_hash.as_slice()).collect(),
            kinds: events.iter().map(|e| e.kind.as_deref()).collect(),
            contents: events.iter().map(|e| e.content.as_deref()).collect(),
            epochs: events
                .iter()
                .map(|e| e.fence.as_ref().map(|f| f.epoch))
                .collect(),
        }
    }
}

/// At most this many bytes of changes go in one insert: each column's array is one value and
/// the statement one message, and PostgreSQL takes neither past 1 GB.
const CHUNK_BYTES: usize = 64 << 20;

/// `events` in order, in runs of at most [`CHUNK_BYTES`] of changes (at least one event each).
pub(super) fn chunks_by_bytes(events: &[NewEvent]) -> impl Iterator<Item = &[NewEvent]> {
    let mut rest = events;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let end = rest
            .iter()
            .position(|e| {
                bytes += e.crdt_changes.len() + e.content.as_ref().map_or(0, String::len);
                bytes > CHUNK_BYTES
            })
            .map_or(rest.len(), |i| i.max(1));
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

const APPEND_LOCK: &str = append_lock!();

/// The outbox rows of the events inserted (`ins`): one per webhook subscription whose filters
/// take the event.
const FILL_OUTBOX: &str = "INSERT INTO crdt_webhook_outbox \
    (subscription_id, event_id, run_id, attempts, next_attempt_at, state, created_at) \
    SELECT s.id, e.id, e.run_id, 0, clock.t, 'pending', clock.t \
    FROM ins e JOIN crdt_webhooks s \
    ON (s.runs IS NULL OR ',' || s.runs || ',' LIKE '%,' || replace(e.run_id::text, '-', '') || ',%') \
    AND (s.kinds IS NULL OR ',' || s.kinds || ',' LIKE '%,' || COALESCE(e.event_kind, 'other') || ',%') \
    CROSS JOIN clock \
    ON CONFLICT DO NOTHING";

const EVENT_COLUMNS: &str = "run_id, event_type, payload, user_id, created_at, crdt_changes, \
    source_region, lamport_timestamp, run_seq, change_hash, event_kind, event_content, owner_epoch";

// Each is cached by its own type (lifetimes made `'static`).
impl QueryId for TakeAppendLock {
    type QueryId = TakeAppendLock;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryId for CheckFences<'_> {
    type QueryId = CheckFences<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for CheckFences<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("SELECT run_id, member, epoch FROM crdt_run_owners WHERE run_id = ANY(");
        out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(self.runs)?;
        out.push_sql(") FOR SHARE");
        Ok(())
    }
}

impl Query for CheckFences<'_> {
    type SqlType = Untyped;
}

impl QueryId for AppendEvents<'_> {
    type QueryId = AppendEvents<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for TakeAppendLock {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(APPEND_LOCK);
        Ok(())
    }
}

impl QueryFragment<Pg> for AppendEvents<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Every part of one statement reads the database as it stood when the statement began,
        // and data-modifying parts always run to completion: the outbox reads the new rows
        // from the insert's RETURNING.
        out.push_sql("WITH ins AS (");
        self.events.walk_ast(out.reborrow())?;
        out.push_sql(" RETURNING id, run_id, event_kind), touched AS (");
        out.push_sql("INSERT INTO crdt_runs (run_id, last_activity) SELECT * FROM unnest(");
        out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.run_ids)?;
        out.push_sql("::uuid[], ");
        out.push_bind_param::<Array<Timestamp>, _>(&self.times)?;
        out.push_sql(
            "::timestamp[]) ON CONFLICT (run_id) DO UPDATE \
            SET last_activity = GREATEST(crdt_runs.last_activity, EXCLUDED.last_activity)), clock AS (SELECT ",
        );
        out.push_bind_param::<Timestamp, _>(&self.now)?;
        out.push_sql("::timestamp AS t), outbox AS (");
        out.push_sql(FILL_OUTBOX);
        out.push_sql(") SELECT COUNT(*) AS appended FROM ins");
        Ok(())
    }
}

impl Query for AppendEvents<'_> {
    type SqlType = Untyped;
}

impl QueryFragment<Pg> for InsertEvents<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("INSERT INTO collaboration_events (");
        out.push_sql(EVENT_COLUMNS);
        out.push_sql(") SELECT ");
        out.push_sql(EVENT_COLUMNS);
        out.push_sql(" FROM unnest(");
        out.push_bind_param::<Array<diesel::sql_types::Uuid>, _>(&self.run_ids)?;
        out.push_sql("::uuid[], ");
        out.push_bind_param::<Array<Text>, _>(&self.event_types)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.payloads)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.user_ids)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Timestamp>, _>(&self.created_at)?;
        out.push_sql("::timestamp[], ");
        out.push_bind_param::<Array<Binary>, _>(&self.changes)?;
        out.push_sql("::bytea[], ");
        out.push_bind_param::<Array<Text>, _>(&self.regions)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<BigInt>, _>(&self.lamports)?;
        out.push_sql("::int8[], ");
        out.push_bind_param::<Array<BigInt>, _>(&self.seqs)?;
        out.push_sql("::int8[], ");
        out.push_bind_param::<Array<Binary>, _>(&self.hashes)?;
        out.push_sql("::bytea[], ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.kinds)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.contents)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<Nullable<BigInt>>, _>(&self.epochs)?;
        // Ids are drawn in the order rows come, so the log's cursors follow the events' order.
        out.push_sql("::int8[]) WITH ORDINALITY AS e (");
        out.push_sql(EVENT_COLUMNS);
        out.push_sql(", ord) ORDER BY ord ON CONFLICT (run_id, change_hash) DO NOTHING");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(bytes: usize) -> NewEvent {
        NewEvent {
            crdt_changes: vec![0; bytes],
            ..crate::testing::event(Uuid::nil(), 1, false)
        }
    }

    #[test]
    fn chunks_keep_order_and_stay_under_the_bound() {
        let mb = 1 << 20;
        let events: Vec<NewEvent> = [30, 30, 10, 70, 1, 1, 63, 2]
            .iter()
            .map(|m| sized(m * mb))
            .collect();
        let sizes: Vec<Vec<usize>> = chunks_by_bytes(&events)
            .map(|c| c.iter().map(|e| e.crdt_changes.len() / mb).collect())
            .collect();
        // One event over the bound goes alone; the rest fill chunks in order.
        assert_eq!(
            sizes,
            vec![
                vec![30, 30],
                vec![10],
                vec![70],
                vec![1, 1],
                vec![63],
                vec![2]
            ]
        );
        assert_eq!(chunks_by_bytes(&[]).count(), 0);
        assert_eq!(
            chunks_by_bytes(&events[..3])
                .map(<[NewEvent]>::len)
                .sum::<usize>(),
            3
        );
    }
}

//! `RunActor`: owns one run's document and Lamport clock; every read and write is a message.
//!
//! A write is applied to the document at once (so the caller learns the new heads and later
//! writes build on it), then appended to the log through the run's [`WriteQueue`]: at most one
//! append in flight, later writes batched behind it, and the group committer merges appends of
//! many runs into one transaction. A caller is answered only after its events are committed.
//! If an append fails, every write not yet committed is refused; when the database is out of
//! reach the document returns to what the log holds, otherwise the actor stops and the next
//! request reloads the run from the durable log with a fresh actor id, so no unacknowledged
//! change lingers in memory.
//!
//! - `handlers`: the messages (the runtime's API, see `runs::api`);
//! - `lifecycle`: loading, idling out, failing; `warming`: answering from the snapshot's
//!   projection while the document loads;
//! - `write_queue`, `events`, `snapshot_schedule`: the durability pipeline as plain data;
//! - `snapshot_copy`: the document handed to the snapshot actor when it holds what is durable.

mod deletion;
mod events;
mod handlers;
mod lifecycle;
mod ops_rate;
mod snapshot_copy;
mod snapshot_schedule;
mod warming;
mod write_queue;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use automerge::Change;
use run_doc::{concat_changes, RunDoc};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::api::MutationOutcome;
use super::{Origin, RunChanged, RunError, Runs};
use crate::metrics::RunClock;
use events::EventMeta;
use snapshot_schedule::{Due, SnapshotSchedule};
use write_queue::{Batch, PendingWrite, WriteQueue};

pub(crate) use deletion::Decide;
pub(crate) use handlers::{Call, FinalSnapshot, Handover, SnapshotWritten};
pub(crate) use lifecycle::{Depose, Evict};
pub(crate) use snapshot_copy::{durable_snapshot, CopyAnswer, CopyForSnapshot, DurableCopy};

/// Client operation ids a run remembers, newest last.
const RECENT_OPS: usize = 4096;

type Reply = oneshot::Sender<Result<(), RunError>>;

pub struct RunActor {
    run_id: Uuid,
    incarnation: u64,
    runs: Runs,
    doc: Option<RunDoc>,
    failed: Option<String>,
    /// The last decision about the run's deletion, read before the run loads.
    tombstone: Option<super::Tombstone>,
    writes: WriteQueue<Reply>,
    snapshots: SnapshotSchedule,
    /// Whether this incarnation has written anything (else it unloads soon after use).
    written: bool,
    last_active: Instant,
    /// This run's clock series, once asked for: `None` inside when the node shows its most.
    gauge: Option<Option<RunClock>>,
    /// Outcomes of recent client operations, by (user, op id); `recent_order` ages them out.
    recent_ops: HashMap<(Option<String>, String), MutationOutcome>,
    recent_order: VecDeque<(Option<String>, String)>,
    /// Stored changes that did not apply at load: no snapshot may cover (and so hide) them.
    unreadable: usize,
    /// Operations of this run counted in the registry's memory budget.
    ops_counted: u64,
    /// Set while the document loads and the snapshot's projection answers reads.
    warming: Option<warming::Warming>,
    /// How fast clients and services may grow this run.
    rate: ops_rate::OpsRate,
    /// The state last read, with the heads and clock it was read at: a run read far more
    /// often than written (every browser room, every poll) builds it once per change.
    read: Option<(Vec<automerge::ChangeHash>, u64, Arc<run_doc::SharedState>)>,
    /// On a database pods share: this actor's claim on the run, carried by its writes.
    fence: Option<run_store::Fence>,
    /// Another pod of the region holds the run: nothing is loaded, every request is told so.
    elsewhere: Option<run_store::Owner>,
    /// The snapshot actor's request for a copy of the document, answered once it holds only
    /// what is durable.
    copy_wanted: Option<snapshot_copy::CopyWanted>,
    /// A copy for it taken while writes were on their way to the log, until they commit.
    copy_pending: Option<snapshot_copy::PendingCopy>,
    /// Copy requests so far (numbers them).
    copy_asks: u64,
}

impl RunActor {
    pub(super) fn new(run_id: Uuid, incarnation: u64, runs: Runs) -> Self {
        let config = &runs.inner.config;
        let snapshots =
            SnapshotSchedule::new(config.snapshot_every, config.snapshot_min_interval, 0);
        RunActor {
            run_id,
            incarnation,
            doc: None,
            failed: None,
            tombstone: None,
            writes: WriteQueue::new(0, (Vec::new(), 0)),
            snapshots,
            written: false,
            last_active: Instant::now(),
            gauge: None,
            recent_ops: HashMap::new(),
            recent_order: VecDeque::new(),
            unreadable: 0,
            ops_counted: 0,
            warming: None,
            rate: ops_rate::OpsRate::new(
                config.max_run_ops_per_sec,
                config.max_run_ops_per_sec.max(run_doc::MAX_OPS_PER_REQUEST),
                Instant::now(),
            ),
            read: None,
            fence: None,
            elsewhere: None,
            copy_wanted: None,
            copy_pending: None,
            copy_asks: 0,
            runs,
        }
    }

    /// The run's state now, built once per change of heads or clock.
    fn current_state(&mut self) -> Result<Arc<run_doc::SharedState>, RunError> {
        let doc = self.doc()?;
        let (heads, lamport) = (doc.heads(), doc.lamport());
        if let Some((h, l, state)) = &self.read {
            if *h == heads && *l == lamport {
                return Ok(state.clone());
            }
        }
        let state = Arc::new(run_doc::SharedState::new(self.doc()?.state()));
        self.read = Some((heads, lamport, state.clone()));
        Ok(state)
    }

    /// Brings the registry's count of loaded operations up to date with this run's.
    fn count_ops(&mut self) {
        let now = self.doc.as_ref().map_or(0, |d| d.size().0);
        self.runs.count_ops(self.ops_counted, now);
        self.ops_counted = now;
    }

    fn remember_op(&mut self, key: (Option<String>, String), outcome: &MutationOutcome) {
        if self.recent_order.len() >= RECENT_OPS {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent_ops.remove(&old);
            }
        }
        self.recent_order.push_back(key.clone());
        self.recent_ops.insert(key, outcome.clone());
    }

    fn doc(&mut self) -> Result<&mut RunDoc, RunError> {
        self.last_active = Instant::now();
        if let Some(owner) = &self.elsewhere {
            return Err(RunError::Elsewhere(owner.clone()));
        }
        if let Some(t) = self.tombstone.as_ref().filter(|t| t.deleted) {
            return Err(RunError::Deleted(t.clone()));
        }
        if let Some(reason) = &self.failed {
            return Err(RunError::Unavailable(reason.clone()));
        }
        self.doc
            .as_mut()
            .ok_or_else(|| RunError::Unavailable("run not loaded".into()))
    }

    /// Logs and counts what changes from elsewhere broke of the run schema. Nodes shape their
    /// own (stamped) changes; only unstamped ones, from foreign clients, are checked.
    fn report_schema(&mut self, applied: &[Change], from: &str) {
        let foreign: Vec<Change> = applied
            .iter()
            .filter(|c| run_doc::Stamp::of(c).is_none())
            .cloned()
            .collect();
        if foreign.is_empty() {
            return;
        }
        let Some(doc) = self.doc.as_ref() else { return };
        let problems = doc.schema_violations(&foreign);
        if !problems.is_empty() {
            self.runs
                .inner
                .metrics
                .schema_violations
                .inc_by(problems.len() as u64);
            log::warn!(
                "run {}: changes from {from} break the run schema (kept; the run reads as invalid): {}",
                self.run_id,
                problems.join("; ")
            );
        }
    }

    /// Whether a client's or service's changes may be taken now (see `ops_rate`).
    fn within_rate(&mut self) -> Result<(), RunError> {
        self.rate.check(Instant::now()).map_err(|wait| {
            RunError::Busy(format!(
                "run {} takes at most {} operations a second from clients; try again in {} ms",
                self.run_id,
                self.rate.per_sec(),
                wait.as_millis().max(1)
            ))
        })
    }

    /// Charges what a client's or service's request added to the run.
    fn charge_rate<'a>(&mut self, changes: impl IntoIterator<Item = &'a Change>) {
        let ops = changes.into_iter().map(|c| c.len() as u64).sum();
        self.rate.charge(ops, Instant::now());
    }

    fn lamport_gauge(&mut self, lamport: u64) {
        let run_id = self.run_id;
        let metrics = &self.runs.inner.metrics;
        // Looked up once per load: a label lookup hashes and allocates on every commit otherwise.
        let series = self
            .gauge
            .get_or_insert_with(|| metrics.run_clock(&run_id.to_string()));
        if let Some(series) = series {
            series.gauge.set(i64::try_from(lamport).unwrap_or(i64::MAX));
        }
    }

    /// Queues `changes` for the log and returns the receiver that resolves once they commit.
    /// With no changes it is a barrier: it resolves once everything queued before it has
    /// committed (at once if nothing is), so a reply never reports state that is not durable.
    fn enqueue(
        &mut self,
        changes: Vec<Change>,
        meta: EventMeta,
        origin: Origin,
        ctx: &mut Context<Self>,
    ) -> oneshot::Receiver<Result<(), RunError>> {
        let (reply, done) = oneshot::channel();
        if changes.is_empty() && self.writes.is_idle() {
            let _ = reply.send(Ok(()));
            return done;
        }
        if !changes.is_empty() {
            // Until these are durable the run's digest is not known.
            self.runs.set_digest(self.run_id, None);
            self.written = true;
            self.count_ops();
        }
        let region = match &origin {
            Origin::Local => self.runs.inner.config.region.clone(),
            Origin::Remote { source_region, .. } => source_region.clone(),
            Origin::Pod => self.runs.inner.config.region.clone(),
        };
        let (heads_after, lamport_after) = match self.doc.as_mut() {
            Some(d) => (d.heads(), d.lamport()),
            None => self.writes.durable().clone(),
        };
        let writes = &mut self.writes;
        let mut doc = self.doc.as_mut();
        let mut events = events::rows(
            self.run_id,
            &changes,
            &meta,
            &region,
            lamport_after,
            || writes.next_seq(),
            |change| doc.as_mut().map(|d| d.describe(change)),
        );
        if let Some(fence) = &self.fence {
            for e in &mut events {
                e.fence = Some(fence.clone());
            }
        }
        let start = self.writes.push(PendingWrite {
            events,
            changes,
            origin,
            reply,
            heads_after,
            lamport_after,
        });
        if start {
            self.flush(ctx);
        }
        done
    }

    /// Hands the waiting writes to the log as one append, unless one is in flight.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let Some(mut batch) = self.writes.take_batch() else {
            return;
        };
        let events = std::mem::take(&mut batch.events);
        let committer = self.runs.inner.committer.clone();
        ctx.spawn(
            async move { committer.append(events).await }
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(()) => {
                        act.on_committed(batch, ctx);
                        match act.failed.clone() {
                            // Failed while this append was in flight: stop now.
                            Some(reason) => act.fail(reason, None, ctx),
                            None => act.flush(ctx),
                        }
                    }
                    // Another pod of the region owns the run now: nothing of this was stored.
                    Err(e) if matches!(*e, run_store::StoreError::Fenced(_)) => {
                        act.deposed(batch, ctx)
                    }
                    // Out of reach: refuse what was not stored, keep serving what was.
                    Err(e) if !e.is_refusal() && act.failed.is_none() => {
                        act.runs.store_unavailable(&e);
                        act.roll_back(format!("database unavailable: {e}"), batch, ctx)
                    }
                    Err(e) => act.fail(
                        format!("the event log refused a write: {e}"),
                        Some(batch),
                        ctx,
                    ),
                }),
        );
    }

    /// Answers the committed writes and publishes their changes.
    fn on_committed(&mut self, batch: Batch<Reply>, ctx: &mut Context<Self>) {
        let writes = self.writes.committed(batch);
        let lamport = self.doc.as_ref().map_or(0, |d| d.lamport());
        self.lamport_gauge(lamport);
        let subscribed = self.runs.has_subscribers(self.run_id);
        if writes.iter().any(|w| !w.changes.is_empty()) {
            self.runs.inner.changes.wake();
        }
        for write in writes {
            let _ = write.reply.send(Ok(()));
            if write.changes.is_empty() || !subscribed {
                continue;
            }
            self.runs.publish(RunChanged {
                run_id: self.run_id,
                changes: Arc::new(concat_changes(&write.changes)),
                heads: write.heads_after,
                lamport,
                origin: write.origin,
            });
        }
        self.report_event_count(ctx);
        self.record_digest();
        self.answer_copy(false);
    }

    /// Records the heads digest when the document holds exactly what is durable; while writes
    /// wait for the log it is unknown.
    fn record_digest(&mut self) {
        // A run never written has nothing to compare (and reads of unknown ids must not fill
        // memory with digests).
        let settled = self.writes.is_idle() && self.failed.is_none() && self.writes.last_seq() > 0;
        let digest = match (&mut self.doc, settled) {
            (Some(doc), true) => Some(doc.heads_digest()),
            _ => None,
        };
        self.runs.set_digest(self.run_id, digest);
    }

    /// Tells the snapshot actor how many events are logged since the last snapshot, when the
    /// schedule says so.
    fn report_event_count(&mut self, ctx: &mut Context<Self>) {
        match self
            .snapshots
            .check(self.writes.committed_seq(), Instant::now())
        {
            Due::Nothing => {}
            Due::Later(wait) => {
                ctx.run_later(wait, |act, ctx| {
                    act.snapshots.woke();
                    act.report_event_count(ctx);
                });
            }
            Due::Now(since_snapshot) => {
                self.runs
                    .inner
                    .snapshots
                    .do_send(super::snapshot_actor::EventCount {
                        run_id: self.run_id,
                        since_snapshot,
                        run: ctx.address(),
                    })
            }
        }
    }

    /// Answers with `answer` once everything it may reflect is durable: at once when nothing is
    /// in flight, else after the writes queued so far commit, or with their error.
    fn once_durable<T: Send + 'static>(
        &mut self,
        answer: Result<T, RunError>,
        ctx: &mut Context<Self>,
    ) -> ResponseFuture<Result<T, RunError>> {
        let answer = match answer {
            Ok(a) => a,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let done = self.enqueue(Vec::new(), EventMeta::default(), Origin::Local, ctx);
        Box::pin(async move {
            done.await.map_err(|_| RunError::Stopped)??;
            Ok(answer)
        })
    }
}

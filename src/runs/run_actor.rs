//! `RunActor`: owns one run's document and Lamport clock; every read and write is a message.
//!
//! A write is applied to the document at once (so the caller learns the new heads and later
//! writes build on it), then appended to the log. Each actor keeps at most one append in
//! flight, so its log stays in order; writes arriving meanwhile wait and go together in the
//! next append, and the group committer merges appends of many runs into one transaction. A
//! caller is answered only after its events are committed. If an append fails, every write not
//! yet committed is refused and the actor stops: the next request reloads the run from the
//! durable log with a fresh actor id, so no unacknowledged change lingers in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use automerge::{sync, Change, ChangeHash};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{loader, Origin, RunChanged, RunError, Runs};
use crate::metrics::RunClock;
use run_doc::{concat_changes, DocError, Graft, Mutation, RunDoc, RunState};
use run_store::{NewEvent, Snapshot};

/// A local mutation, with the user to record in the log.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<MutationOutcome, RunError>")]
pub struct Mutate {
    pub mutation: Mutation,
    pub user: Option<String>,
    /// A client's id for this operation: a repeat of an id this run recently applied (a client
    /// re-sending what it never saw acknowledged) is answered with the first outcome instead
    /// of being applied again over what others did since.
    pub op_id: Option<String>,
}

/// Client operation ids a run remembers, newest last.
const RECENT_OPS: usize = 4096;

#[derive(Debug, Clone)]
pub struct MutationOutcome {
    /// False when the mutation changed nothing (so nothing was written).
    pub changed: bool,
    pub graft: Option<Graft>,
    pub lamport: u64,
    pub heads: Vec<String>,
}

/// Changes from another replica (HTTP sync, the mesh).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<SyncOutcome, RunError>")]
pub struct ApplySync {
    pub changes: Vec<Change>,
    pub source_region: String,
    pub lamport: Option<u64>,
    /// The peer node that delivered them, when they came over the mesh. Changes from a peer
    /// that arrive ahead of their dependencies are held back rather than refused.
    pub via: Option<String>,
}

/// One step of Automerge's sync protocol with a mesh peer. The peer session owns `state`
/// (one per run per link) and gets it back with the reply to send.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<PeerSyncReply, RunError>")]
pub struct PeerSync {
    pub state: Box<sync::State>,
    pub incoming: Option<sync::Message>,
    pub source_region: String,
    pub via: String,
    /// Set when the peer is a foreign Automerge client (automerge-repo) rather than a node:
    /// its peer id, recorded as the events' user.
    pub client: Option<String>,
}

#[derive(Debug)]
pub struct PeerSyncReply {
    pub state: Box<sync::State>,
    pub outgoing: Option<sync::Message>,
    pub applied: usize,
    pub lamport: u64,
    /// Why the incoming message was not (wholly) taken; what was applied before it is logged.
    pub error: Option<String>,
    /// Set when the incoming message was refused as bad bytes rather than as a change the run
    /// cannot take.
    pub bad_input: Option<BadInput>,
    /// Which incarnation of the run's actor answered: a new one lost what the old held back.
    pub incarnation: u64,
    /// Whether the run has anything stored (else it exists only as its genesis, here).
    pub stored: bool,
}

/// Why a peer's sync message was refused as input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadInput {
    /// It would cost more than one message may (see `doc::Budget`).
    TooLarge,
    /// Its bytes are not what they claim (not Automerge, truncated, an unaccepted chunk).
    Malformed,
}

/// The whole document (`save()`) and the clock, for a peer that lacks the run.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(Vec<u8>, u64), RunError>")]
pub struct FullState;

#[derive(Debug, Clone)]
pub struct SyncOutcome {
    pub applied: usize,
    pub duplicates: usize,
    /// Changes held back for missing dependencies (mesh only).
    pub parked: usize,
    pub lamport: u64,
    pub heads: Vec<String>,
}

#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<RunState, RunError>")]
pub struct GetState;

/// Every change the holder of `heads` lacks, concatenated.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<(Vec<u8>, usize, Vec<String>), RunError>")]
pub struct GetChanges {
    pub heads: Vec<ChangeHash>,
}

/// The node is stopping: once every write queued so far has committed, answer with a snapshot
/// of the run if the log holds events the newest snapshot does not cover.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Option<Snapshot>")]
pub struct FinalSnapshot;

/// Tells the actor a snapshot covering the log up to `event_count` is stored.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SnapshotWritten {
    pub event_count: i64,
}

type Reply = oneshot::Sender<Result<(), RunError>>;

/// What the log records beside a change: the kind of event, a JSON description, the user.
#[derive(Default)]
struct EventMeta {
    event_type: &'static str,
    payload: Option<String>,
    user_id: Option<String>,
}

/// How long a run this incarnation has not written stays loaded after its last read.
const UNWRITTEN_LINGER: Duration = Duration::from_secs(5);

struct PendingWrite {
    events: Vec<NewEvent>,
    changes: Vec<Change>,
    origin: Origin,
    reply: Reply,
    /// The document's heads and clock with this write applied: durable once it commits.
    heads_after: Vec<ChangeHash>,
    lamport_after: u64,
}

pub struct RunActor {
    run_id: Uuid,
    incarnation: u64,
    runs: Runs,
    doc: Option<RunDoc>,
    failed: Option<String>,
    /// `run_seq` of the last event handed to the log (committed or in flight).
    last_seq: i64,
    committed_seq: i64,
    snapshot_seq: i64,
    /// When the last snapshot was asked for, and whether a delayed ask is scheduled.
    last_snapshot_at: Option<Instant>,
    snapshot_timer: bool,
    pending: Vec<PendingWrite>,
    in_flight: bool,
    /// Whether this incarnation has written anything (else it unloads soon after use).
    written: bool,
    last_active: Instant,
    /// This run's clock series, once asked for: `None` inside when the node shows its most.
    gauge: Option<Option<RunClock>>,
    /// Outcomes of recent client operations, by (user, op id); `recent_order` ages them out.
    recent_ops: HashMap<(Option<String>, String), MutationOutcome>,
    recent_order: VecDeque<(Option<String>, String)>,
    /// Heads and clock of what the log holds: where the document returns if a write fails
    /// because the database is out of reach.
    durable: (Vec<ChangeHash>, u64),
    /// Stored changes that did not apply at load: no snapshot may cover (and so hide) them.
    unreadable: usize,
}

impl RunActor {
    pub(super) fn new(run_id: Uuid, incarnation: u64, runs: Runs) -> Self {
        RunActor {
            run_id,
            incarnation,
            runs,
            doc: None,
            failed: None,
            last_seq: 0,
            committed_seq: 0,
            last_snapshot_at: None,
            snapshot_timer: false,
            snapshot_seq: 0,
            pending: Vec::new(),
            in_flight: false,
            written: false,
            last_active: Instant::now(),
            gauge: None,
            recent_ops: HashMap::new(),
            recent_order: VecDeque::new(),
            durable: (Vec::new(), 0),
            unreadable: 0,
        }
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
        if changes.is_empty() && !self.in_flight && self.pending.is_empty() {
            let _ = reply.send(Ok(()));
            return done;
        }
        if !changes.is_empty() {
            // Until these are durable the run's digest is not known.
            self.runs.set_digest(self.run_id, None);
            self.written = true;
        }
        // The clock after the write, so a restart resumes it exactly (a sync's timestamp hint
        // may be above every change's own stamp).
        let lamport =
            i64::try_from(self.doc.as_ref().map_or(0, |d| d.lamport())).unwrap_or(i64::MAX);
        let region = match &origin {
            Origin::Local => self.runs.inner.config.region.clone(),
            Origin::Remote { source_region, .. } => source_region.clone(),
        };
        // Microseconds, as PostgreSQL keeps them, so the runs list's cursor is exact on SQLite.
        let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now().naive_utc(), 6);
        let events = changes
            .iter()
            .map(|change| {
                self.last_seq += 1;
                NewEvent {
                    run_id: self.run_id,
                    run_seq: self.last_seq,
                    event_type: meta.event_type.to_string(),
                    payload: meta.payload.clone(),
                    user_id: meta.user_id.clone(),
                    created_at: now,
                    crdt_changes: change.raw_bytes().to_vec(),
                    change_hash: change.hash().as_ref().to_vec(),
                    source_region: run_doc::Stamp::of(change).map_or(region.clone(), |s| s.region),
                    lamport,
                }
            })
            .collect();
        let (heads_after, lamport_after) = match self.doc.as_mut() {
            Some(d) => (d.heads(), d.lamport()),
            None => (self.durable.0.clone(), self.durable.1),
        };
        self.pending.push(PendingWrite {
            events,
            changes,
            origin,
            reply,
            heads_after,
            lamport_after,
        });
        if !self.in_flight {
            self.flush(ctx);
        }
        done
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.pending.is_empty() {
            return;
        }
        self.in_flight = true;
        let mut batch = std::mem::take(&mut self.pending);
        // The events move to the committer; the writes keep their changes to publish.
        let events: Vec<NewEvent> = batch
            .iter_mut()
            .flat_map(|w| std::mem::take(&mut w.events))
            .collect();
        let last = events.last().map_or(self.committed_seq, |e| e.run_seq);
        let committer = self.runs.inner.committer.clone();
        ctx.spawn(
            async move { committer.append(events).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.in_flight = false;
                    match result {
                        Ok(()) => {
                            act.committed_seq = last;
                            act.on_committed(batch, ctx);
                            match act.failed.clone() {
                                // Failed while this append was in flight: stop now.
                                Some(reason) => act.fail(reason, Vec::new(), ctx),
                                None => act.flush(ctx),
                            }
                        }
                        // Out of reach: refuse what was not stored, keep serving what was.
                        Err(e) if !e.is_refusal() && act.failed.is_none() => {
                            act.runs.store_unavailable(&e);
                            act.roll_back(format!("database unavailable: {e}"), batch, ctx)
                        }
                        Err(e) => {
                            act.fail(format!("the event log refused a write: {e}"), batch, ctx)
                        }
                    }
                }),
        );
    }

    fn on_committed(&mut self, batch: Vec<PendingWrite>, ctx: &mut Context<Self>) {
        if let Some(last) = batch.last() {
            self.durable = (last.heads_after.clone(), last.lamport_after);
        }
        let lamport = self.doc.as_ref().map_or(0, |d| d.lamport());
        self.lamport_gauge(lamport);
        let subscribed = self.runs.has_subscribers();
        for write in batch {
            let _ = write.reply.send(Ok(()));
            if write.changes.is_empty() || !subscribed {
                continue;
            }
            self.runs.publish(RunChanged {
                run_id: self.run_id,
                changes: Arc::new(concat_changes(&write.changes)),
                lamport,
                origin: write.origin,
            });
        }
        self.report_event_count(ctx);
        self.record_digest();
    }

    /// Records the heads digest when the document holds exactly what is durable; while writes
    /// wait for the log it is unknown.
    fn record_digest(&mut self) {
        // A run never written has nothing to compare (and reads of unknown ids must not fill
        // memory with digests).
        let settled = self.pending.is_empty()
            && !self.in_flight
            && self.failed.is_none()
            && self.last_seq > 0;
        let digest = match (&mut self.doc, settled) {
            (Some(doc), true) => Some(doc.heads_digest()),
            _ => None,
        };
        self.runs.set_digest(self.run_id, digest);
    }

    /// Tells the snapshot actor how many events are logged since the last snapshot.
    /// A hot run is snapshotted at most once per `snapshot_min_interval`: a full snapshot costs
    /// time in proportion to the whole run, and more often than that buys little recovery.
    fn report_event_count(&mut self, ctx: &mut Context<Self>) {
        let config = &self.runs.inner.config;
        let since_snapshot = self.committed_seq - self.snapshot_seq;
        if since_snapshot < config.snapshot_every as i64 || self.snapshot_timer {
            return;
        }
        let wait = self.last_snapshot_at.map_or(Duration::ZERO, |t| {
            config.snapshot_min_interval.saturating_sub(t.elapsed())
        });
        if !wait.is_zero() {
            self.snapshot_timer = true;
            ctx.run_later(wait, |act, ctx| {
                act.snapshot_timer = false;
                act.report_event_count(ctx);
            });
            return;
        }
        self.last_snapshot_at = Some(Instant::now());
        self.runs
            .inner
            .snapshots
            .do_send(super::snapshot_actor::EventCount {
                run_id: self.run_id,
                since_snapshot,
                run: ctx.address(),
            });
    }

    /// A run loaded only to be read holds nothing that is not in storage: reads of unknown run
    /// ids, and a mesh catch-up that visits every run, must not fill memory for the whole idle
    /// timeout, so such a run is unloaded soon after its last use. A written run stays for
    /// the idle timeout.
    fn unload_if_unwritten(&mut self, ctx: &mut Context<Self>) {
        let linger = UNWRITTEN_LINGER.min(self.runs.inner.config.idle_timeout);
        ctx.run_later(linger, move |act, ctx| {
            // Parked changes exist only here; the peers that sent them count them as sent.
            let parked = act.doc.as_ref().is_some_and(RunDoc::has_parked);
            if act.written || act.in_flight || !act.pending.is_empty() || parked {
                return;
            }
            if act.last_active.elapsed() >= linger {
                act.runs.forget(act.run_id, act.incarnation);
                ctx.stop();
            } else {
                act.unload_if_unwritten(ctx);
            }
        });
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

    /// Runs `f` on the document, turning a panic inside Automerge on input from elsewhere into
    /// an error instead of the death of this arbiter's thread and every run on it. The
    /// document may be half-changed, so the run is unloaded and reloads from its log.
    fn guarded<T>(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut RunDoc) -> Result<T, RunError>,
    ) -> Result<T, RunError> {
        let doc = self.doc()?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(doc))) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let reason = format!("Automerge failed on changes from elsewhere: {what}");
                if self.in_flight {
                    // The append in flight may still commit: let it answer and publish
                    // first; the actor stops when it completes.
                    log::error!("run {}: {reason}; unloading it", self.run_id);
                    self.failed = Some(reason.clone());
                    self.doc = None;
                    self.runs.set_digest(self.run_id, None);
                } else {
                    self.fail(reason.clone(), Vec::new(), ctx);
                }
                Err(RunError::Unavailable(reason))
            }
        }
    }

    /// The database is out of reach: refuses every uncommitted write (nothing of them was
    /// acknowledged) and returns the document to what the log holds, under a fresh actor id, so
    /// reads go on serving durable state. Writes resume when the database answers again.
    fn roll_back(&mut self, reason: String, batch: Vec<PendingWrite>, ctx: &mut Context<Self>) {
        let (heads, lamport) = self.durable.clone();
        let rolled = self.doc.as_mut().map(|d| d.rolled_back(&heads, lamport));
        match rolled {
            Some(Ok(doc)) => {
                log::warn!(
                    "run {}: {reason}; writes refused until it returns",
                    self.run_id
                );
                for write in batch.into_iter().chain(std::mem::take(&mut self.pending)) {
                    let _ = write.reply.send(Err(RunError::Unavailable(reason.clone())));
                }
                self.doc = Some(doc);
                self.last_seq = self.committed_seq;
                // Acknowledged operations stay remembered; the refused ones were never done.
                self.recent_ops
                    .retain(|_, outcome| outcome.lamport <= lamport);
                let ops = &self.recent_ops;
                self.recent_order.retain(|k| ops.contains_key(k));
                self.record_digest();
            }
            _ => self.fail(reason, batch, ctx),
        }
    }

    /// Refuses every uncommitted write and stops; see the module comment.
    fn fail(&mut self, reason: String, batch: Vec<PendingWrite>, ctx: &mut Context<Self>) {
        log::error!("run {}: {reason}; unloading it", self.run_id);
        for write in batch.into_iter().chain(std::mem::take(&mut self.pending)) {
            let _ = write.reply.send(Err(RunError::Unavailable(reason.clone())));
        }
        self.failed = Some(reason);
        self.doc = None;
        self.runs.set_digest(self.run_id, None);
        self.runs.forget(self.run_id, self.incarnation);
        ctx.stop();
    }
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.runs.inner.metrics.runs_loaded.inc();
        let store = self.runs.inner.store.clone();
        let region = self.runs.inner.config.region.clone();
        let run_id = self.run_id;
        // `wait` holds every message until the run is loaded.
        ctx.wait(
            async move { loader::load(store.as_ref(), run_id, &region).await }
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok(loaded) => {
                        act.unreadable = loaded.unreadable;
                        let skipped = loaded.legacy_skipped as u64;
                        act.runs.inner.metrics.legacy_skipped.inc_by(skipped);
                        act.last_seq = loaded.last_seq;
                        act.committed_seq = loaded.last_seq;
                        act.snapshot_seq = loaded.snapshot_seq;
                        let mut doc = loaded.doc;
                        act.durable = (doc.heads(), doc.lamport());
                        act.lamport_gauge(doc.lamport());
                        act.doc = Some(doc);
                        act.record_digest();
                        act.report_event_count(ctx);
                        act.unload_if_unwritten(ctx);
                    }
                    Err(e) => {
                        let reason = format!("loading the run failed: {e}");
                        log::warn!("run {}: {reason}", act.run_id);
                        act.failed = Some(reason);
                        // Queued messages are answered with the error; new requests start afresh.
                        act.runs.forget(act.run_id, act.incarnation);
                        ctx.run_later(Duration::from_millis(100), |_, ctx| ctx.stop());
                    }
                }),
        );
        let idle = self.runs.inner.config.idle_timeout;
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        ctx.run_interval(tick, move |act, ctx| {
            if act.last_active.elapsed() >= idle && act.pending.is_empty() && !act.in_flight {
                act.runs.forget(act.run_id, act.incarnation);
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.runs.forget(self.run_id, self.incarnation);
        let metrics = &self.runs.inner.metrics;
        metrics.runs_loaded.dec();
        // A newer incarnation may already be serving the run; its series stays.
        let had_series = matches!(self.gauge.take(), Some(Some(_)));
        if had_series && !self.runs.is_loaded(self.run_id) {
            let _ = metrics
                .lamport_clock
                .remove_label_values(&[&self.run_id.to_string()]);
        }
    }
}

fn log_payload(mutation: &Mutation) -> String {
    use serde_json::json;
    let value = match mutation {
        Mutation::Graft {
            id,
            agent,
            after_step,
            user,
            ..
        } => {
            json!({"id": id, "agent": agent, "afterStep": after_step, "user": user})
        }
        Mutation::Prune { step_id, user } => json!({"stepId": step_id, "user": user}),
        Mutation::Unprune { step_id } => json!({"stepId": step_id}),
        Mutation::SetFlag { key, value } => json!({"key": key, "value": value}),
        Mutation::DeleteFlag { key } => json!({"key": key}),
    };
    value.to_string()
}

impl Handler<Mutate> for RunActor {
    type Result = ResponseFuture<Result<MutationOutcome, RunError>>;

    fn handle(&mut self, msg: Mutate, ctx: &mut Self::Context) -> Self::Result {
        let usable = self.doc().map(|_| ());
        if let Err(e) = usable.and_then(|()| self.runs.check_store()) {
            return Box::pin(async move { Err(e) });
        }
        let op_key = msg.op_id.clone().map(|id| (msg.user.clone(), id));
        if let Some(seen) = op_key.as_ref().and_then(|k| self.recent_ops.get(k)) {
            // Already applied (its write may still be in flight): the same answer, once durable.
            let seen = seen.clone();
            return self.once_durable(Ok(seen), ctx);
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let applied = match self
            .doc()
            .and_then(|d| d.apply(&msg.mutation, now_ms).map_err(RunError::from))
        {
            Ok(a) => a,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let heads: Vec<String> = self
            .doc()
            .map(|d| d.heads().iter().map(|h| h.to_string()).collect())
            .unwrap_or_default();
        let outcome = MutationOutcome {
            changed: applied.change.is_some(),
            graft: applied.graft,
            lamport: applied.lamport,
            heads,
        };
        if let Some(key) = op_key {
            self.remember_op(key, &outcome);
        }
        let Some(change) = applied.change else {
            // Nothing new to write, but the state it reports must be durable first.
            return self.once_durable(Ok(outcome), ctx);
        };
        let done = self.enqueue(
            vec![change],
            EventMeta {
                event_type: msg.mutation.event_type(),
                payload: Some(log_payload(&msg.mutation)),
                user_id: msg.user,
            },
            Origin::Local,
            ctx,
        );
        Box::pin(async move {
            done.await.map_err(|_| RunError::Stopped)??;
            Ok(outcome)
        })
    }
}

impl Handler<ApplySync> for RunActor {
    type Result = ResponseFuture<Result<SyncOutcome, RunError>>;

    fn handle(&mut self, msg: ApplySync, ctx: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.runs.check_store() {
            return Box::pin(async move { Err(e) });
        }
        let total = msg.changes.len();
        let result = self.guarded(ctx, |d| {
            let out = if msg.via.is_some() {
                d.apply_remote_parking(msg.changes, msg.lamport)?
            } else {
                d.apply_remote(msg.changes, msg.lamport)?
            };
            let heads = d.heads().iter().map(|h| h.to_string()).collect::<Vec<_>>();
            Ok((out, d.lamport(), heads))
        });
        let (out, lamport, heads) = match result {
            Ok(r) => r,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        self.lamport_gauge(lamport);
        self.report_schema(&out.applied, &msg.source_region);
        let outcome = SyncOutcome {
            applied: out.applied.len(),
            duplicates: out.duplicates,
            parked: out.parked,
            lamport,
            heads,
        };
        let error = out.error.map(|reason| RunError::PartiallyApplied {
            applied: out.applied.len(),
            total,
            reason: Box::new(reason),
        });
        // With nothing new this is a barrier: duplicates of changes still in flight are
        // answered only once those are durable.
        let done = self.enqueue(
            out.applied,
            EventMeta {
                event_type: "CRDT_SYNC",
                ..EventMeta::default()
            },
            Origin::Remote {
                source_region: msg.source_region,
                via: msg.via,
            },
            ctx,
        );
        Box::pin(async move {
            done.await.map_err(|_| RunError::Stopped)??;
            error.map_or(Ok(outcome), Err)
        })
    }
}

impl Handler<GetState> for RunActor {
    type Result = ResponseFuture<Result<RunState, RunError>>;

    fn handle(&mut self, _: GetState, ctx: &mut Self::Context) -> Self::Result {
        let state = self.doc().map(|d| d.state());
        self.once_durable(state, ctx)
    }
}

impl Handler<GetChanges> for RunActor {
    type Result = ResponseFuture<Result<(Vec<u8>, usize, Vec<String>), RunError>>;

    fn handle(&mut self, msg: GetChanges, ctx: &mut Self::Context) -> Self::Result {
        let answer = self.doc().map(|doc| {
            let changes = doc.changes_since(&msg.heads);
            let heads = doc.heads().iter().map(|h| h.to_string()).collect();
            (concat_changes(&changes), changes.len(), heads)
        });
        // Never hand another replica a change that may yet be refused.
        self.once_durable(answer, ctx)
    }
}

impl Handler<FinalSnapshot> for RunActor {
    type Result = ResponseActFuture<Self, Option<Snapshot>>;

    fn handle(&mut self, _: FinalSnapshot, ctx: &mut Self::Context) -> Self::Result {
        let drained = self.enqueue(Vec::new(), EventMeta::default(), Origin::Local, ctx);
        Box::pin(drained.into_actor(self).map(|drained, act, _| {
            // Only what is durable: nothing queued, nothing failed.
            let settled = matches!(drained, Ok(Ok(())))
                && act.pending.is_empty()
                && !act.in_flight
                && act.failed.is_none()
                && act.unreadable == 0;
            if !settled || act.committed_seq <= act.snapshot_seq {
                return None;
            }
            let doc = act.doc.as_mut()?;
            Some(Snapshot {
                id: Uuid::new_v4(),
                run_id: act.run_id,
                lamport: i64::try_from(doc.lamport()).unwrap_or(i64::MAX),
                region: act.runs.inner.config.region.clone(),
                created_at: chrono::Utc::now().naive_utc(),
                event_count: i32::try_from(act.committed_seq).unwrap_or(i32::MAX),
                data: doc.save(),
            })
        }))
    }
}

impl Handler<SnapshotWritten> for RunActor {
    type Result = ();

    fn handle(&mut self, msg: SnapshotWritten, ctx: &mut Self::Context) {
        self.snapshot_seq = self.snapshot_seq.max(msg.event_count);
        // Events committed while that snapshot was written may already be due another one.
        self.report_event_count(ctx);
    }
}

impl Handler<PeerSync> for RunActor {
    type Result = ResponseFuture<Result<PeerSyncReply, RunError>>;

    fn handle(&mut self, msg: PeerSync, ctx: &mut Self::Context) -> Self::Result {
        // Changes cannot be stored now: refuse them at once (the peer retries); a step that
        // carries none may still answer.
        let carries_changes = msg.incoming.as_ref().is_some_and(|m| !m.changes.is_empty());
        if carries_changes {
            if let Err(e) = self.runs.check_store() {
                return Box::pin(async move { Err(e) });
            }
        }
        let mut state = msg.state;
        let result = self.guarded(ctx, |d| {
            let step = d.sync_step(&mut state, msg.incoming);
            Ok((step, d.lamport()))
        });
        let (mut step, lamport) = match result {
            Ok(r) => r,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        self.lamport_gauge(lamport);
        self.report_schema(
            &step.applied.applied,
            msg.client.as_deref().unwrap_or(&msg.via),
        );
        let bad_input = match step.applied.error {
            Some(DocError::TooLarge(_)) => Some(BadInput::TooLarge),
            Some(DocError::InvalidChanges(_) | DocError::ClockJump(_)) => Some(BadInput::Malformed),
            _ => None,
        };
        let error = step.applied.error.take().map(|e| e.to_string());
        let count = step.applied.applied.len();
        // The reply may carry changes still in flight to the log: it waits until they are
        // durable, so a peer never holds a change this node could still lose. Changes applied
        // before an error are logged all the same: the document already holds them.
        let done = self.enqueue(
            step.applied.applied,
            EventMeta {
                event_type: "CRDT_SYNC",
                user_id: msg.client,
                ..EventMeta::default()
            },
            Origin::Remote {
                source_region: msg.source_region,
                via: Some(msg.via),
            },
            ctx,
        );
        let outgoing = step.reply;
        let incarnation = self.incarnation;
        let stored = self.last_seq > 0;
        Box::pin(async move {
            done.await.map_err(|_| RunError::Stopped)??;
            Ok(PeerSyncReply {
                state,
                outgoing,
                applied: count,
                lamport,
                error,
                bad_input,
                incarnation,
                stored,
            })
        })
    }
}

impl Handler<FullState> for RunActor {
    type Result = ResponseFuture<Result<(Vec<u8>, u64), RunError>>;

    fn handle(&mut self, _: FullState, ctx: &mut Self::Context) -> Self::Result {
        let answer = self.doc().map(|d| (d.save(), d.lamport()));
        self.once_durable(answer, ctx)
    }
}

//! The messages a run actor answers: the runtime's API (`runs::api`) wrapped in [`Call`], and
//! the snapshot actor's.

use std::sync::Arc;

use actix::prelude::*;
use run_doc::{concat_changes, Budget, DocError, SharedState};
use run_store::Snapshot;
use uuid::Uuid;

use super::events::EventMeta;
use super::RunActor;
use crate::runs::api::{
    BadInput, ChangesSince, FullDocument, Mutate, MutationOutcome, ReadChanges, ReadDiff,
    ReadDocument, ReadHistory, ReadState, ReadStateAt, RemoteChanges, SyncOutcome, SyncStep,
    SyncStepReply,
};
use crate::runs::{Origin, RunError};

/// A request of the runtime's API on its way to a run's actor.
#[derive(Debug, Clone)]
pub(crate) struct Call<T>(pub T);

macro_rules! answers {
    ($($request:ty => $result:ty),* $(,)?) => {
        $(impl Message for Call<$request> {
            type Result = Result<$result, RunError>;
        })*
    };
}

answers! {
    Mutate => MutationOutcome,
    RemoteChanges => SyncOutcome,
    SyncStep => SyncStepReply,
    ReadState => Arc<SharedState>,
    ReadChanges => ChangesSince,
    ReadDocument => FullDocument,
    ReadHistory => run_doc::HistoryPage,
    ReadStateAt => run_doc::RunState,
    ReadDiff => run_doc::RunDiff,
}

/// The node is stopping: once every write queued so far has committed, answer with a snapshot
/// of the run if the log holds events the newest snapshot does not cover.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Option<Snapshot>")]
pub(crate) struct FinalSnapshot;

/// Tells the actor a snapshot covering the log up to `event_count` is stored.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub(crate) struct SnapshotWritten {
    pub event_count: i64,
}

pub(super) type Answer<T> = ResponseFuture<Result<T, RunError>>;

/// An answer known at once.
pub(super) fn ready<T: 'static>(answer: Result<T, RunError>) -> Answer<T> {
    Box::pin(async move { answer })
}

fn refuse<T: 'static>(e: RunError) -> Answer<T> {
    ready(Err(e))
}

impl Handler<Call<Mutate>> for RunActor {
    type Result = Answer<MutationOutcome>;

    fn handle(&mut self, Call(msg): Call<Mutate>, ctx: &mut Self::Context) -> Self::Result {
        if let Some(warming) = &self.warming {
            // A retried graft the run holds is answered now; anything else waits for the
            // document.
            let Some(outcome) = warming.retried_graft(&msg.mutation) else {
                return self.defer(Call(msg), ctx);
            };
            self.last_active = std::time::Instant::now();
            if let Err(e) = self.runs.check_store() {
                return refuse(e);
            }
            return ready(Ok(outcome));
        }
        let usable = self.doc().map(|_| ());
        if let Err(e) = usable.and_then(|()| self.runs.check_store()) {
            return refuse(e);
        }
        let op_key = msg.op_id.clone().map(|id| (msg.user.clone(), id));
        if let Some(seen) = op_key.as_ref().and_then(|k| self.recent_ops.get(k)) {
            // Already applied (its write may still be in flight): the same answer, once durable.
            let seen = seen.clone();
            return self.once_durable(Ok(seen), ctx);
        }
        if let Err(e) = self.within_rate() {
            return refuse(e);
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let applied = match self.doc().and_then(|d| {
            d.apply_by(&msg.mutation, now_ms, msg.user.as_deref())
                .map_err(RunError::from)
        }) {
            Ok(a) => a,
            Err(e) => return refuse(e),
        };
        let heads: Vec<String> = self
            .doc()
            .map(|d| d.heads().iter().map(|h| h.to_string()).collect())
            .unwrap_or_default();
        self.charge_rate(&applied.change);
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
        let meta = EventMeta::local(&msg.mutation, outcome.graft.as_ref(), msg.user);
        let done = self.enqueue(vec![change], meta, Origin::Local, ctx);
        Box::pin(async move {
            done.await.map_err(|_| RunError::Stopped)??;
            Ok(outcome)
        })
    }
}

impl Handler<Call<RemoteChanges>> for RunActor {
    type Result = Answer<SyncOutcome>;

    fn handle(&mut self, Call(msg): Call<RemoteChanges>, ctx: &mut Self::Context) -> Self::Result {
        if self.warming.is_some() {
            return self.defer(Call(msg), ctx);
        }
        if let Err(e) = self.runs.check_store() {
            return refuse(e);
        }
        // A service's changes (HTTP sync) wait while loaded runs hold the node's budget of
        // operations; a mesh peer's never do (the regions must converge).
        if msg.via.is_none() {
            let ops = msg.changes.iter().map(|c| c.len() as u64).sum();
            if let Err(e) = self
                .runs
                .ops_room(ops, self.ops_counted)
                .and_then(|()| self.within_rate())
            {
                return refuse(e);
            }
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
            Err(e) => return refuse(e),
        };
        self.lamport_gauge(lamport);
        if msg.via.is_none() {
            self.charge_rate(&out.applied);
        }
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
        let origin = Origin::Remote {
            source_region: msg.source_region,
            via: msg.via,
        };
        let done = self.enqueue(out.applied, EventMeta::synced(None), origin, ctx);
        Box::pin(async move {
            done.await.map_err(|_| RunError::Stopped)??;
            error.map_or(Ok(outcome), Err)
        })
    }
}

impl Handler<Call<SyncStep>> for RunActor {
    type Result = Answer<SyncStepReply>;

    fn handle(&mut self, Call(msg): Call<SyncStep>, ctx: &mut Self::Context) -> Self::Result {
        if self.warming.is_some() {
            return self.defer(Call(msg), ctx);
        }
        // Changes cannot be stored now: refuse them at once (the peer retries); a step that
        // carries none may still answer.
        let carries_changes = msg.incoming.iter().any(|m| !m.changes.is_empty());
        if carries_changes {
            if let Err(e) = self.runs.check_store() {
                return refuse(e);
            }
        }
        // A client's changes wait while the loaded runs hold the node's budget of operations.
        if msg.client.is_some() && !msg.incoming.is_empty() {
            let ops: u64 = msg
                .incoming
                .iter()
                .flat_map(|m| m.changes.iter())
                .filter_map(|chunk| Budget::own().admit_all(chunk).ok())
                .flatten()
                .map(|size| size.ops)
                .sum();
            let room = self.runs.ops_room(ops, self.ops_counted);
            let rate = match carries_changes {
                false => Ok(()),
                true => self.within_rate(),
            };
            if let Err(e) = room.and(rate) {
                return refuse(e);
            }
        }
        let mut state = msg.state;
        let result = self.guarded(ctx, |d| {
            // A node sends what it committed; a client is held to the per-change bound.
            let budget = match msg.client {
                Some(_) => Budget::default(),
                None => Budget::peer(),
            };
            let step = d.sync_step_by(&mut state, msg.incoming, budget, msg.author.as_deref());
            Ok((step, d.lamport()))
        });
        let (mut step, lamport) = match result {
            Ok(r) => r,
            Err(e) => return refuse(e),
        };
        self.lamport_gauge(lamport);
        if msg.client.is_some() {
            self.charge_rate(&step.applied.applied);
        }
        let from = msg.client.as_deref().unwrap_or(&msg.via).to_string();
        self.report_schema(&step.applied.applied, &from);
        let bad_input = match step.applied.error {
            Some(DocError::TooLarge(_)) => Some(BadInput::TooLarge),
            Some(DocError::InvalidChanges(_) | DocError::ClockJump(_)) => Some(BadInput::Malformed),
            Some(DocError::NotPermitted(_)) => Some(BadInput::Forbidden),
            _ => None,
        };
        let error = step.applied.error.take().map(|e| e.to_string());
        let applied = step.applied.applied.len();
        // The reply may carry changes still in flight to the log: it waits until they are
        // durable, so a peer never holds a change this node could still lose. Changes applied
        // before an error are logged all the same: the document already holds them.
        let origin = Origin::Remote {
            source_region: msg.source_region,
            via: Some(msg.via),
        };
        let meta = EventMeta::synced(msg.client);
        let done = self.enqueue(step.applied.applied, meta, origin, ctx);
        let reply = SyncStepReply {
            state,
            outgoing: step.reply,
            applied,
            lamport,
            error,
            bad_input,
            incarnation: self.incarnation,
            stored: self.writes.last_seq() > 0,
        };
        Box::pin(async move {
            done.await.map_err(|_| RunError::Stopped)??;
            Ok(reply)
        })
    }
}

impl Handler<Call<ReadState>> for RunActor {
    type Result = Answer<Arc<SharedState>>;

    fn handle(&mut self, _: Call<ReadState>, ctx: &mut Self::Context) -> Self::Result {
        if let Some(warming) = &self.warming {
            // Nothing is written while the document loads: the projection is the state.
            let state = warming.state();
            self.last_active = std::time::Instant::now();
            return ready(Ok(state));
        }
        let state = self.current_state();
        self.once_durable(state, ctx)
    }
}

impl Handler<Call<ReadChanges>> for RunActor {
    type Result = Answer<ChangesSince>;

    fn handle(&mut self, Call(heads): Call<ReadChanges>, ctx: &mut Self::Context) -> Self::Result {
        if self.warming.is_some() {
            return self.defer(Call(heads), ctx);
        }
        let answer = self.doc().map(|doc| {
            let changes = doc.changes_since(&heads.0);
            ChangesSince {
                changes: concat_changes(&changes),
                count: changes.len(),
                heads: doc.heads().iter().map(|h| h.to_string()).collect(),
            }
        });
        // Never hand another replica a change that may yet be refused.
        self.once_durable(answer, ctx)
    }
}

/// Reads of the run's history: answered once what they reflect is durable.
macro_rules! history_reads {
    ($($request:ty => $result:ty, |$doc:ident, $msg:ident| $read:expr;)*) => {
        $(impl Handler<Call<$request>> for RunActor {
            type Result = Answer<$result>;

            fn handle(&mut self, msg: Call<$request>, ctx: &mut Self::Context) -> Self::Result {
                if self.warming.is_some() {
                    return self.defer(msg, ctx);
                }
                let Call($msg) = msg;
                let answer = self
                    .doc()
                    .and_then(|$doc| $read.map_err(RunError::from));
                self.once_durable(answer, ctx)
            }
        })*
    };
}

history_reads! {
    ReadHistory => run_doc::HistoryPage, |doc, m| doc.history(m.after, m.limit);
    ReadStateAt => run_doc::RunState, |doc, m| doc.state_at(&m.0);
    ReadDiff => run_doc::RunDiff, |doc, m| doc.diff(&m.from, m.to.as_deref());
}

impl Handler<Call<ReadDocument>> for RunActor {
    type Result = Answer<FullDocument>;

    fn handle(&mut self, msg: Call<ReadDocument>, ctx: &mut Self::Context) -> Self::Result {
        if self.warming.is_some() {
            return self.defer(msg, ctx);
        }
        let answer = self.doc().map(|d| FullDocument {
            bytes: d.save(),
            lamport: d.lamport(),
        });
        self.once_durable(answer, ctx)
    }
}

/// The pod is leaving: once the run's queued writes are durable, the actor gives its claim up
/// (returned for the caller to release) and stops; the run's snapshot schedule is the new
/// owner's now.
#[derive(Message)]
#[rtype(result = "Option<(Uuid, run_store::Fence)>")]
pub(crate) struct Handover;

impl Handler<Handover> for RunActor {
    type Result = ResponseActFuture<Self, Option<(Uuid, run_store::Fence)>>;

    fn handle(&mut self, _: Handover, ctx: &mut Self::Context) -> Self::Result {
        let drained = self.enqueue(Vec::new(), EventMeta::default(), Origin::Local, ctx);
        Box::pin(drained.into_actor(self).map(|_, act, ctx| {
            // Unloaded: the next request here finds the run's new owner.
            ctx.stop();
            Some((act.run_id, act.drop_claim()?))
        }))
    }
}

impl Handler<FinalSnapshot> for RunActor {
    type Result = ResponseActFuture<Self, Option<Snapshot>>;

    fn handle(&mut self, _: FinalSnapshot, ctx: &mut Self::Context) -> Self::Result {
        let drained = self.enqueue(Vec::new(), EventMeta::default(), Origin::Local, ctx);
        Box::pin(drained.into_actor(self).map(|drained, act, _| {
            // Only what is durable: nothing queued, nothing failed.
            let settled = matches!(drained, Ok(Ok(())))
                && act.writes.is_idle()
                && act.failed.is_none()
                && act.unreadable == 0;
            let committed = act.writes.committed_seq();
            if !settled || committed <= act.snapshots.covered() {
                return None;
            }
            let region = act.runs.inner.config.region.clone();
            let doc = act.doc.as_mut()?;
            Some(super::durable_snapshot(
                act.run_id,
                doc,
                committed,
                region,
                act.fence.clone(),
            ))
        }))
    }
}

impl Handler<SnapshotWritten> for RunActor {
    type Result = ();

    fn handle(&mut self, msg: SnapshotWritten, ctx: &mut Self::Context) {
        self.snapshots.written(msg.event_count);
        // Events committed while that snapshot was written may already be due another one.
        self.report_event_count(ctx);
    }
}

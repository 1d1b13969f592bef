//! `SnapshotActor`: listens for event counts and writes full snapshots.
//!
//! A run actor reports how many events it has committed since its last snapshot when one is due
//! (`run_actor::snapshot_schedule`: every `snapshot_every` events, or a tenth of a long run, and
//! no sooner than `snapshot_min_interval` after the previous one); this actor writes a snapshot, with the run's projection (its read model at the snapshot's heads, which
//! serves a cold run's first reads while it loads). A snapshot holds only committed changes,
//! never a write still in flight that may yet be refused: it is saved from a copy of the run's
//! document that holds exactly what the log holds once the writes in it commit
//! (`run_actor::snapshot_copy`), or, when the run cannot give one soon, built from durable storage, the newest snapshot plus the
//! events after it. The run actor never pauses to serialize its document (only to copy it):
//! saving runs on this actor's own thread. One run never has two snapshots in progress, and
//! the newest `snapshot_keep` per run are kept.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use actix::prelude::*;
use uuid::Uuid;

use super::loader::{self, LoadError};
use super::run_actor::{
    durable_snapshot, CopyAnswer, CopyForSnapshot, DurableCopy, RunActor, SnapshotWritten,
};
use super::RunsConfig;
use crate::metrics::Metrics;
use run_store::Store;

#[derive(Message)]
#[rtype(result = "()")]
pub struct EventCount {
    pub run_id: Uuid,
    pub since_snapshot: i64,
    pub run: Addr<RunActor>,
}

/// Snapshots built at once; more wait their turn, so a burst of due runs cannot crowd the
/// connection pool that commits need.
const CONCURRENT: usize = 2;

/// Runs asked for a copy, or holding one for its turn, at once: an ask can wait half a second
/// for a busy run's queue, and must not hold a build slot meanwhile; each answer may hold a
/// copy of a run's document, so they are bounded too.
const ASKING: usize = 16;

pub struct SnapshotActor {
    store: Arc<dyn Store>,
    config: RunsConfig,
    metrics: Metrics,
    /// Runs with a snapshot running or waiting: each run at most once.
    in_progress: HashSet<Uuid>,
    waiting: VecDeque<(Uuid, Addr<RunActor>)>,
    /// Asks for a copy out, and answers waiting for a build slot.
    asking: usize,
    answered: VecDeque<(Uuid, Addr<RunActor>, CopyAnswer)>,
    running: usize,
}

impl SnapshotActor {
    pub fn new(store: Arc<dyn Store>, config: RunsConfig, metrics: Metrics) -> Self {
        SnapshotActor {
            store,
            config,
            metrics,
            in_progress: HashSet::new(),
            waiting: VecDeque::new(),
            asking: 0,
            answered: VecDeque::new(),
            running: 0,
        }
    }

    /// Asks waiting runs for copies, then builds what was answered, each within its bound.
    fn start_waiting(&mut self, ctx: &mut Context<Self>) {
        while self.asking + self.answered.len() < ASKING {
            let Some((run_id, run)) = self.waiting.pop_front() else {
                break;
            };
            self.asking += 1;
            let ask = run.send(CopyForSnapshot);
            ctx.spawn(ask.into_actor(self).map(move |answer, act, ctx| {
                act.asking -= 1;
                // Not loaded any more: from the log.
                let answer = answer.unwrap_or(CopyAnswer::FromStorage);
                act.answered.push_back((run_id, run, answer));
                act.start_waiting(ctx);
            }));
        }
        self.start_answered(ctx);
    }

    fn start_answered(&mut self, ctx: &mut Context<Self>) {
        while self.running < CONCURRENT {
            let Some((run_id, run, answer)) = self.answered.pop_front() else {
                return;
            };
            self.running += 1;
            let store = self.store.clone();
            let region = self.config.region.clone();
            let keep = self.config.snapshot_keep;
            let work = async move {
                match answer {
                    CopyAnswer::Copy(copy) => {
                        snapshot_copy(store.as_ref(), run_id, *copy, region, keep)
                            .await
                            .map(|done| (done, "memory"))
                    }
                    CopyAnswer::NothingNew => Ok((
                        Done {
                            covers: 0,
                            bytes: None,
                        },
                        "memory",
                    )),
                    CopyAnswer::FromStorage => {
                        snapshot_durable_state(store.as_ref(), run_id, region, keep)
                            .await
                            .map(|done| (done, "storage"))
                    }
                }
            };
            ctx.spawn(work.into_actor(self).map(move |result, act, ctx| {
                act.running -= 1;
                act.in_progress.remove(&run_id);
                match result {
                    Ok((done, source)) => {
                        if let Some(size) = done.bytes {
                            act.metrics.snapshot_size.observe(size as f64);
                            act.metrics
                                .snapshots_written
                                .with_label_values(&[source])
                                .inc();
                            log::debug!(
                                "run {run_id}: snapshot of {size} bytes at event {}",
                                done.covers
                            );
                        }
                        run.do_send(SnapshotWritten {
                            event_count: done.covers,
                        });
                    }
                    Err(e) => {
                        act.metrics.snapshot_failures.inc();
                        log::warn!("run {run_id}: snapshot failed: {e}");
                    }
                }
                act.start_waiting(ctx);
            }));
        }
    }
}

impl Actor for SnapshotActor {
    type Context = Context<Self>;
}

impl Supervised for SnapshotActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        log::warn!("snapshot actor restarting");
        self.in_progress.clear();
        self.waiting.clear();
        self.asking = 0;
        self.answered.clear();
        self.running = 0;
    }
}

struct Done {
    /// `run_seq` the newest snapshot now covers.
    covers: i64,
    /// Size of the snapshot written, or None when nothing new was committed since the last.
    bytes: Option<usize>,
}

/// Saves and stores a document that holds what is durable (the run actor's copy, or one
/// rebuilt from storage).
async fn snapshot_copy(
    store: &dyn Store,
    run_id: Uuid,
    copy: DurableCopy,
    region: String,
    keep: usize,
) -> Result<Done, LoadError> {
    let DurableCopy {
        mut doc,
        event_count,
        fence,
    } = copy;
    let snapshot = durable_snapshot(run_id, &mut doc, event_count, region, fence);
    store.save_snapshot(&snapshot, keep).await?;
    Ok(Done {
        covers: event_count,
        bytes: Some(snapshot.data.len()),
    })
}

/// Builds and stores a snapshot of what is durable, from storage.
async fn snapshot_durable_state(
    store: &dyn Store,
    run_id: Uuid,
    region: String,
    keep: usize,
) -> Result<Done, LoadError> {
    let loaded = loader::load(store, run_id, &region).await?;
    if loaded.unreadable > 0 {
        // A snapshot past them would hide them for good; leave them in the log to mend.
        log::error!(
            "run {run_id}: not snapshotted: {} stored changes do not apply",
            loaded.unreadable
        );
        return Ok(Done {
            covers: loaded.snapshot_seq,
            bytes: None,
        });
    }
    if loaded.last_seq <= loaded.snapshot_seq {
        return Ok(Done {
            covers: loaded.snapshot_seq,
            bytes: None,
        });
    }
    let durable = DurableCopy {
        doc: loaded.doc,
        event_count: loaded.last_seq,
        // Made of the log alone: whoever owns the run now, it holds only what is durable.
        fence: None,
    };
    snapshot_copy(store, run_id, durable, region, keep).await
}

impl Handler<EventCount> for SnapshotActor {
    type Result = ();

    fn handle(&mut self, msg: EventCount, ctx: &mut Self::Context) {
        if msg.since_snapshot < self.config.snapshot_every as i64
            || !self.in_progress.insert(msg.run_id)
        {
            return;
        }
        self.waiting.push_back((msg.run_id, msg.run));
        self.start_waiting(ctx);
    }
}

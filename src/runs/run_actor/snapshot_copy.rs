//! A copy of the run's document for the snapshot actor, taken when the document holds exactly
//! what the log holds.
//!
//! Building a snapshot from storage (the newest snapshot plus the events after it, replayed)
//! cost 15% of the node under a steady write load over 1,000 runs: every snapshot loaded and
//! replayed again what the run actor already holds. When nothing is waiting for the log, the
//! actor's document is the durable state, so a copy of it (Automerge's columns are copied, far
//! cheaper than saving: 0.13 ms for 1,000 changes, `cargo bench --bench doc_model`) is saved on
//! the snapshot thread instead. Writes waiting for the log make the document ahead of it: the
//! request then waits for the queue to empty, and after [`COPY_WAIT`] the snapshot actor builds
//! from storage as before. Taking the copy pauses the run briefly (1.8 ms at 10,000 changes,
//! hence `crdt.snapshot.copy-max-changes`, 20,000 by default). A copy carries the actor's
//! fence, so a deposed owner's snapshot is refused like its writes.

use std::time::Duration;

use actix::prelude::*;
use run_doc::RunDoc;
use run_store::Snapshot;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::RunActor;

/// How long a request waits for the write queue to empty before storage is used instead.
const COPY_WAIT: Duration = Duration::from_millis(500);

/// The run's document as the log holds it up to `event_count`.
pub(crate) struct DurableCopy {
    pub doc: RunDoc,
    pub event_count: i64,
    pub fence: Option<run_store::Fence>,
}

/// A snapshot of `doc`, which holds exactly the log of `run_id` up to `event_count`: saved, with
/// its projection. Every snapshot is made here (the snapshot actor's, from a copy or from
/// storage, and the final one a run makes when the node stops).
pub(crate) fn durable_snapshot(
    run_id: Uuid,
    doc: &mut RunDoc,
    event_count: i64,
    region: String,
    fence: Option<run_store::Fence>,
) -> Snapshot {
    Snapshot {
        id: Uuid::new_v4(),
        run_id,
        lamport: i64::try_from(doc.lamport()).unwrap_or(i64::MAX),
        region,
        created_at: chrono::Utc::now().naive_utc(),
        event_count: i32::try_from(event_count).unwrap_or(i32::MAX),
        data: doc.save(),
        projection: Some(doc.projection().encode()),
        fence,
    }
}

/// What a run answers when asked for a copy.
pub(crate) enum CopyAnswer {
    Copy(Box<DurableCopy>),
    /// A snapshot already covers everything the log holds.
    NothingNew,
    /// No copy now (not loaded, failed, holding unreadable stored changes, warming, too large,
    /// or its queue not empty in time): build from storage.
    FromStorage,
}

/// Asks for a [`DurableCopy`].
#[derive(Message)]
#[rtype(result = "CopyAnswer")]
pub(crate) struct CopyForSnapshot;

/// A waiting request: its number (so a timer of an earlier one does not end it) and its reply.
pub(super) type CopyWanted = (u64, oneshot::Sender<CopyAnswer>);

impl Handler<CopyForSnapshot> for RunActor {
    type Result = ResponseFuture<CopyAnswer>;

    fn handle(&mut self, _: CopyForSnapshot, ctx: &mut Self::Context) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.copy_asks += 1;
        let ask = self.copy_asks;
        if let Some((_, earlier)) = self.copy_wanted.replace((ask, reply)) {
            // The snapshot actor asks once per run at a time; an older ask gets nothing.
            let _ = earlier.send(CopyAnswer::FromStorage);
        }
        self.answer_copy(false);
        if self.copy_wanted.is_some() {
            ctx.run_later(COPY_WAIT, move |act, _| {
                if act.copy_wanted.as_ref().is_some_and(|(n, _)| *n == ask) {
                    act.answer_copy(true);
                }
            });
        }
        Box::pin(async move { answer.await.unwrap_or(CopyAnswer::FromStorage) })
    }
}

impl RunActor {
    /// Answers a waiting copy request if the document holds exactly what is durable (or says
    /// to build from storage if it cannot, or on `give_up`).
    pub(super) fn answer_copy(&mut self, give_up: bool) {
        if self.copy_wanted.is_none() {
            return;
        }
        let usable = self.failed.is_none()
            && self.unreadable == 0
            && self.warming.is_none()
            && self.elsewhere.is_none()
            && !self.tombstone.as_ref().is_some_and(|t| t.deleted);
        // Larger runs are built from storage: copying them would pause the run (and the runs
        // sharing its thread) for milliseconds (`crdt.snapshot.copy-max-changes`).
        let most = self.runs.inner.config.snapshot_copy_max_changes;
        let size_ok = self.doc.as_ref().is_some_and(|d| d.size().1 <= most);
        if usable && size_ok && !self.writes.is_idle() && !give_up {
            // Ahead of the log for now: answered when the queue empties (or gives up).
            return;
        }
        let answer = match (&self.doc, usable && size_ok && self.writes.is_idle()) {
            (Some(_), true) if self.writes.committed_seq() <= self.snapshots.covered() => {
                CopyAnswer::NothingNew
            }
            (Some(doc), true) => CopyAnswer::Copy(Box::new(DurableCopy {
                doc: doc.copy_for_snapshot(),
                event_count: self.writes.committed_seq(),
                fence: self.fence.clone(),
            })),
            _ => CopyAnswer::FromStorage,
        };
        if let Some((_, reply)) = self.copy_wanted.take() {
            let _ = reply.send(answer);
        }
    }
}

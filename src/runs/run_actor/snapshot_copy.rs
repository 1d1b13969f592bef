//! A copy of the run's document for the snapshot actor, taken when the document holds exactly
//! what the log holds.
//!
//! Building a snapshot from storage (the newest snapshot plus the events after it, replayed)
//! cost 15% of the node under a steady write load over 1,000 runs: every snapshot loaded and
//! replayed again what the run actor already holds. When nothing is waiting for the log, the
//! actor's document is the durable state, so a copy of it (Automerge's columns are copied, far
//! cheaper than saving: 0.13 ms for 1,000 changes, `cargo bench --bench doc_model`) is saved on
//! the snapshot thread instead. Writes waiting for the log make the document ahead of it: the
//! copy is then taken at once, holding the log up to the last of those writes, and handed over
//! when they commit: a run many write to may go long without an empty queue, and waiting for
//! one sent some of its snapshots to storage (10 runs of 10,000 events under wrk on
//! PostgreSQL: 3-6 of 30-40 in 10 s, none since). If any write is refused first, the copy holds
//! what the log never will and is dropped; after [`COPY_WAIT`] the snapshot actor builds from
//! storage. Taking the copy pauses the run briefly (1.8 ms at 10,000 changes, hence
//! `crdt.snapshot.copy-max-changes`, 20,000 by default). A copy carries the actor's fence, so a
//! deposed owner's snapshot is refused like its writes.

use std::time::Duration;

use actix::prelude::*;
use run_doc::RunDoc;
use run_store::Snapshot;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::RunActor;

/// How long a request waits for its copy (or the writes a copy holds to commit) before storage
/// is used instead.
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
    /// or the writes its copy holds not committed in time): build from storage.
    FromStorage,
}

/// Asks for a [`DurableCopy`].
#[derive(Message)]
#[rtype(result = "CopyAnswer")]
pub(crate) struct CopyForSnapshot;

/// A waiting request: its number (so a timer of an earlier one does not end it) and its reply.
pub(super) type CopyWanted = (u64, oneshot::Sender<CopyAnswer>);

/// A copy taken while writes were on their way to the log: it holds the log up to its
/// `event_count` once they commit, if the queue's epoch is still `epoch`.
pub(super) struct PendingCopy {
    copy: DurableCopy,
    epoch: u64,
}

/// What a copy request is answered by, read off the run.
#[derive(Debug, Clone, Copy)]
struct Facts {
    /// Loaded, whole, not failed, deleted, warming or held elsewhere, and small enough to copy.
    usable: bool,
    /// No write waits for the log or is in flight.
    idle: bool,
    /// The log's last committed position.
    committed: i64,
    /// The last position handed out to a write (committed or on its way).
    last: i64,
    /// What the newest snapshot covers.
    covered: i64,
    epoch: u64,
    give_up: bool,
}

/// The next step for a copy request; `pending` is a copy taken earlier (its position, epoch).
#[derive(Debug, PartialEq, Eq)]
enum Next {
    FromStorage,
    NothingNew,
    /// Copy the document now: it holds exactly the log.
    CopyNow,
    /// Hand over the pending copy: the writes it holds are committed.
    HandOver,
    /// Take a copy now, holding the log up to the last write handed out once that commits.
    Take,
    /// Wait for the writes the pending copy holds.
    Wait,
}

fn next(f: Facts, pending: Option<(i64, u64)>) -> Next {
    if !f.usable {
        return Next::FromStorage;
    }
    // A pending copy of another epoch holds writes that were refused, and one a newer snapshot
    // covers is of no use: decided afresh.
    if let Some((through, _)) =
        pending.filter(|&(through, epoch)| epoch == f.epoch && through > f.covered)
    {
        return if f.committed >= through {
            Next::HandOver
        } else if f.give_up {
            Next::FromStorage
        } else {
            Next::Wait
        };
    }
    if f.idle {
        return if f.committed <= f.covered {
            Next::NothingNew
        } else {
            Next::CopyNow
        };
    }
    if f.last <= f.covered {
        return Next::NothingNew;
    }
    if f.give_up {
        return Next::FromStorage;
    }
    Next::Take
}

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
    /// Answers a waiting copy request if the document holds exactly what is durable, or a copy
    /// taken earlier now does (or says to build from storage if it cannot, or on `give_up`).
    pub(super) fn answer_copy(&mut self, give_up: bool) {
        if self.copy_wanted.is_none() {
            return;
        }
        let answer = loop {
            let pending = self
                .copy_pending
                .as_ref()
                .map(|p| (p.copy.event_count, p.epoch));
            match next(self.copy_facts(give_up), pending) {
                Next::Wait => return,
                Next::FromStorage => break CopyAnswer::FromStorage,
                Next::NothingNew => break CopyAnswer::NothingNew,
                Next::HandOver => match self.copy_pending.take() {
                    Some(p) => break CopyAnswer::Copy(Box::new(p.copy)),
                    None => break CopyAnswer::FromStorage,
                },
                Next::CopyNow => match self.durable_copy(self.writes.committed_seq()) {
                    Some(copy) => break CopyAnswer::Copy(Box::new(copy)),
                    None => break CopyAnswer::FromStorage,
                },
                // Then asked again: the writes it holds may all be committed already.
                Next::Take => match self.durable_copy(self.writes.last_seq()) {
                    Some(copy) => {
                        let epoch = self.writes.epoch();
                        self.copy_pending = Some(PendingCopy { copy, epoch });
                    }
                    None => break CopyAnswer::FromStorage,
                },
            }
        };
        self.copy_pending = None;
        if let Some((_, reply)) = self.copy_wanted.take() {
            let _ = reply.send(answer);
        }
    }

    fn copy_facts(&self, give_up: bool) -> Facts {
        // Larger runs are built from storage: copying them would pause the run (and the runs
        // sharing its thread) for milliseconds (`crdt.snapshot.copy-max-changes`).
        let most = self.runs.inner.config.snapshot_copy_max_changes;
        let usable = self.failed.is_none()
            && self.unreadable == 0
            && self.warming.is_none()
            && self.elsewhere.is_none()
            && !self.tombstone.as_ref().is_some_and(|t| t.deleted)
            && self.doc.as_ref().is_some_and(|d| d.size().1 <= most);
        Facts {
            usable,
            idle: self.writes.is_idle(),
            committed: self.writes.committed_seq(),
            last: self.writes.last_seq(),
            covered: self.snapshots.covered(),
            epoch: self.writes.epoch(),
            give_up,
        }
    }

    /// A copy of the document, which holds the log up to `event_count` (or will, once the
    /// writes handed out up to there commit).
    fn durable_copy(&self, event_count: i64) -> Option<DurableCopy> {
        Some(DurableCopy {
            doc: self.doc.as_ref()?.copy_for_snapshot(),
            event_count,
            fence: self.fence.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            usable: true,
            idle: false,
            committed: 100,
            last: 105,
            covered: 50,
            epoch: 7,
            give_up: false,
        }
    }

    #[test]
    fn an_idle_run_is_copied_at_once() {
        let idle = Facts {
            idle: true,
            last: 100,
            ..facts()
        };
        assert_eq!(next(idle, None), Next::CopyNow);
        let covered = Facts {
            covered: 100,
            ..idle
        };
        assert_eq!(next(covered, None), Next::NothingNew);
        let unusable = Facts {
            usable: false,
            ..idle
        };
        assert_eq!(next(unusable, None), Next::FromStorage);
    }

    #[test]
    fn with_writes_in_flight_a_copy_is_taken_and_handed_over_once_they_commit() {
        assert_eq!(next(facts(), None), Next::Take);
        assert_eq!(next(facts(), Some((105, 7))), Next::Wait);
        let committed = Facts {
            committed: 105,
            ..facts()
        };
        assert_eq!(next(committed, Some((105, 7))), Next::HandOver);
        // Later writes on their way do not hold it back.
        let further = Facts {
            committed: 108,
            last: 120,
            ..facts()
        };
        assert_eq!(next(further, Some((105, 7))), Next::HandOver);
        // Only what was handed out counts: a queue holding no new events hands over at once,
        // or has nothing new (and takes no copy).
        let nothing_new_queued = Facts {
            last: 100,
            ..facts()
        };
        assert_eq!(next(nothing_new_queued, Some((100, 7))), Next::HandOver);
        let covered = Facts {
            covered: 100,
            ..nothing_new_queued
        };
        assert_eq!(next(covered, Some((100, 7))), Next::NothingNew);
        assert_eq!(next(covered, None), Next::NothingNew);
        // A newer snapshot (built from storage meanwhile) passed the pending copy: a new one
        // is taken.
        let passed = Facts {
            covered: 104,
            ..facts()
        };
        assert_eq!(next(passed, Some((103, 7))), Next::Take);
    }

    #[test]
    fn a_copy_holding_refused_writes_is_never_handed_over() {
        // The queue refused writes (epoch 8): the copy at 105 holds changes the log never got,
        // even once the log passes 105 again with other writes.
        let refused = Facts {
            committed: 110,
            last: 112,
            epoch: 8,
            ..facts()
        };
        assert_eq!(next(refused, Some((105, 7))), Next::Take);
        let idle = Facts {
            idle: true,
            last: 110,
            ..refused
        };
        assert_eq!(next(idle, Some((105, 7))), Next::CopyNow);
    }

    #[test]
    fn giving_up_builds_from_storage() {
        let give_up = Facts {
            give_up: true,
            ..facts()
        };
        assert_eq!(next(give_up, None), Next::FromStorage);
        assert_eq!(next(give_up, Some((105, 7))), Next::FromStorage);
        let committed = Facts {
            committed: 105,
            ..give_up
        };
        assert_eq!(
            next(committed, Some((105, 7))),
            Next::HandOver,
            "a copy that is durable by then is still used"
        );
    }
}

//! The durability pipeline of one run, as plain data: writes wait here for the event log, at
//! most one append is in flight (so the run's log stays in order), and writes arriving
//! meanwhile go together in the next append. The actor does the IO; this decides what goes
//! when, and what each outcome means for the writes.

use std::sync::atomic::{AtomicU64, Ordering};

use automerge::{Change, ChangeHash};
use run_store::NewEvent;

use crate::runs::Origin;

/// One write waiting for the log, with what to do once it commits.
pub(crate) struct PendingWrite<R> {
    pub events: Vec<NewEvent>,
    pub changes: Vec<Change>,
    pub origin: Origin,
    /// Whoever waits for the write (the actor uses a oneshot sender).
    pub reply: R,
    /// The document's heads and clock with this write applied: durable once it commits.
    pub heads_after: Vec<ChangeHash>,
    pub lamport_after: u64,
}

/// An append handed to the log: its events go to the committer, its writes wait for the result.
pub(crate) struct Batch<R> {
    pub events: Vec<NewEvent>,
    pub writes: Vec<PendingWrite<R>>,
    /// `run_seq` of the batch's last event.
    last_seq: i64,
}

/// Numbers the stretches of a queue's life in which no write was refused; process-wide, so a
/// queue made anew never repeats an earlier one's number.
static EPOCHS: AtomicU64 = AtomicU64::new(1);

fn next_epoch() -> u64 {
    EPOCHS.fetch_add(1, Ordering::Relaxed)
}

pub(crate) struct WriteQueue<R> {
    pending: Vec<PendingWrite<R>>,
    /// Changes when writes are refused: what was written before is then not all in the log.
    epoch: u64,
    in_flight: bool,
    /// `run_seq` of the last event handed to the log (committed or in flight).
    last_seq: i64,
    committed_seq: i64,
    /// Heads and clock of what the log holds.
    durable: (Vec<ChangeHash>, u64),
}

impl<R> WriteQueue<R> {
    /// A queue for a run whose log ends at `last_seq`, holding `durable`.
    pub fn new(last_seq: i64, durable: (Vec<ChangeHash>, u64)) -> Self {
        WriteQueue {
            pending: Vec::new(),
            epoch: next_epoch(),
            in_flight: false,
            last_seq,
            committed_seq: last_seq,
            durable,
        }
    }

    /// The next event's position in the run's log.
    pub fn next_seq(&mut self) -> i64 {
        self.last_seq += 1;
        self.last_seq
    }

    pub fn last_seq(&self) -> i64 {
        self.last_seq
    }

    pub fn committed_seq(&self) -> i64 {
        self.committed_seq
    }

    /// Heads and clock of what the log holds.
    pub fn durable(&self) -> &(Vec<ChangeHash>, u64) {
        &self.durable
    }

    /// The same while every write handed to this queue is committed or still on its way: a
    /// state that holds the writes up to some `run_seq` is the log's up to there once that
    /// commits, unless the number has changed meanwhile.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Nothing waits and nothing is in flight: the log holds all that was written.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && !self.in_flight
    }

    /// Queues a write; true when the caller should start an append now.
    pub fn push(&mut self, write: PendingWrite<R>) -> bool {
        self.pending.push(write);
        !self.in_flight
    }

    /// Takes every waiting write as the next append, unless one is in flight or none waits.
    pub fn take_batch(&mut self) -> Option<Batch<R>> {
        if self.in_flight || self.pending.is_empty() {
            return None;
        }
        self.in_flight = true;
        let mut writes = std::mem::take(&mut self.pending);
        let events: Vec<NewEvent> = writes
            .iter_mut()
            .flat_map(|w| std::mem::take(&mut w.events))
            .collect();
        let last_seq = events.last().map_or(self.committed_seq, |e| e.run_seq);
        Some(Batch {
            events,
            writes,
            last_seq,
        })
    }

    /// The append of `batch` committed: its writes are durable and may be answered.
    pub fn committed(&mut self, batch: Batch<R>) -> Vec<PendingWrite<R>> {
        self.in_flight = false;
        self.committed_seq = batch.last_seq;
        if let Some(last) = batch.writes.last() {
            self.durable = (last.heads_after.clone(), last.lamport_after);
        }
        batch.writes
    }

    /// Takes the writes waiting behind the append in flight, none of which was sent: the run
    /// takes no more (it was deleted). The log goes on after the append in flight.
    pub fn refuse_waiting(&mut self) -> Vec<PendingWrite<R>> {
        let waiting = std::mem::take(&mut self.pending);
        self.epoch = next_epoch();
        if let Some(first) = waiting.iter().find_map(|w| w.events.first()) {
            self.last_seq = first.run_seq - 1;
        }
        waiting
    }

    /// The append of `batch` failed: every write not committed (it and those waiting) is to be
    /// refused, and the log continues from what it holds.
    pub fn refuse_all(&mut self, batch: Option<Batch<R>>) -> Vec<PendingWrite<R>> {
        self.in_flight = false;
        self.last_seq = self.committed_seq;
        self.epoch = next_epoch();
        let failed = batch.map(|b| b.writes).unwrap_or_default();
        failed
            .into_iter()
            .chain(std::mem::take(&mut self.pending))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn write(
        q: &mut WriteQueue<u32>,
        reply: u32,
        events: usize,
        lamport: u64,
    ) -> PendingWrite<u32> {
        let events = (0..events)
            .map(|_| NewEvent {
                run_id: Uuid::nil(),
                run_seq: q.next_seq(),
                event_type: "SET_FLAG".into(),
                payload: None,
                user_id: None,
                created_at: chrono::DateTime::UNIX_EPOCH.naive_utc(),
                crdt_changes: Vec::new(),
                change_hash: Vec::new(),
                source_region: "r".into(),
                lamport: lamport as i64,
                kind: None,
                content: None,
                fence: None,
            })
            .collect();
        PendingWrite {
            events,
            changes: Vec::new(),
            origin: Origin::Local,
            reply,
            heads_after: Vec::new(),
            lamport_after: lamport,
        }
    }

    #[test]
    fn one_append_in_flight_and_the_rest_batched_behind_it() {
        let mut q = WriteQueue::new(10, (Vec::new(), 3));
        let w = write(&mut q, 1, 1, 4);
        assert!(q.push(w), "an idle queue appends at once");
        let first = q.take_batch().expect("a batch");
        assert_eq!(first.events[0].run_seq, 11);
        assert!(q.take_batch().is_none(), "one append in flight at a time");
        for reply in 2..=4 {
            let w = write(&mut q, reply, 2, 4 + u64::from(reply));
            assert!(!q.push(w), "waits behind the append in flight");
        }
        let done = q.committed(first);
        assert_eq!(done.iter().map(|w| w.reply).collect::<Vec<_>>(), vec![1]);
        assert_eq!((q.committed_seq(), q.durable().1), (11, 4));
        let second = q.take_batch().expect("the waiting writes go together");
        assert_eq!(second.writes.len(), 3);
        let seqs: Vec<i64> = second.events.iter().map(|e| e.run_seq).collect();
        assert_eq!(seqs, (12..=17).collect::<Vec<_>>(), "in log order");
        q.committed(second);
        assert_eq!((q.committed_seq(), q.durable().1), (17, 8));
        assert!(q.is_idle());
    }

    #[test]
    fn the_epoch_moves_only_when_writes_are_refused() {
        let mut q = WriteQueue::new(0, (Vec::new(), 0));
        let fresh = q.epoch();
        assert_ne!(
            WriteQueue::<u32>::new(0, (Vec::new(), 0)).epoch(),
            fresh,
            "a new queue never repeats one"
        );
        let w = write(&mut q, 1, 1, 1);
        q.push(w);
        let batch = q.take_batch().expect("a batch");
        let w = write(&mut q, 2, 1, 2);
        q.push(w);
        q.committed(batch);
        assert_eq!(q.epoch(), fresh, "committing keeps it");
        let w = write(&mut q, 3, 1, 3);
        q.push(w);
        q.refuse_waiting();
        let after_deletion = q.epoch();
        assert_ne!(after_deletion, fresh);
        let batch = q.take_batch();
        q.refuse_all(batch);
        assert_ne!(q.epoch(), after_deletion);
    }

    #[test]
    fn a_deletion_refuses_what_waits_and_lets_the_append_in_flight_finish() {
        let mut q = WriteQueue::new(5, (Vec::new(), 1));
        let w = write(&mut q, 1, 2, 2);
        q.push(w);
        let in_flight = q.take_batch().expect("a batch");
        for reply in 2..=3 {
            let w = write(&mut q, reply, 1, 3);
            q.push(w);
        }
        let refused = q.refuse_waiting();
        assert_eq!(
            refused.iter().map(|w| w.reply).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(
            q.last_seq(),
            7,
            "the log goes on after the append in flight"
        );
        assert!(!q.is_idle(), "the append in flight still answers");
        let done = q.committed(in_flight);
        assert_eq!(done.iter().map(|w| w.reply).collect::<Vec<_>>(), vec![1]);
        assert!(q.is_idle() && q.take_batch().is_none());
        assert_eq!(q.committed_seq(), 7);
    }

    #[test]
    fn a_failed_append_refuses_it_and_everything_waiting() {
        let mut q = WriteQueue::new(0, (Vec::new(), 0));
        let w = write(&mut q, 1, 1, 1);
        q.push(w);
        let batch = q.take_batch();
        let w = write(&mut q, 2, 1, 2);
        q.push(w);
        let refused = q.refuse_all(batch);
        assert_eq!(
            refused.iter().map(|w| w.reply).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            (q.last_seq(), q.committed_seq()),
            (0, 0),
            "the log goes on from 0"
        );
        assert_eq!(q.durable().1, 0, "nothing refused became durable");
        assert!(q.is_idle());
        assert_eq!(q.next_seq(), 1);
    }

    #[test]
    fn an_empty_queue_has_nothing_to_append() {
        let mut q: WriteQueue<u32> = WriteQueue::new(5, (Vec::new(), 9));
        assert!(q.take_batch().is_none());
        assert!(q.is_idle());
        assert_eq!(q.committed_seq(), 5);
    }
}

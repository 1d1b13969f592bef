//! Each run's work on a link, done in order one piece at a time: live changes to apply,
//! sync-protocol steps, whole runs to send. Different runs proceed side by side. What a sync
//! step's outcome means is the [`SyncDriver`]'s to decide; this does the IO.

use super::*;
use crate::runs::Tombstone;
use crate::sync_driver::{Action, PeerKind, StepRequest, SyncDriver};

/// Work queued per link beyond this means the peer sends faster than we can apply: the link
/// is dropped, and the reconnect's catch-up brings what was missed.
const MAX_QUEUED: usize = 100_000;
const MAX_QUEUED_BYTES: usize = 256 * 1024 * 1024;
/// How long after failing to take a peer's changes this node asks for them again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A run's sync state on a link is dropped (saved for the next link) after this long unused.
pub(super) const SLOT_IDLE: Duration = Duration::from_secs(120);

pub(super) enum Work {
    /// A step of the sync protocol; `None` starts one.
    Step(Option<sync::Message>),
    /// A fresh round from what both sides last agreed on, asking the peer to forget what it
    /// thinks it sent (a change of ours went missing, or the peer rejected our message).
    Resync,
    Changes {
        changes: Vec<Change>,
        lamport: u64,
        source_region: String,
    },
    SendFull,
}

impl Work {
    /// Bytes of change data it holds, to bound what a peer can queue.
    fn size(&self) -> usize {
        match self {
            Work::Step(Some(m)) => m.changes.iter().map(<[u8]>::len).sum(),
            Work::Changes { changes, .. } => changes.iter().map(|c| c.raw_bytes().len()).sum(),
            _ => 0,
        }
    }
}

/// A finished piece of work.
enum Finished {
    Step {
        sent: Option<Box<sync::State>>,
        result: Result<SyncStepReply, RunError>,
        answered: bool,
    },
    Changes(Result<SyncOutcome, RunError>),
    Full(Result<Vec<Frame>, RunError>),
    /// A step was due while another was out (cannot happen while `busy` guards the slot).
    Nothing,
}

/// One run on this link: its sync with the peer and the work waiting for it.
pub(super) struct Slot {
    pub(super) sync: SyncDriver,
    pub(super) queue: VecDeque<(Work, bool)>,
    pub(super) busy: bool,
    pub(super) last_used: Instant,
    /// A `Resync` is queued: more requests for one are the same request.
    pub(super) resync_queued: bool,
}

impl Finished {
    /// The run's tombstone, when the work found the run deleted.
    fn gone(&self) -> Option<&Tombstone> {
        match self {
            Finished::Step {
                result: Err(RunError::Deleted(t)),
                ..
            }
            | Finished::Changes(Err(RunError::Deleted(t)))
            | Finished::Full(Err(RunError::Deleted(t))) => Some(t),
            _ => None,
        }
    }
}

impl Slot {
    /// A run's slot, its sync resuming from `saved` (kept from an earlier link to this peer)
    /// so the first round covers only what changed since.
    fn new(saved: Option<Vec<u8>>) -> Self {
        let saved = saved
            .and_then(|b| sync::State::decode(&b).ok())
            .map(Box::new);
        Slot {
            sync: SyncDriver::new(PeerKind::Node, saved),
            queue: VecDeque::new(),
            busy: false,
            last_used: Instant::now(),
            resync_queued: false,
        }
    }
}

impl PeerSession {
    /// The run's slot on this link, made on first use.
    pub(super) fn slot(&mut self, run: Uuid) -> &mut Slot {
        let saved = match (self.slots.contains_key(&run), self.peer()) {
            (false, Some(peer)) => self.mesh.saved_sync_state(&peer.node_id, run),
            _ => None,
        };
        self.slots.entry(run).or_insert_with(|| Slot::new(saved))
    }

    pub(super) fn push(&mut self, run: Uuid, work: Work, catchup: bool, ctx: &mut Context<Self>) {
        let size = work.size();
        if self.queued >= MAX_QUEUED || self.queued_bytes + size > MAX_QUEUED_BYTES {
            return self.close(
                close::TOO_SLOW,
                format!(
                    "{} frames ({} bytes) waiting to be applied",
                    self.queued, self.queued_bytes
                ),
                ctx,
            );
        }
        let slot = self.slot(run);
        slot.last_used = Instant::now();
        if matches!(work, Work::Resync) {
            if slot.resync_queued {
                return;
            }
            slot.resync_queued = true;
        }
        slot.queue.push_back((work, catchup));
        self.queued += 1;
        self.queued_bytes += size;
        self.pump(run, ctx);
    }

    /// Starts the next piece of work for `run` unless one is running.
    pub(super) fn pump(&mut self, run: Uuid, ctx: &mut Context<Self>) {
        let Some(peer) = self.peer().cloned() else {
            return;
        };
        let Some(slot) = self.slots.get_mut(&run) else {
            return;
        };
        if slot.busy || slot.sync.stepping() {
            return;
        }
        let Some((work, catchup)) = slot.queue.pop_front() else {
            return;
        };
        self.queued -= 1;
        self.queued_bytes -= work.size();
        slot.busy = true;
        let runs = self.runs.clone();
        let fut: BoxFuture<Finished> = match work {
            Work::Step(incoming) => {
                let answered = incoming.is_some();
                let request = slot.sync.step(incoming);
                step(runs, run, &peer, request, answered)
            }
            Work::Resync => {
                slot.resync_queued = false;
                let request = slot.sync.resync();
                step(runs, run, &peer, request, false)
            }
            Work::Changes {
                changes,
                lamport,
                source_region,
            } => {
                let remote = RemoteChanges {
                    changes,
                    source_region,
                    lamport: Some(lamport),
                    via: Some(peer.node_id.clone()),
                };
                Box::pin(async move { Finished::Changes(runs.apply_changes(run, remote).await) })
            }
            Work::SendFull => {
                let (region, max_frame) = (self.config.region.clone(), self.config.max_frame);
                Box::pin(
                    async move { Finished::Full(whole_run(&runs, run, &region, max_frame).await) },
                )
            }
        };
        ctx.spawn(fut.into_actor(self).map(move |finished, act, ctx| {
            act.finished(run, finished, ctx);
            if catchup {
                act.catchup.active -= 1;
                act.feed_catchup(ctx);
            }
            act.pump(run, ctx);
        }));
    }

    /// Hands a finished piece of work to the run's sync driver and does what it says.
    fn finished(&mut self, run: Uuid, finished: Finished, ctx: &mut Context<Self>) {
        let Some(slot) = self.slots.get_mut(&run) else {
            return;
        };
        slot.busy = false;
        // A deleted run: the peer is told (it keeps the later decision), and this run's work
        // on the link stops; nothing is retried or reported as an error.
        if let Some(t) = finished.gone().cloned() {
            let dropped: Vec<(Work, bool)> = slot.queue.drain(..).collect();
            slot.resync_queued = false;
            if let Finished::Step {
                sent,
                result,
                answered,
            } = finished
            {
                // Keeps the sync state for a later restore (its failures forgotten below).
                let _ = slot
                    .sync
                    .stepped(sent.as_deref(), result, answered, answered);
            }
            slot.sync.progressed();
            for (work, catchup) in dropped {
                self.queued -= 1;
                self.queued_bytes -= work.size();
                if catchup {
                    self.catchup.active -= 1;
                }
            }
            self.send(&tombstone_frame(&t), ctx);
            return self.feed_catchup(ctx);
        }
        let (actions, lamport) = match finished {
            Finished::Step {
                sent,
                result,
                answered,
            } => {
                let lamport = result.as_ref().map_or(0, |r| r.lamport);
                let holds = answered;
                (
                    slot.sync.stepped(sent.as_deref(), result, answered, holds),
                    lamport,
                )
            }
            // Live changes can overtake what they build on (a catch-up still running, a frame
            // lost with a link, a sync message split over frames): they are held back, and a
            // sync round asks for what they need.
            Finished::Changes(result) => (slot.sync.changes_applied(result), 0),
            Finished::Full(Ok(frames)) => {
                slot.sync.progressed();
                for frame in &frames {
                    self.send(frame, ctx);
                }
                return;
            }
            Finished::Full(Err(e)) => {
                return self.reject("apply", e.to_string(), Some(run.to_string()), ctx);
            }
            Finished::Nothing => return,
        };
        for action in actions {
            self.act(run, action, lamport, ctx);
        }
    }

    fn act(&mut self, run: Uuid, action: Action, lamport: u64, ctx: &mut Context<Self>) {
        match action {
            Action::Send(message) => {
                let (region, max_frame) = (&self.config.region, self.config.max_frame);
                match sync_frames(run, region, lamport, message, max_frame) {
                    Ok(frames) => {
                        for frame in &frames {
                            self.send(frame, ctx);
                        }
                    }
                    Err(e) => log::warn!("mesh: run {run}: cannot frame a sync message: {e}"),
                }
            }
            Action::Resync => self.push(run, Work::Resync, false, ctx),
            Action::RetryLater => {
                ctx.run_later(RETRY_AFTER, move |act, ctx| {
                    act.push(run, Work::Resync, false, ctx)
                });
            }
            Action::Refused { reason, .. } | Action::Unreachable(reason) => {
                self.reject("apply", reason, Some(run.to_string()), ctx)
            }
            // Stop answering; the next link starts afresh.
            Action::Paused => log::warn!(
                "mesh: run {run}: sync with {} makes no progress; pausing it until the next link",
                self.peer_label()
            ),
        }
    }

    /// Drops the sync state of runs this link has not touched for a while, saving it for the
    /// next link: a peer that names many runs must not grow this session without bound.
    pub(super) fn evict_idle_slots(&mut self) {
        let Some(peer) = self.peer().cloned() else {
            return;
        };
        let idle: Vec<Uuid> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.busy && s.queue.is_empty() && s.last_used.elapsed() >= SLOT_IDLE)
            .map(|(run, _)| *run)
            .collect();
        let states = idle
            .into_iter()
            .filter_map(|run| Some((run, self.slots.remove(&run)?.sync.state()?.encode())))
            .collect();
        self.mesh.save_sync_states(&peer.node_id, states);
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T>>>;

/// A sync step with the run; a request the driver did not give (a step is out) finishes as
/// nothing to do.
fn step(
    runs: Runs,
    run: Uuid,
    peer: &PeerIdentity,
    request: Option<StepRequest>,
    answered: bool,
) -> BoxFuture<Finished> {
    let (source_region, via) = (peer.region.clone(), peer.node_id.clone());
    Box::pin(async move {
        let Some(StepRequest { state, incoming }) = request else {
            return Finished::Nothing;
        };
        // If the run cannot be reached, the driver keeps a reset of the state sent away.
        let sent = Some(state.clone());
        let step = SyncStep {
            state,
            incoming,
            source_region,
            via,
            client: None,
            author: None,
        };
        let result = runs.sync_step(run, step).await;
        Finished::Step {
            sent,
            result,
            answered,
        }
    })
}

/// The frames that carry a whole run to a peer that lacks it: one `CRDT_FULL_SYNC`, or, when
/// the document is too big for a frame, its changes in order over several `CRDT_SYNC` frames.
async fn whole_run(
    runs: &Runs,
    run: Uuid,
    region: &str,
    max_frame: usize,
) -> Result<Vec<Frame>, RunError> {
    let FullDocument { bytes, lamport } = runs.full_document(run).await?;
    if encoded_len(bytes.len()) <= max_frame {
        return Ok(vec![Frame::CrdtFullSync {
            run_id: run.to_string(),
            source_region: region.to_string(),
            state: protocol::b64(&bytes),
            timestamp: lamport,
        }]);
    }
    let all = runs.changes_since(run, Vec::new()).await?;
    let changes = run_doc::parse_own_changes(&all.changes)?;
    let frames = change_frames(run, region, lamport, &changes, max_frame);
    log::info!(
        "mesh: run {run} saves to {} bytes, over one frame: sending its {} changes in {} frames",
        bytes.len(),
        changes.len(),
        frames.len()
    );
    Ok(frames)
}

/// The frames for one sync-protocol message: one `CRDT_SYNC_MESSAGE`, or, when it is too big
/// for a frame, its changes as `CRDT_SYNC` frames (applied first, in order) and then the
/// message without them.
fn sync_frames(
    run: Uuid,
    region: &str,
    lamport: u64,
    mut message: sync::Message,
    max_frame: usize,
) -> Result<Vec<Frame>, RunError> {
    let size: usize = message.changes.iter().map(<[u8]>::len).sum();
    let mut frames = Vec::new();
    if encoded_len(size) > max_frame {
        let mut changes = Vec::new();
        for chunk in message.changes.iter() {
            // Our own message: a document chunk, or change chunks, re-framed without the
            // bounds meant for what peers send.
            changes.extend(if chunk.len() > 8 && chunk[8] == 0 {
                run_doc::parse_own_document(chunk)?
            } else {
                run_doc::parse_own_changes(chunk)?
            });
        }
        frames = change_frames(run, region, lamport, &changes, max_frame);
        log::info!(
            "mesh: run {run}: a sync message of {size} bytes is over one frame: its {} changes go in {} frames",
            changes.len(),
            frames.len()
        );
        message.changes = sync::ChunkList::empty();
    }
    frames.push(Frame::CrdtSyncMessage {
        run_id: run.to_string(),
        source_region: region.to_string(),
        message: protocol::b64(&message.encode()),
        timestamp: lamport,
    });
    Ok(frames)
}

//! Each run's work on a link, done in order one piece at a time: live changes to apply,
//! sync-protocol steps, whole runs to send. Different runs proceed side by side.

use super::*;

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
struct Done {
    /// The sync state to keep (`None`: start from the saved one next time).
    state: Option<Box<sync::State>>,
    frames: Vec<Frame>,
    /// A live change arrived before what it builds on: a sync round fetches the rest.
    resync: bool,
    /// Why the peer's message was not taken (the link stays up).
    rejected: Option<String>,
    /// Whether changes moved either way (for sync steps; other work counts as moving).
    moved: bool,
    /// The run actor's incarnation that took a sync step.
    incarnation: Option<u64>,
}

/// Peer `ERROR`s for one run that restart its sync; beyond this the run waits for the next link.
pub(super) const MAX_ERROR_RESYNCS: u8 = 3;
/// Sync steps in a row that carry no changes either way before the run's sync is reset: two
/// sides whose heads differ but that send each other nothing would otherwise talk forever.
const MAX_IDLE_ROUNDS: u8 = 6;
/// Resets for a stalled run per link; after them the run waits for the next link.
const MAX_STALL_RESETS: u8 = 2;

pub(super) struct Slot {
    pub(super) state: Option<Box<sync::State>>,
    pub(super) queue: VecDeque<(Work, bool)>,
    pub(super) busy: bool,
    pub(super) error_resyncs: u8,
    pub(super) last_used: Instant,
    /// A `Resync` is queued: more requests for one are the same request.
    pub(super) resync_queued: bool,
    /// Consecutive sync steps that moved nothing either way, and resets made for that.
    pub(super) idle_rounds: u8,
    pub(super) stall_resets: u8,
    /// The run actor incarnation this link's state was last used with.
    pub(super) incarnation: Option<u64>,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            state: None,
            queue: VecDeque::new(),
            busy: false,
            error_resyncs: 0,
            last_used: Instant::now(),
            resync_queued: false,
            idle_rounds: 0,
            stall_resets: 0,
            incarnation: None,
        }
    }
}

/// What both sides last agreed on, and a request that the peer resend whatever we lack.
fn reset_state(state: Option<&sync::State>, saved: Option<Vec<u8>>) -> Box<sync::State> {
    let mut fresh = match state {
        // Kept: the shared heads and what the peer can do (with its capabilities known, the
        // reset is a flag; without, the peer must assume we lost everything and resend it).
        Some(s) => {
            let mut f = s.clone();
            f.sent_hashes.clear();
            f.last_sent_heads.clear();
            f.their_have = None;
            f.their_need = None;
            f.in_flight = false;
            f.have_responded = false;
            f
        }
        None => saved
            .and_then(|b| sync::State::decode(&b).ok())
            .unwrap_or_default(),
    };
    fresh.needs_reset = true;
    Box::new(fresh)
}

impl PeerSession {
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
        let slot = self.slots.entry(run).or_default();
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
        if slot.busy {
            return;
        }
        let Some((work, catchup)) = slot.queue.pop_front() else {
            return;
        };
        self.queued -= 1;
        self.queued_bytes -= work.size();
        slot.busy = true;
        if matches!(work, Work::Resync) {
            slot.resync_queued = false;
        }
        let incoming_step = matches!(work, Work::Step(Some(_)));
        let peer_node = peer.node_id.clone();
        let state = slot.state.take();
        // If the run cannot be reached at all, what to keep instead of the state sent away.
        let fallback = state.as_deref().map(|s| reset_state(Some(s), None));
        let runs = self.runs.clone();
        let region = self.config.region.clone();
        let max_frame = self.config.max_frame;
        let saved = match (&work, &state) {
            (Work::Step(_) | Work::Resync, None) => self.mesh.saved_sync_state(&peer.node_id, run),
            _ => None,
        };
        let fut = async move {
            match work {
                Work::Step(_) | Work::Resync => {
                    let (state, incoming) = match work {
                        Work::Step(incoming) => {
                            // A state kept from an earlier link holds what the peer had then,
                            // so the Bloom filter covers only what changed since.
                            let state = state.unwrap_or_else(|| {
                                Box::new(
                                    saved
                                        .and_then(|b| sync::State::decode(&b).ok())
                                        .unwrap_or_default(),
                                )
                            });
                            (state, incoming)
                        }
                        _ => (reset_state(state.as_deref(), saved), None),
                    };
                    let step = SyncStep {
                        state,
                        incoming,
                        source_region: peer.region.clone(),
                        via: peer.node_id.clone(),
                        client: None,
                    };
                    let reply = runs.sync_step(run, step).await?;
                    if let Some(reason) = reply.error {
                        return Ok(Done {
                            state: Some(reset_state(Some(&reply.state), None)),
                            frames: Vec::new(),
                            resync: false,
                            rejected: Some(reason),
                            moved: true,
                            incarnation: Some(reply.incarnation),
                        });
                    }
                    let moved = reply.applied > 0
                        || reply
                            .outgoing
                            .as_ref()
                            .is_some_and(|m| !m.changes.is_empty());
                    let frames = match reply.outgoing {
                        Some(m) => sync_frames(run, &region, reply.lamport, m, max_frame)?,
                        None => Vec::new(),
                    };
                    Ok(Done {
                        state: Some(reply.state),
                        frames,
                        resync: false,
                        rejected: None,
                        moved,
                        incarnation: Some(reply.incarnation),
                    })
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
                    let result = runs.apply_changes(run, remote).await;
                    // Live changes can overtake what they build on (a catch-up still running,
                    // a frame lost with a link, a sync message split over frames): they are
                    // held back, and a sync round asks for what they need. Another error is
                    // the peer's to hear about; the run's sync state is kept either way.
                    let (resync, rejected) = match result {
                        Ok(outcome) => (outcome.parked > 0, None),
                        Err(RunError::Doc(DocError::MissingDependencies(_))) => (true, None),
                        Err(e) => (false, Some(e.to_string())),
                    };
                    Ok(Done {
                        state,
                        frames: Vec::new(),
                        resync,
                        rejected,
                        moved: true,
                        incarnation: None,
                    })
                }
                Work::SendFull => {
                    let FullDocument { bytes, lamport } = runs.full_document(run).await?;
                    let frames = if encoded_len(bytes.len()) <= max_frame {
                        vec![Frame::CrdtFullSync {
                            run_id: run.to_string(),
                            source_region: region,
                            state: protocol::b64(&bytes),
                            timestamp: lamport,
                        }]
                    } else {
                        // Too big for one frame: its changes, in order, over several.
                        let all = runs.changes_since(run, Vec::new()).await?;
                        let changes = run_doc::parse_own_changes(&all.changes)?;
                        let frames = change_frames(run, &region, lamport, &changes, max_frame);
                        log::info!(
                            "mesh: run {run} saves to {} bytes, over one frame: sending its {} changes in {} frames",
                            bytes.len(),
                            changes.len(),
                            frames.len()
                        );
                        frames
                    };
                    Ok(Done {
                        state,
                        frames,
                        resync: false,
                        rejected: None,
                        moved: true,
                        incarnation: None,
                    })
                }
            }
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(move |result: Result<Done, RunError>, act, ctx| {
                    let (mut state, mut frames, mut resync, rejected, moved, incarnation) =
                        match result {
                            Ok(d) => (
                                d.state,
                                d.frames,
                                d.resync,
                                d.rejected,
                                d.moved,
                                d.incarnation,
                            ),
                            // The run could not take it (storage down, say): the peer must
                            // resend, so the state kept asks it to.
                            Err(e) => (
                                fallback.or_else(|| Some(reset_state(None, None))),
                                Vec::new(),
                                false,
                                Some(e.to_string()),
                                true,
                                None,
                            ),
                        };
                    let mut stalled = false;
                    let mut retry_later = false;
                    if let Some(slot) = act.slots.get_mut(&run) {
                        slot.busy = false;
                        // A new incarnation of the run lost whatever the old one held back
                        // (parked changes): the peer must be asked to resend.
                        if let (Some(now), Some(before)) = (incarnation, slot.incarnation) {
                            if now != before {
                                state = state.map(|s| reset_state(Some(&s), None));
                                resync = true;
                            }
                        }
                        if incarnation.is_some() {
                            slot.incarnation = incarnation;
                        }
                        slot.state = state;
                        if moved && rejected.is_none() {
                            slot.error_resyncs = 0;
                            slot.stall_resets = 0;
                        }
                        if rejected.is_some() && slot.error_resyncs < MAX_ERROR_RESYNCS {
                            // Our side failed to take what the peer sent: ask again, later.
                            slot.error_resyncs += 1;
                            retry_later = true;
                        }
                        if incoming_step {
                            slot.idle_rounds = if moved || frames.is_empty() {
                                // Progress, or the exchange is over.
                                0
                            } else {
                                slot.idle_rounds + 1
                            };
                            if slot.idle_rounds >= MAX_IDLE_ROUNDS {
                                slot.idle_rounds = 0;
                                frames.clear();
                                stalled = true;
                                if slot.stall_resets < MAX_STALL_RESETS {
                                    slot.stall_resets += 1;
                                } else {
                                    // Stop answering; the next link starts afresh.
                                    log::warn!(
                                        "mesh: run {run}: sync with {} makes no progress; pausing it until the next link",
                                        peer_node
                                    );
                                    stalled = false;
                                }
                            }
                        }
                    }
                    if retry_later {
                        ctx.run_later(RETRY_AFTER, move |act, ctx| {
                            act.push(run, Work::Resync, false, ctx)
                        });
                    }
                    for frame in &frames {
                        act.send(frame, ctx);
                    }
                    if let Some(reason) = rejected {
                        act.reject("apply", reason, Some(run.to_string()), ctx);
                    }
                    if resync || stalled {
                        act.push(run, Work::Resync, false, ctx);
                    }
                    if catchup {
                        act.catchup.active -= 1;
                        act.feed_catchup(ctx);
                    }
                    act.pump(run, ctx);
                }),
        );
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
            .filter_map(|run| Some((run, self.slots.remove(&run)?.state?.encode())))
            .collect();
        self.mesh.save_sync_states(&peer.node_id, states);
    }
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

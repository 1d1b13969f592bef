//! `PeerSession`: one actor per mesh link, inbound or outbound alike.
//!
//! It runs the handshake, the heartbeat, and the link's share of syncing: live `CRDT_SYNC`
//! frames in both directions, and on connect a catch-up of every run the two nodes hold —
//! Automerge's sync protocol for runs both have (it sends heads and a Bloom filter, so it costs
//! about what was missed), `CRDT_FULL_SYNC` for runs only this node has. Work for one run is
//! done in order, one step at a time; different runs proceed side by side.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use automerge::{sync, Change};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::directory::{Direction, LinkStats, MeshState, PeerIdentity, SessionHandle};
use super::protocol::{
    self, change_frames, close, encoded_len, Frame, Nonces, Role, PROTOCOL_VERSION,
};
use super::transport::{Inbound, Out};
use super::MeshConfig;
use crate::doc::{parse_changes, parse_document, DocError};
use crate::metrics::Metrics;
use crate::runs::{ApplySync, FullState, GetChanges, PeerSync, RunError, Runs};

/// Runs caught up at once per link; the rest wait their turn.
const CATCHUP_PARALLEL: usize = 8;
/// Run ids per `CRDT_RUNS` frame.
const RUNS_PAGE: i64 = 1000;
/// Work queued per link beyond this means the peer sends faster than we can apply: the link
/// is dropped, and the reconnect's catch-up brings what was missed.
const MAX_QUEUED: usize = 100_000;
const MAX_QUEUED_BYTES: usize = 256 * 1024 * 1024;
/// Frames a peer may send before its handshake is done are small; a larger one is refused
/// before it is parsed.
const MAX_HANDSHAKE_FRAME: usize = 4096;
/// A run's sync state on a link is dropped (saved for the next link) after this long unused.
const SLOT_IDLE: Duration = Duration::from_secs(120);
/// Run ids accepted from one peer's `CRDT_RUNS`.
const MAX_PEER_RUNS: usize = 10_000_000;

/// Tells a link's owner (the connector of an outbound link) how the session went.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum LinkEvent {
    Up,
    Down(Option<String>),
}

/// Syncs one run to the peer now (`register-peer`).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SyncRun(pub Uuid);

/// Closes the link (a slow peer, shutdown).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct CloseLink {
    pub code: u16,
    pub reason: String,
}

enum Work {
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
}

/// Peer `ERROR`s for one run that restart its sync; beyond this the run waits for the next link.
const MAX_ERROR_RESYNCS: u8 = 3;
/// Sync steps in a row that carry no changes either way before the run's sync is reset: two
/// sides whose heads differ but that send each other nothing would otherwise talk forever.
const MAX_IDLE_ROUNDS: u8 = 6;
/// Resets for a stalled run per link; after them the run waits for the next link.
const MAX_STALL_RESETS: u8 = 2;

struct Slot {
    state: Option<Box<sync::State>>,
    queue: VecDeque<(Work, bool)>,
    busy: bool,
    error_resyncs: u8,
    last_used: Instant,
    /// A `Resync` is queued: more requests for one are the same request.
    resync_queued: bool,
    /// Consecutive sync steps that moved nothing either way, and resets made for that.
    idle_rounds: u8,
    stall_resets: u8,
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

struct Hello {
    node_id: String,
    region: String,
    nonce: String,
}

enum Phase {
    Handshake { hello: Option<Hello> },
    Ready(PeerIdentity),
}

#[derive(Default)]
struct Catchup {
    mine: Option<HashMap<Uuid, Option<[u8; 32]>>>,
    /// The peer's runs, with their heads digests where it knows them.
    theirs: HashMap<Uuid, Option<[u8; 32]>>,
    theirs_done: bool,
    started: Option<Instant>,
    todo: VecDeque<(Uuid, Work)>,
    active: usize,
    synced: usize,
    sent_whole: usize,
    unchanged: usize,
    finished: bool,
}

pub struct PeerSession {
    link: u64,
    direction: Direction,
    config: Arc<MeshConfig>,
    mesh: MeshState,
    runs: Runs,
    metrics: Metrics,
    out: mpsc::Sender<Out>,
    shutdown: Option<oneshot::Sender<()>>,
    stats: Arc<LinkStats>,
    owner: Option<Recipient<LinkEvent>>,
    handshake: Option<super::HandshakeSlot>,
    nonce: String,
    phase: Phase,
    last_heard: Instant,
    close_reason: Option<String>,
    slots: HashMap<Uuid, Slot>,
    queued: usize,
    queued_bytes: usize,
    catchup: Catchup,
}

pub struct SessionParts {
    pub link: u64,
    pub direction: Direction,
    pub config: Arc<MeshConfig>,
    pub mesh: MeshState,
    pub runs: Runs,
    pub metrics: Metrics,
    pub out: mpsc::Sender<Out>,
    pub shutdown: oneshot::Sender<()>,
    pub stats: Arc<LinkStats>,
    pub owner: Option<Recipient<LinkEvent>>,
    /// Held while an inbound link is in its handshake.
    pub handshake: Option<super::HandshakeSlot>,
}

impl PeerSession {
    pub fn new(p: SessionParts) -> Self {
        PeerSession {
            link: p.link,
            direction: p.direction,
            config: p.config,
            mesh: p.mesh,
            runs: p.runs,
            metrics: p.metrics,
            out: p.out,
            shutdown: Some(p.shutdown),
            stats: p.stats,
            owner: p.owner,
            handshake: p.handshake,
            nonce: protocol::nonce(),
            phase: Phase::Handshake { hello: None },
            last_heard: Instant::now(),
            close_reason: None,
            slots: HashMap::new(),
            queued: 0,
            queued_bytes: 0,
            catchup: Catchup::default(),
        }
    }

    fn peer(&self) -> Option<&PeerIdentity> {
        match &self.phase {
            Phase::Ready(p) => Some(p),
            Phase::Handshake { .. } => None,
        }
    }

    fn peer_label(&self) -> String {
        match &self.phase {
            Phase::Ready(p) => format!("{} ({})", p.node_id, p.region),
            Phase::Handshake { .. } => format!("link {}", self.link),
        }
    }

    fn send(&mut self, frame: &Frame, ctx: &mut Context<Self>) {
        self.send_text(frame.encode().into(), frame.kind(), ctx);
    }

    /// Queues a frame; a full queue means the peer cannot keep up, so the link is dropped.
    pub(super) fn send_text(&mut self, text: Arc<str>, kind: &str, ctx: &mut Context<Self>) {
        if text.len() > self.config.max_frame {
            // The peer would drop the link on it, again at every reconnect.
            self.metrics
                .sync_failures
                .with_label_values(&["too_large"])
                .inc();
            log::error!(
                "mesh: not sending a {kind} frame of {} bytes to {}: over crdt.mesh.max-frame-bytes",
                text.len(),
                self.peer_label()
            );
            return;
        }
        match self.out.try_send(Out::Text(text)) {
            Ok(()) => {
                self.stats.messages_out.fetch_add(1, Ordering::Relaxed);
                if kind.starts_with("CRDT_") {
                    self.metrics.sync_messages.with_label_values(&["out"]).inc();
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(close::SLOW_PEER, "outgoing queue full".into(), ctx)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => ctx.stop(),
        }
    }

    fn close(&mut self, code: u16, reason: String, ctx: &mut Context<Self>) {
        if self.close_reason.is_none() {
            log::warn!("mesh: closing {}: {reason}", self.peer_label());
            let _ = self.out.try_send(Out::Close(code, reason.clone()));
            self.close_reason = Some(reason);
        }
        ctx.stop();
    }

    /// Rejects one frame: counted, answered with the reason, and the link stays up.
    fn reject(
        &mut self,
        label: &str,
        reason: String,
        run_id: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        self.metrics.sync_failures.with_label_values(&[label]).inc();
        log::warn!(
            "mesh: rejected a frame from {}: {reason}",
            self.peer_label()
        );
        self.send(&Frame::Error { reason, run_id }, ctx);
    }

    fn on_text(&mut self, text: String, ctx: &mut Context<Self>) {
        let frame = match Frame::decode(&text) {
            Ok(f) => f,
            Err(reason) => {
                if matches!(self.phase, Phase::Handshake { .. }) {
                    self.metrics
                        .sync_failures
                        .with_label_values(&["handshake"])
                        .inc();
                    return self.close(close::HANDSHAKE, reason, ctx);
                }
                return self.reject("decode", reason, None, ctx);
            }
        };
        if frame.kind().starts_with("CRDT_") {
            self.metrics.sync_messages.with_label_values(&["in"]).inc();
        }
        let (awaiting_hello, awaiting_auth) = match &self.phase {
            Phase::Handshake { hello } => (hello.is_none(), hello.is_some()),
            Phase::Ready(_) => (false, false),
        };
        match frame {
            Frame::Hello {
                node_id,
                region,
                protocol_version,
                nonce,
            } if awaiting_hello => self.on_hello(
                Hello {
                    node_id,
                    region,
                    nonce,
                },
                protocol_version,
                ctx,
            ),
            Frame::Auth { proof } if awaiting_auth => self.on_auth(&proof, ctx),
            other if awaiting_hello || awaiting_auth => {
                self.metrics
                    .sync_failures
                    .with_label_values(&["handshake"])
                    .inc();
                self.close(
                    close::HANDSHAKE,
                    format!("{} before the handshake finished", other.kind()),
                    ctx,
                );
            }
            frame => self.on_frame(frame, ctx),
        }
    }

    fn on_hello(&mut self, hello: Hello, version: u32, ctx: &mut Context<Self>) {
        if version != PROTOCOL_VERSION {
            return self.close(
                close::PROTOCOL_VERSION,
                format!(
                    "protocol version {version} is not supported (this node speaks {PROTOCOL_VERSION})"
                ),
                ctx,
            );
        }
        if hello.node_id == self.config.node_id {
            return self.close(
                close::SELF_LINK,
                "this link leads back to the same node".into(),
                ctx,
            );
        }
        if !valid_name(&hello.node_id)
            || !valid_name(&hello.region)
            || !(32..=128).contains(&hello.nonce.len())
        {
            return self.close(close::HANDSHAKE, "malformed HELLO".into(), ctx);
        }
        self.phase = Phase::Handshake { hello: Some(hello) };
        // The dialling end proves itself first; the accepting end only after it has checked
        // that proof, so it never signs anything for a stranger.
        if self.role() == Role::Initiator {
            self.send_proof(ctx);
        }
    }

    fn secret(&self) -> &str {
        self.config.secret.as_deref().unwrap_or_default()
    }

    fn role(&self) -> Role {
        match self.direction {
            Direction::Outbound => Role::Initiator,
            Direction::Inbound => Role::Acceptor,
        }
    }

    /// The link's nonces, once the peer's HELLO is in.
    fn nonces(&self) -> Option<(String, String)> {
        let Phase::Handshake { hello: Some(h) } = &self.phase else {
            return None;
        };
        Some(match self.role() {
            Role::Initiator => (self.nonce.clone(), h.nonce.clone()),
            Role::Acceptor => (h.nonce.clone(), self.nonce.clone()),
        })
    }

    fn send_proof(&mut self, ctx: &mut Context<Self>) {
        let Some((initiator, acceptor)) = self.nonces() else {
            return;
        };
        let proof = protocol::prove(
            self.secret(),
            self.role(),
            Nonces {
                initiator: &initiator,
                acceptor: &acceptor,
            },
            &self.config.node_id,
            &self.config.region,
        );
        self.send(&Frame::Auth { proof }, ctx);
    }

    fn on_auth(&mut self, proof: &str, ctx: &mut Context<Self>) {
        let (Phase::Handshake { hello: Some(h) }, Some((initiator, acceptor))) =
            (&self.phase, self.nonces())
        else {
            return;
        };
        let peer = PeerIdentity {
            node_id: h.node_id.clone(),
            region: h.region.clone(),
        };
        let nonces = Nonces {
            initiator: &initiator,
            acceptor: &acceptor,
        };
        if !protocol::verify(
            self.secret(),
            proof,
            self.role().other(),
            nonces,
            &peer.node_id,
            &peer.region,
        ) {
            self.metrics
                .sync_failures
                .with_label_values(&["auth"])
                .inc();
            return self.close(
                close::AUTH_FAILED,
                "authentication failed: the peer does not know the mesh secret".into(),
                ctx,
            );
        }
        if self.role() == Role::Acceptor {
            self.send_proof(ctx);
        }
        self.ready(peer, ctx);
    }

    fn ready(&mut self, peer: PeerIdentity, ctx: &mut Context<Self>) {
        log::info!(
            "mesh: {} link {} to {} ({}) is up",
            match self.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
            self.link,
            peer.node_id,
            peer.region
        );
        let handle = SessionHandle {
            addr: ctx.address(),
            out: self.out.clone(),
            stats: self.stats.clone(),
        };
        if let Some(warning) = self.mesh.link_up(self.link, peer.clone(), handle) {
            log::warn!("mesh: {warning}");
        }
        self.phase = Phase::Ready(peer);
        self.handshake = None;
        if let Some(owner) = &self.owner {
            owner.do_send(LinkEvent::Up);
        }
        self.list_runs(ctx);
    }

    /// Sends the ids of every run this node holds, page by page, and keeps them for catch-up.
    fn list_runs(&mut self, ctx: &mut Context<Self>) {
        self.catchup.started = Some(Instant::now());
        let store = self.runs.store().clone();
        ctx.spawn(
            async move {
                let mut all = Vec::new();
                let mut after = None;
                loop {
                    let page = store.list_runs(after, RUNS_PAGE).await?;
                    after = page.last().copied();
                    let done = (page.len() as i64) < RUNS_PAGE;
                    all.push(page);
                    if done {
                        return Ok(all);
                    }
                }
            }
            .into_actor(self)
            .map(
                |result: Result<Vec<Vec<Uuid>>, crate::store::StoreError>, act, ctx| {
                    let pages = match result {
                        Ok(p) => p,
                        Err(e) => {
                            return act.close(
                                close::HANDSHAKE,
                                format!("cannot list runs for catch-up: {e}"),
                                ctx,
                            )
                        }
                    };
                    let count = pages.len();
                    let mut mine = HashMap::new();
                    for (i, page) in pages.into_iter().enumerate() {
                        let digests: Vec<Option<[u8; 32]>> =
                            page.iter().map(|r| act.runs.digest(*r)).collect();
                        act.send(
                            &Frame::CrdtRuns {
                                run_ids: page.iter().map(Uuid::to_string).collect(),
                                digests: Some(digests.iter().map(|d| d.map(hex::encode)).collect()),
                                done: i + 1 == count,
                            },
                            ctx,
                        );
                        mine.extend(page.into_iter().zip(digests));
                    }
                    act.catchup.mine = Some(mine);
                    act.start_catchup(ctx);
                },
            ),
        );
    }

    fn start_catchup(&mut self, ctx: &mut Context<Self>) {
        let c = &mut self.catchup;
        if !c.theirs_done || c.started.is_none() || !c.todo.is_empty() || c.active > 0 {
            return;
        }
        let Some(mine) = c.mine.take() else { return };
        let mut mine: Vec<(Uuid, Option<[u8; 32]>)> = mine.into_iter().collect();
        mine.sort();
        for (run, digest) in mine {
            match c.theirs.get(&run) {
                // Same heads on both sides: nothing to do, and nothing to load.
                Some(theirs) if digest.is_some() && *theirs == digest => c.unchanged += 1,
                Some(_) => c.todo.push_back((run, Work::Step(None))),
                None => c.todo.push_back((run, Work::SendFull)),
            }
        }
        c.theirs = HashMap::new();
        self.feed_catchup(ctx);
    }

    fn feed_catchup(&mut self, ctx: &mut Context<Self>) {
        while self.catchup.active < CATCHUP_PARALLEL {
            let Some((run, work)) = self.catchup.todo.pop_front() else {
                break;
            };
            match work {
                Work::SendFull => self.catchup.sent_whole += 1,
                _ => self.catchup.synced += 1,
            }
            self.catchup.active += 1;
            self.push(run, work, true, ctx);
        }
        let label = self.peer_label();
        let c = &mut self.catchup;
        if c.todo.is_empty() && c.active == 0 && !c.finished {
            if let Some(started) = c.started {
                c.finished = true;
                log::info!(
                    "mesh: catch-up with {label} sent: {} shared runs syncing, {} sent whole, {} already in sync, in {} ms",
                    c.synced,
                    c.sent_whole,
                    c.unchanged,
                    started.elapsed().as_millis()
                );
            }
        }
    }

    fn push(&mut self, run: Uuid, work: Work, catchup: bool, ctx: &mut Context<Self>) {
        let size = work.size();
        if self.queued >= MAX_QUEUED || self.queued_bytes + size > MAX_QUEUED_BYTES {
            return self.close(
                close::SLOW_PEER,
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
    fn pump(&mut self, run: Uuid, ctx: &mut Context<Self>) {
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
                    let reply = runs
                        .send(
                            run,
                            PeerSync {
                                state,
                                incoming,
                                source_region: peer.region.clone(),
                                via: peer.node_id.clone(),
                            },
                        )
                        .await
                        .and_then(|r| r)?;
                    if let Some(reason) = reply.error {
                        return Ok(Done {
                            state: Some(reset_state(Some(&reply.state), None)),
                            frames: Vec::new(),
                            resync: false,
                            rejected: Some(reason),
                            moved: true,
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
                    })
                }
                Work::Changes {
                    changes,
                    lamport,
                    source_region,
                } => {
                    let result = runs
                        .send(
                            run,
                            ApplySync {
                                changes,
                                source_region,
                                lamport: Some(lamport),
                                via: Some(peer.node_id.clone()),
                            },
                        )
                        .await
                        .and_then(|r| r);
                    // Live changes can overtake what they build on (a catch-up still running,
                    // a frame lost with a link): a sync round fetches it. Another error is the
                    // peer's to hear about; the run's sync state is kept either way.
                    let (resync, rejected) = match result {
                        Ok(_) => (false, None),
                        Err(RunError::Doc(DocError::MissingDependencies(_))) => (true, None),
                        Err(e) => (false, Some(e.to_string())),
                    };
                    Ok(Done {
                        state,
                        frames: Vec::new(),
                        resync,
                        rejected,
                        moved: true,
                    })
                }
                Work::SendFull => {
                    let (bytes, lamport) = runs.send(run, FullState).await.and_then(|r| r)?;
                    let frames = if encoded_len(bytes.len()) <= max_frame {
                        vec![Frame::CrdtFullSync {
                            run_id: run.to_string(),
                            source_region: region,
                            state: protocol::b64(&bytes),
                            timestamp: lamport,
                        }]
                    } else {
                        // Too big for one frame: its changes, in order, over several.
                        let (changes, _, _) = runs
                            .send(run, GetChanges { heads: Vec::new() })
                            .await
                            .and_then(|r| r)?;
                        let changes = parse_changes(&changes)?;
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
                    })
                }
            }
        };
        ctx.spawn(
            fut.into_actor(self)
                .map(move |result: Result<Done, RunError>, act, ctx| {
                    let (state, mut frames, resync, rejected, moved) = match result {
                        Ok(d) => (d.state, d.frames, d.resync, d.rejected, d.moved),
                        // The run could not take it (storage down, say): the peer must resend.
                        Err(e) => (
                            Some(reset_state(None, None)),
                            Vec::new(),
                            false,
                            Some(e.to_string()),
                            true,
                        ),
                    };
                    let mut stalled = false;
                    if let Some(slot) = act.slots.get_mut(&run) {
                        slot.busy = false;
                        slot.state = state;
                        if incoming_step {
                            slot.idle_rounds = if moved { 0 } else { slot.idle_rounds + 1 };
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

    fn on_frame(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        match frame {
            Frame::CrdtSync {
                run_id,
                source_region,
                changes,
                timestamp,
            } => {
                let decoded = protocol::unb64("changes", &changes)
                    .and_then(|b| parse_changes(&b).map_err(|e| e.to_string()));
                self.take_changes(run_id, source_region, timestamp, decoded, ctx);
            }
            Frame::CrdtFullSync {
                run_id,
                source_region,
                state,
                timestamp,
            } => {
                let decoded = protocol::unb64("state", &state)
                    .and_then(|b| parse_document(&b).map_err(|e| e.to_string()));
                self.take_changes(run_id, source_region, timestamp, decoded, ctx);
            }
            Frame::CrdtSyncMessage {
                run_id, message, ..
            } => {
                let Some(run) = self.run_id(&run_id, ctx) else {
                    return;
                };
                match protocol::unb64("message", &message).and_then(|b| {
                    sync::Message::decode(&b).map_err(|e| format!("not a sync message: {e}"))
                }) {
                    Ok(m) => self.push(run, Work::Step(Some(m)), false, ctx),
                    Err(reason) => self.reject("decode", reason, Some(run_id), ctx),
                }
            }
            Frame::CrdtRuns {
                run_ids,
                digests,
                done,
            } => {
                let digests = digests.unwrap_or_default();
                for (i, id) in run_ids.into_iter().enumerate() {
                    let digest = digests
                        .get(i)
                        .and_then(Option::as_deref)
                        .and_then(|d| <[u8; 32]>::try_from(hex::decode(d).ok()?).ok());
                    match Uuid::parse_str(&id) {
                        Ok(run) if self.catchup.theirs.len() < MAX_PEER_RUNS => {
                            self.catchup.theirs.insert(run, digest);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            self.reject("bad_run_id", format!("{id:?} is not a run id"), None, ctx)
                        }
                    }
                }
                if done {
                    self.catchup.theirs_done = true;
                    self.start_catchup(ctx);
                }
            }
            Frame::Error { reason, run_id } => {
                log::warn!(
                    "mesh: {} rejected a frame{}: {reason}",
                    self.peer_label(),
                    run_id
                        .as_deref()
                        .map(|r| format!(" for run {r}"))
                        .unwrap_or_default()
                );
                // The peer lost something we sent for this run: sync it again, a few times.
                let run = run_id.and_then(|r| Uuid::parse_str(&r).ok());
                if let Some(slot) = run.and_then(|r| self.slots.get_mut(&r)) {
                    if slot.error_resyncs < MAX_ERROR_RESYNCS {
                        slot.error_resyncs += 1;
                        if let Some(run) = run {
                            self.push(run, Work::Resync, false, ctx);
                        }
                    }
                }
            }
            other @ (Frame::Hello { .. } | Frame::Auth { .. }) => self.reject(
                "handshake",
                format!("{} after the handshake", other.kind()),
                None,
                ctx,
            ),
        }
    }

    /// Queues the changes a `CRDT_SYNC` or `CRDT_FULL_SYNC` frame carried, or rejects it.
    fn take_changes(
        &mut self,
        run_id: String,
        source_region: String,
        timestamp: u64,
        decoded: Result<Vec<Change>, String>,
        ctx: &mut Context<Self>,
    ) {
        let Some(run) = self.run_id(&run_id, ctx) else {
            return;
        };
        match decoded {
            Ok(changes) => self.push(
                run,
                Work::Changes {
                    changes,
                    lamport: timestamp,
                    source_region: clip(source_region),
                },
                false,
                ctx,
            ),
            Err(reason) => self.reject("decode", reason, Some(run_id), ctx),
        }
    }

    fn run_id(&mut self, text: &str, ctx: &mut Context<Self>) -> Option<Uuid> {
        match Uuid::parse_str(text) {
            Ok(id) => Some(id),
            Err(_) => {
                let shown: String = text.chars().take(64).collect();
                self.reject(
                    "bad_run_id",
                    format!("{shown:?} is not a run id (a UUID)"),
                    Some(shown),
                    ctx,
                );
                None
            }
        }
    }

    /// Drops the sync state of runs this link has not touched for a while, saving it for the
    /// next link: a peer that names many runs must not grow this session without bound.
    fn evict_idle_slots(&mut self) {
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

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let silent = self.last_heard.elapsed();
        if silent >= self.config.peer_timeout {
            return self.close(
                close::TIMEOUT,
                format!("nothing heard for {} ms", silent.as_millis()),
                ctx,
            );
        }
        let now = chrono::Utc::now().timestamp_micros().to_be_bytes();
        let _ = self.out.try_send(Out::Ping(now.to_vec().into()));
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
            changes.extend(crate::doc::parse_changes_or_document(chunk)?);
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

/// Node ids and regions: short and printable.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && !s.chars().any(|c| c.is_control() || c.is_whitespace())
}

fn clip(region: String) -> String {
    if valid_name(&region) && region.len() <= 50 {
        region
    } else {
        "unknown".into()
    }
}

impl Actor for PeerSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if self.config.secret.is_none() {
            return self.close(
                close::NO_SECRET,
                "this node has no mesh secret configured".into(),
                ctx,
            );
        }
        self.send(
            &Frame::Hello {
                node_id: self.config.node_id.clone(),
                region: self.config.region.clone(),
                protocol_version: PROTOCOL_VERSION,
                nonce: self.nonce.clone(),
            },
            ctx,
        );
        ctx.run_interval(self.config.heartbeat, |act, ctx| act.heartbeat(ctx));
        ctx.run_interval(SLOT_IDLE / 4, |act, _| act.evict_idle_slots());
        let limit = self.config.peer_timeout;
        ctx.run_later(limit, move |act, ctx| {
            if act.peer().is_none() {
                act.metrics
                    .sync_failures
                    .with_label_values(&["handshake"])
                    .inc();
                act.close(
                    close::HANDSHAKE,
                    format!("no handshake within {} ms", limit.as_millis()),
                    ctx,
                );
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Dropping the shutdown sender stops the writer, which closes the socket.
        self.shutdown.take();
        if let Phase::Ready(peer) = &self.phase {
            let states = self
                .slots
                .iter()
                .filter_map(|(run, s)| Some((*run, s.state.as_ref()?.encode())))
                .collect();
            self.mesh.save_sync_states(&peer.node_id, states);
            log::info!(
                "mesh: link {} to {} is down{}",
                self.link,
                peer.node_id,
                self.close_reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
        self.mesh.link_down(self.link, self.close_reason.clone());
        if let Some(owner) = &self.owner {
            owner.do_send(LinkEvent::Down(self.close_reason.clone()));
        }
    }
}

impl Handler<Inbound> for PeerSession {
    type Result = ();

    fn handle(&mut self, msg: Inbound, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        self.stats.heard();
        match msg {
            Inbound::Text(text) if self.peer().is_none() && text.len() > MAX_HANDSHAKE_FRAME => {
                self.metrics
                    .sync_failures
                    .with_label_values(&["handshake"])
                    .inc();
                self.close(
                    close::HANDSHAKE,
                    format!("a frame of {} bytes during the handshake", text.len()),
                    ctx,
                )
            }
            Inbound::Text(text) => self.on_text(text, ctx),
            Inbound::Binary(len) => {
                if self.peer().is_none() {
                    return self.close(close::HANDSHAKE, "binary frame in handshake".into(), ctx);
                }
                self.reject(
                    "decode",
                    format!("binary frame of {len} bytes: the mesh protocol is JSON text"),
                    None,
                    ctx,
                )
            }
            Inbound::Pong(bytes) => {
                if let Ok(sent) = <[u8; 8]>::try_from(bytes.as_ref()) {
                    let rtt = chrono::Utc::now().timestamp_micros() - i64::from_be_bytes(sent);
                    if rtt >= 0 {
                        self.stats
                            .rtt_us
                            .store(rtt.max(1) as u64, Ordering::Relaxed);
                    }
                }
            }
            Inbound::Closed(reason) => {
                if self.close_reason.is_none() {
                    self.close_reason = reason.or(Some("connection closed".into()));
                }
                ctx.stop();
            }
        }
    }
}

impl Handler<SyncRun> for PeerSession {
    type Result = ();

    fn handle(&mut self, msg: SyncRun, ctx: &mut Self::Context) {
        if self.peer().is_some() {
            self.push(msg.0, Work::Step(None), false, ctx);
        }
    }
}

impl Handler<CloseLink> for PeerSession {
    type Result = ();

    fn handle(&mut self, msg: CloseLink, ctx: &mut Self::Context) {
        self.close(msg.code, msg.reason, ctx);
    }
}

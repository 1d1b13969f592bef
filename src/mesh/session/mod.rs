//! `PeerSession`: one actor per mesh link, inbound or outbound alike.
//!
//! It runs the handshake, the heartbeat, and the link's share of syncing: live `CRDT_SYNC`
//! frames in both directions, and on connect a catch-up of every run the two nodes hold —
//! Automerge's sync protocol for runs both have (it sends heads and a Bloom filter, so it costs
//! about what was missed), `CRDT_FULL_SYNC` for runs only this node has. Work for one run is
//! done in order, one step at a time; different runs proceed side by side.
//!
//! - `handshake`: HELLO and AUTH, both ways;
//! - `catchup`: on connect, which runs to sync, send whole or skip;
//! - `work`: each run's queue of work on this link, and the sync protocol's steps.

mod catchup;
mod handshake;
mod work;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use automerge::{sync, Change};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::directory::{Direction, LinkStats, MeshState, PeerIdentity, SessionHandle};
use super::presence::{Announcement, PeerPresence, MAX_USERS};
use super::transport::{queue_text, NotQueued};
use super::MeshConfig;
use crate::metrics::Metrics;
use crate::runs::{
    FullDocument, RemoteChanges, RunError, Runs, SyncOutcome, SyncStep, SyncStepReply, Tombstone,
};
use crate::socket::{Inbound, Out, Shutdown};
use run_doc::{decode_sync_message, parse_peer_changes, parse_peer_document};
use run_wire::close;
use run_wire::mesh::{
    self as protocol, change_frames, encoded_len, Frame, Nonces, Role, PROTOCOL_VERSION,
};

use catchup::Catchup;
use work::{Slot, Work, SLOT_IDLE};

/// Frames a peer may send before its handshake is done are small; a larger one is refused
/// before it is parsed.
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 4096;
/// Run ids accepted from one peer's `CRDT_RUNS`.
const MAX_PEER_RUNS: usize = 10_000_000;
/// How far ahead of this node's clock a peer's deletion decision may be dated: a later one
/// would win over every decision made here until then.
const MAX_DECISION_SKEW_MS: i64 = 24 * 3600 * 1000;

/// The frame that tells a peer of a run's deletion (or restore); `on_frame` reads it back.
pub(crate) fn tombstone_frame(t: &Tombstone) -> Frame {
    Frame::RunTombstone {
        run_id: t.run_id.to_string(),
        deleted: t.deleted,
        decided_at: t.decided_at,
        region: t.region.clone(),
        by: t.by.clone(),
    }
}

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

struct Hello {
    node_id: String,
    region: String,
    nonce: String,
}

enum Phase {
    Handshake { hello: Option<Hello> },
    Ready(PeerIdentity),
}

pub struct PeerSession {
    link: u64,
    direction: Direction,
    config: Arc<MeshConfig>,
    mesh: MeshState,
    runs: Runs,
    metrics: Metrics,
    out: mpsc::Sender<Out>,
    shutdown: Option<Shutdown>,
    stats: Arc<LinkStats>,
    owner: Option<Recipient<LinkEvent>>,
    handshake: Option<crate::admission::PreAuthSlot>,
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
    pub shutdown: Shutdown,
    pub stats: Arc<LinkStats>,
    pub owner: Option<Recipient<LinkEvent>>,
    /// Held while an inbound link is in its handshake.
    pub handshake: Option<crate::admission::PreAuthSlot>,
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
        let len = text.len();
        let queued = queue_text(
            &self.out,
            &self.stats,
            &self.metrics,
            self.config.max_frame,
            text,
            kind.starts_with("CRDT_"),
        );
        match queued {
            Ok(()) => {}
            Err(NotQueued::TooLarge) => log::error!(
                "mesh: not sending a {kind} frame of {len} bytes to {}: over crdt.mesh.max-frame-bytes",
                self.peer_label()
            ),
            Err(NotQueued::Full) => self.close(close::TOO_SLOW, "outgoing queue full".into(), ctx),
            Err(NotQueued::Closed) => ctx.stop(),
        }
    }

    fn close(&mut self, code: u16, reason: String, ctx: &mut Context<Self>) {
        if self.close_reason.is_none() {
            // A node stopping closes its links: that is no trouble worth a warning.
            let level = match code {
                close::GOING_AWAY => log::Level::Info,
                _ => log::Level::Warn,
            };
            log::log!(level, "mesh: closing {}: {reason}", self.peer_label());
            let _ = self.out.try_send(Out::Close(code, reason.clone()));
            self.close_reason = Some(reason);
        }
        ctx.stop();
    }

    /// Refuses the link: counted under `label` in `crdt_sync_failures_total`, then closed.
    fn refuse(&mut self, label: &str, code: u16, reason: String, ctx: &mut Context<Self>) {
        self.metrics.sync_failures.with_label_values(&[label]).inc();
        self.close(code, reason, ctx);
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
                    return self.refuse("handshake", close::HANDSHAKE, reason, ctx);
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
            other if awaiting_hello || awaiting_auth => self.refuse(
                "handshake",
                close::HANDSHAKE,
                format!("{} before the handshake finished", other.kind()),
                ctx,
            ),
            frame => self.on_frame(frame, ctx),
        }
    }
}

impl PeerSession {
    fn on_frame(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        match frame {
            Frame::CrdtSync {
                run_id,
                source_region,
                changes,
                timestamp,
            } => {
                let decoded = protocol::unb64("changes", &changes)
                    .and_then(|b| parse_peer_changes(&b).map_err(|e| e.to_string()));
                self.take_changes(run_id, source_region, timestamp, decoded, ctx);
            }
            Frame::CrdtFullSync {
                run_id,
                source_region,
                state,
                timestamp,
            } => {
                let decoded = protocol::unb64("state", &state)
                    .and_then(|b| parse_peer_document(&b).map_err(|e| e.to_string()));
                self.take_changes(run_id, source_region, timestamp, decoded, ctx);
            }
            Frame::CrdtSyncMessage {
                run_id, message, ..
            } => self.on_sync_message(run_id, &message, ctx),
            Frame::CrdtRuns {
                run_ids,
                digests,
                done,
            } => self.on_runs(run_ids, digests.unwrap_or_default(), done, ctx),
            Frame::Presence {
                run_id,
                origin,
                region,
                epoch,
                seq,
                users,
            } => {
                let Some(run) = self.run_id(&run_id, ctx) else {
                    return;
                };
                let announcement = Announcement {
                    run_id: run,
                    origin,
                    region,
                    epoch,
                    seq,
                    users,
                };
                self.on_presence(announcement, run_id, ctx);
            }
            Frame::RunTombstone {
                run_id,
                deleted,
                decided_at,
                region,
                by,
            } => {
                let Some(run) = self.run_id(&run_id, ctx) else {
                    return;
                };
                let tombstone = Tombstone {
                    run_id: run,
                    deleted,
                    decided_at,
                    region,
                    by,
                    purged: false,
                };
                self.on_tombstone(tombstone, ctx);
            }
            Frame::Error { reason, run_id } => self.on_peer_error(&reason, run_id, ctx),
            other @ (Frame::Hello { .. } | Frame::Auth { .. }) => self.reject(
                "handshake",
                format!("{} after the handshake", other.kind()),
                None,
                ctx,
            ),
        }
    }

    /// A step of the sync protocol for one run.
    fn on_sync_message(&mut self, run_id: String, message: &str, ctx: &mut Context<Self>) {
        let Some(run) = self.run_id(&run_id, ctx) else {
            return;
        };
        match protocol::unb64("message", message)
            .and_then(|b| decode_sync_message(&b).map_err(|e| format!("not a sync message: {e}")))
        {
            Ok(m) => self.push(run, Work::Step(Some(m)), false, ctx),
            Err(reason) => self.reject("decode", reason, Some(run_id), ctx),
        }
    }

    /// A page of the peer's runs, for catch-up.
    fn on_runs(
        &mut self,
        run_ids: Vec<String>,
        digests: Vec<Option<String>>,
        done: bool,
        ctx: &mut Context<Self>,
    ) {
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
                Err(_) => self.reject("bad_run_id", format!("{id:?} is not a run id"), None, ctx),
            }
        }
        if done {
            self.catchup.theirs_done = true;
            self.start_catchup(ctx);
        }
    }

    /// Another node's viewers of a run: checked, then relayed.
    fn on_presence(&mut self, a: Announcement, run_id: String, ctx: &mut Context<Self>) {
        let bad = !run_doc::rules::is_node_id(&a.origin)
            || !run_doc::rules::is_region(&a.region)
            || a.users.len() > MAX_USERS
            || a.users.iter().any(|u| !valid_user(&u.user));
        if bad {
            return self.reject(
                "presence",
                "PRESENCE with a bad origin, region or user".into(),
                Some(run_id),
                ctx,
            );
        }
        let from = self.peer().map(|p| p.node_id.clone());
        self.relay_presence(a, from);
    }

    /// Another region's decision about a run's deletion: checked, then taken (the run's actor
    /// keeps the later decision and, if it is new here, the broadcaster relays it onwards).
    fn on_tombstone(&mut self, t: Tombstone, ctx: &mut Context<Self>) {
        let latest = chrono::Utc::now().timestamp_millis() + MAX_DECISION_SKEW_MS;
        let bad = !run_doc::rules::is_region(&t.region)
            || t.by.as_deref().is_some_and(|b| !valid_user(b))
            || !(0..=latest).contains(&t.decided_at);
        if bad {
            return self.reject(
                "tombstone",
                "RUN_TOMBSTONE with a bad region, user or time".into(),
                Some(t.run_id.to_string()),
                ctx,
            );
        }
        let Some(via) = self.peer().map(|p| p.node_id.clone()) else {
            return;
        };
        let runs = self.runs.clone();
        let (run, theirs) = (t.run_id, t.clone());
        let taken = async move { runs.take_tombstone(t, via).await };
        ctx.spawn(
            taken
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    // Ours is later: the peer gets it back (a region that missed a restore learns of
                    // it so; a peer that takes it then holds the same, so this cannot loop).
                    Ok(ours) if !ours.same_decision(&theirs) => {
                        act.send(&tombstone_frame(&ours), ctx)
                    }
                    Ok(_) => {}
                    // The peer tells us again with its next frame about the run.
                    Err(e) => {
                        log::warn!("mesh: run {run}: cannot take a peer's deletion decision: {e}")
                    }
                }),
        );
    }

    /// The peer refused a frame of ours.
    fn on_peer_error(&mut self, reason: &str, run_id: Option<String>, ctx: &mut Context<Self>) {
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
        if let Some(run) = run {
            if self.slot(run).sync.peer_error().is_some() {
                self.push(run, Work::Resync, false, ctx);
            }
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

impl PeerSession {
    /// Delivers a new presence announcement to this node's subscriber and passes it on to the
    /// other peer nodes; one already seen goes nowhere.
    fn relay_presence(&mut self, a: Announcement, from: Option<String>) {
        if a.origin == self.config.node_id || !self.mesh.presence().is_new(&a) {
            return;
        }
        let except = [from.as_deref().unwrap_or(""), a.origin.as_str()];
        a.send(&self.mesh, &self.metrics, self.config.max_frame, &except);
        self.mesh.presence().notify(PeerPresence::Update {
            run_id: a.run_id,
            origin: a.origin,
            region: a.region,
            stamp: (a.epoch, a.seq),
            users: a.users,
        });
    }
}

/// A user name in a presence announcement: what the browser edge accepts.
fn valid_user(s: &str) -> bool {
    run_doc::rules::name("user", Some(s)).is_ok()
}

fn clip(region: String) -> String {
    if run_doc::rules::is_region(&region) {
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
        // An inbound link has a short while to prove itself; a dialled one as long as a
        // silent peer (the acceptor's HELLO may be slow to come over a long link).
        let limit = match self.handshake {
            Some(_) => self.config.handshake_timeout.min(self.config.peer_timeout),
            None => self.config.peer_timeout,
        };
        ctx.run_later(limit, move |act, ctx| {
            if act.peer().is_none() {
                act.refuse(
                    "handshake",
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
                .filter_map(|(run, s)| Some((*run, s.sync.state()?.encode())))
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
                self.refuse(
                    "handshake",
                    close::HANDSHAKE,
                    format!("a frame of {} bytes during the handshake", text.len()),
                    ctx,
                )
            }
            Inbound::Text(text) => self.on_text(text, ctx),
            Inbound::Binary(bytes) => {
                let len = bytes.len();
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
            // A fresh round: a plain step on a state that believes it is in sync sends nothing.
            self.push(msg.0, Work::Resync, false, ctx);
        }
    }
}

impl Handler<CloseLink> for PeerSession {
    type Result = ();

    fn handle(&mut self, msg: CloseLink, ctx: &mut Self::Context) {
        self.close(msg.code, msg.reason, ctx);
    }
}

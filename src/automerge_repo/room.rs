//! `DocRoom`: one actor per run with automerge-repo clients on this node.
//!
//! Each connection has its own Automerge sync state here, created when it opens the document
//! (so a reconnect always starts afresh). A connection takes one sync step at a time through
//! the run's actor, which applies what the client sent, logs it, and answers once what the
//! reply shows is durable; messages that arrive meanwhile wait in order, and the next step
//! takes them all (up to `MAX_STEP_MESSAGES`, and a frame's worth of changes). After every
//! commit to the run (from any door) each connection takes one more step, which sends it what
//! it lacks, if anything. A client asking for a run that has nothing stored is offered the
//! run's genesis (nothing is stored for that), so its first write creates the run.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use automerge::sync;
use uuid::Uuid;

use super::session::RepoSession;
use super::Shared;
use crate::edge_kit::Kick;
use crate::runs::{BadInput, RunError, SyncStep, SyncStepReply};
use crate::socket::{Outbox, Queued};
use crate::sync_driver::{Action, PeerKind, SyncDriver};
use run_wire::automerge_repo::doc_id;
use run_wire::automerge_repo::wire::{Ephemeral, ToClient};
use run_wire::close;

pub struct Member {
    pub peer_id: String,
    /// The user its changes record: a user token's `sub`, else the peer id.
    pub user: String,
    /// A user token's `sub`: its changes must keep the run's authorship rules for it. None for
    /// the service credential.
    pub author: Option<String>,
    pub outbox: Outbox,
    pub session: Addr<RepoSession>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct AddMember(pub u64, pub Member);

#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveMember(pub u64);

#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseRoom;

/// Something was committed to the run.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunCommitted;

/// A `sync` or `request` from a connection (the run answers both alike: whether the client
/// has the document shows in the message's heads).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Incoming {
    pub conn: u64,
    pub message: sync::Message,
}

/// An `ephemeral` message for the document's other connections.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Relay {
    pub conn: u64,
    pub message: Ephemeral,
}

struct Peer {
    member: Member,
    /// This client's sync of the run (its state is with the run's actor during a step).
    sync: SyncDriver,
    inbox: VecDeque<sync::Message>,
    /// The run changed since this peer's last step began.
    dirty: bool,
    /// The run refused what this peer sent for it (its document is not this run): its
    /// messages for the run are dropped until it reconnects; its other documents go on.
    refused: bool,
}

/// Sync messages one connection may have waiting for its run: a client sending faster than
/// its changes commit is closed (it resyncs when it reconnects) rather than buffered forever.
const MAX_INBOX: usize = 256;

/// Most waiting messages of one connection taken in one step.
const MAX_STEP_MESSAGES: usize = 32;

/// The messages of the next step: the oldest always, then more while they number at most
/// [`MAX_STEP_MESSAGES`] and their changes add up to at most one frame's worth (`max_frame`),
/// so a step handed to another pod stays within what one message could make it.
fn take_step(inbox: &mut VecDeque<sync::Message>, max_frame: usize) -> Vec<sync::Message> {
    let size = |m: &sync::Message| m.changes.iter().map(|c| c.len()).sum::<usize>();
    let mut taken = Vec::new();
    let mut bytes = 0;
    while let Some(next) = inbox.front() {
        let more = size(next);
        if !taken.is_empty() && (taken.len() >= MAX_STEP_MESSAGES || bytes + more > max_frame) {
            break;
        }
        bytes += more;
        taken.extend(inbox.pop_front());
    }
    taken
}

pub struct DocRoom {
    run_id: Uuid,
    document_id: String,
    shared: Arc<Shared>,
    peers: HashMap<u64, Peer>,
    /// When peers were last stepped for commits, and whether a step is scheduled.
    last_push: Option<Instant>,
    push_scheduled: bool,
}

impl DocRoom {
    pub(super) fn new(run_id: Uuid, shared: Arc<Shared>) -> Self {
        DocRoom {
            run_id,
            document_id: doc_id::encode(run_id),
            shared,
            peers: HashMap::new(),
            last_push: None,
            push_scheduled: false,
        }
    }

    fn push_all(&mut self, ctx: &mut Context<Self>) {
        self.last_push = Some(Instant::now());
        let conns: Vec<u64> = self.peers.keys().copied().collect();
        for conn in conns {
            self.pump(conn, ctx);
        }
    }

    /// Queues a message for one connection; a full queue (in messages or bytes) means the
    /// client is too far behind: it is closed, and resyncs from what both sides hold when it
    /// reconnects. Ephemeral messages are dropped instead once the queue is three-quarters
    /// full: a chatty peer's cursors must not close a slower one, nor fill its memory.
    fn send(shared: &Shared, peer: &Peer, message: ToClient<'_>) {
        let kind = message.kind();
        let droppable = match &message {
            ToClient::Ephemeral { message, .. } => {
                // Checked before encoding: a dropped message costs no copy.
                if peer.member.outbox.behind(message.data.len()) {
                    shared.count("ephemeral_dropped", "out");
                    return;
                }
                true
            }
            _ => false,
        };
        match peer.member.outbox.binary(message.encode(), droppable) {
            Queued::Sent => shared.count(kind, "out"),
            Queued::Dropped => shared.count("ephemeral_dropped", "out"),
            Queued::TooSlow => peer.member.session.do_send(Kick::too_slow()),
            Queued::Closed => {}
        }
    }

    fn unavailable(shared: &Shared, peer: &Peer, document_id: &str) {
        let message = ToClient::DocUnavailable {
            sender_id: &shared.config.peer_id,
            target_id: &peer.member.peer_id,
            document_id,
        };
        Self::send(shared, peer, message);
    }

    /// Starts the peer's next sync step, if it has one due and none in flight.
    fn pump(&mut self, conn: u64, ctx: &mut Context<Self>) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        if peer.refused || peer.sync.stepping() || (peer.inbox.is_empty() && !peer.dirty) {
            return;
        }
        // Any step replies with all the run holds by then: it covers the pending push.
        peer.dirty = false;
        // Everything that arrived while the last step was made durable, in one step (each
        // message still judged on its own): a client writing faster than one commit per
        // message is answered once per commit instead of falling behind.
        let incoming = take_step(&mut peer.inbox, self.shared.config.max_frame);
        // Whether a message came, and whether the latest says the client holds the document.
        let answered = !incoming.is_empty();
        let holds = incoming.last().is_some_and(|m| !m.heads.is_empty());
        let Some(request) = peer.sync.step(incoming) else {
            return;
        };
        let msg = SyncStep {
            state: request.state,
            incoming: request.incoming,
            source_region: self.shared.config.region.clone(),
            via: format!("automerge-repo:{}", peer.member.peer_id),
            client: Some(peer.member.user.clone()),
            author: peer.member.author.clone(),
        };
        let (runs, run_id) = (self.shared.runs.clone(), self.run_id);
        let step = async move { runs.sync_step(run_id, msg).await };
        ctx.spawn(step.into_actor(self).map(move |result, act, ctx| {
            act.stepped(conn, answered, holds, result);
            act.pump(conn, ctx);
        }));
    }

    /// Hands a finished step to the peer's sync driver and does what it says.
    fn stepped(
        &mut self,
        conn: u64,
        answered: bool,
        holds: bool,
        result: Result<SyncStepReply, RunError>,
    ) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        if let Err(RunError::Deleted(_)) = result {
            // The document is gone: the client is told so, and what it sent is dropped. Its
            // next message asks again (answered once a restore brings the run back).
            let _ = peer.sync.stepped(None, result, answered, holds);
            peer.inbox.clear();
            Self::unavailable(&self.shared, peer, &self.document_id);
            return;
        }
        // The database out of reach, or the run's actor restarting: nothing the client sent
        // is lost (it still holds it), and a reconnect resyncs.
        let label = match &result {
            Err(RunError::Unavailable(_)) => "unavailable",
            Err(RunError::Busy(_)) => "busy",
            _ => "run_error",
        };
        for action in peer.sync.stepped(None, result, answered, holds) {
            match action {
                Action::Send(out) => Self::send(
                    &self.shared,
                    peer,
                    ToClient::Sync {
                        sender_id: &self.shared.config.peer_id,
                        target_id: &peer.member.peer_id,
                        document_id: &self.document_id,
                        data: out.encode(),
                    },
                ),
                // The run was reloaded between steps: this peer's sync starts afresh.
                Action::Resync => peer.dirty = true,
                Action::Unreachable(e) => {
                    log::warn!(
                        "automerge-repo: run {}: sync with {} failed: {e}",
                        self.run_id,
                        peer.member.peer_id
                    );
                    peer.member.session.do_send(Kick {
                        code: close::TRY_AGAIN_LATER,
                        reason: format!("{e}; reconnect to resume"),
                        label,
                    });
                }
                Action::Refused { reason, bad_input } => {
                    Self::refused(&self.shared, peer, &self.document_id, reason, bad_input)
                }
                // A client's failures close it or stop the document; it resyncs on reconnect.
                Action::RetryLater | Action::Paused => {}
            }
        }
    }

    /// What the client sent was refused (what came before it is logged); its messages for
    /// this document are ignored until it reconnects.
    fn refused(
        shared: &Shared,
        peer: &mut Peer,
        document_id: &str,
        error: String,
        bad_input: Option<BadInput>,
    ) {
        peer.refused = true;
        peer.inbox.clear();
        log::warn!(
            "automerge-repo: {}: sync for {document_id} refused: {error}",
            peer.member.peer_id,
        );
        shared.count("refused", "in");
        match bad_input {
            // Bytes that are malformed or would cost more than a message may: the client is
            // told why and closed, as a WebSocket refuses an oversized or broken message.
            Some(bad) => {
                let (code, label) = match bad {
                    BadInput::TooLarge => (close::TOO_BIG, "too_large"),
                    BadInput::Malformed => (close::PROTOCOL, "bad_message"),
                    BadInput::Forbidden => (close::FORBIDDEN, "forbidden"),
                };
                peer.member.session.do_send(Kick {
                    code,
                    reason: error,
                    label,
                });
            }
            // Most likely a document of the client's own under this id (`repo.create()`),
            // which does not build on the run: only this document stops, the client's others
            // go on.
            None => Self::unavailable(shared, peer, document_id),
        }
    }
}

impl Actor for DocRoom {
    type Context = Context<Self>;
}

impl Handler<AddMember> for DocRoom {
    type Result = ();

    fn handle(&mut self, AddMember(conn, member): AddMember, _ctx: &mut Self::Context) {
        self.peers.insert(
            conn,
            Peer {
                member,
                sync: SyncDriver::new(PeerKind::Client, None),
                inbox: VecDeque::new(),
                dirty: false,
                refused: false,
            },
        );
    }
}

impl Handler<RemoveMember> for DocRoom {
    type Result = ();

    fn handle(&mut self, RemoveMember(conn): RemoveMember, _ctx: &mut Self::Context) {
        self.peers.remove(&conn);
    }
}

impl Handler<CloseRoom> for DocRoom {
    type Result = ();

    fn handle(&mut self, _: CloseRoom, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Incoming> for DocRoom {
    type Result = ();

    fn handle(&mut self, msg: Incoming, ctx: &mut Self::Context) {
        let Some(peer) = self.peers.get_mut(&msg.conn) else {
            return;
        };
        if peer.refused {
            return;
        }
        if peer.inbox.len() >= MAX_INBOX {
            peer.inbox.clear();
            peer.member.session.do_send(Kick {
                code: close::TOO_SLOW,
                reason: format!("more than {MAX_INBOX} sync messages waiting for the run"),
                label: "too_fast",
            });
            return;
        }
        peer.inbox.push_back(msg.message);
        self.pump(msg.conn, ctx);
    }
}

impl Handler<RunCommitted> for DocRoom {
    type Result = ();

    /// Every peer is due a step. The first commit after a quiet spell goes out at once; the
    /// ones that follow within `push-delay` go together in the next step: one message per
    /// peer carries them all, which spares the clients (each message costs a JS client a
    /// sync round) and the run.
    fn handle(&mut self, _: RunCommitted, ctx: &mut Self::Context) {
        for peer in self.peers.values_mut() {
            peer.dirty = true;
        }
        if self.push_scheduled {
            return;
        }
        let delay = self.shared.config.push_delay;
        let wait = self
            .last_push
            .map_or(Duration::ZERO, |t| delay.saturating_sub(t.elapsed()));
        if wait.is_zero() {
            self.push_all(ctx);
        } else {
            self.push_scheduled = true;
            ctx.run_later(wait, |act, ctx| {
                act.push_scheduled = false;
                act.push_all(ctx);
            });
        }
    }
}

impl Handler<Relay> for DocRoom {
    type Result = ();

    fn handle(&mut self, msg: Relay, _ctx: &mut Self::Context) {
        for (conn, peer) in &self.peers {
            if *conn != msg.conn {
                Self::send(
                    &self.shared,
                    peer,
                    ToClient::Ephemeral {
                        message: &msg.message,
                        target_id: &peer.member.peer_id,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(change_bytes: usize) -> sync::Message {
        sync::Message {
            heads: vec![],
            need: vec![],
            have: vec![],
            changes: vec![vec![0; change_bytes]].into(),
            flags: None,
            version: sync::MessageVersion::V1,
        }
    }

    fn sizes(step: &[sync::Message]) -> Vec<usize> {
        step.iter()
            .map(|m| m.changes.iter().map(|c| c.len()).sum())
            .collect()
    }

    #[test]
    fn a_step_takes_what_waited_up_to_a_count_and_a_frame() {
        let mut inbox: VecDeque<_> = (0..40).map(|_| message(10)).collect();
        assert_eq!(take_step(&mut inbox, 1_000).len(), MAX_STEP_MESSAGES);
        assert_eq!(take_step(&mut inbox, 1_000).len(), 8);
        assert!(take_step(&mut inbox, 1_000).is_empty());

        let mut inbox: VecDeque<_> = [400, 500, 200, 50].map(message).into();
        assert_eq!(sizes(&take_step(&mut inbox, 1_000)), vec![400, 500]);
        assert_eq!(sizes(&take_step(&mut inbox, 1_000)), vec![200, 50]);
        // One message past a frame's worth still goes, alone.
        let mut inbox: VecDeque<_> = [2_000, 10].map(message).into();
        assert_eq!(sizes(&take_step(&mut inbox, 1_000)), vec![2_000]);
        assert_eq!(sizes(&take_step(&mut inbox, 1_000)), vec![10]);
    }
}

//! The hub: which connection speaks for each peer id (the newest `join` wins), and the one
//! place rooms are started and stopped, so a connection opening a document never meets a room
//! that is stopping. Committed changes are routed to the room of their run.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use uuid::Uuid;

use super::room::{AddMember, CloseRoom, DocRoom, Member, RemoveMember, RunCommitted};
use super::session::RepoSession;
use super::Shared;
use crate::edge_kit::{Kick, Rooms};
use crate::runs::{RunChanged, RunTombstoned, Watched};
use run_wire::close;

/// A connection joined as `peer_id`; an older connection of the same peer is closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub peer_id: String,
    pub conn: u64,
    pub session: Addr<RepoSession>,
}

/// A connection is gone: it leaves its peer id (if still its own) and its rooms.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub peer_id: String,
    pub conn: u64,
    pub runs: Vec<Uuid>,
}

/// A connection opens a document: it joins (or starts) the run's room.
#[derive(Message)]
#[rtype(result = "Addr<DocRoom>")]
pub struct Open {
    pub run_id: Uuid,
    pub conn: u64,
    pub member: Member,
}

pub struct Hub {
    shared: Arc<Shared>,
    peers: HashMap<String, (u64, Addr<RepoSession>)>,
    rooms: Rooms<Addr<DocRoom>>,
    /// Rooms are spread over these threads: one busy document does not hold up the others.
    arbiters: Vec<ArbiterHandle>,
}

impl Hub {
    pub(super) fn new(shared: Arc<Shared>, arbiters: Vec<ArbiterHandle>, watched: Watched) -> Self {
        Hub {
            shared,
            peers: HashMap::new(),
            rooms: Rooms::watching(watched),
            arbiters,
        }
    }
}

impl Actor for Hub {
    type Context = Context<Self>;
}

impl Handler<Register> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Register, _ctx: &mut Self::Context) {
        if let Some((old, session)) = self.peers.insert(msg.peer_id, (msg.conn, msg.session)) {
            if old != msg.conn {
                session.do_send(Kick {
                    code: close::REPLACED,
                    reason: "replaced by a newer connection of the same peer".into(),
                    label: "replaced",
                });
            }
        }
    }
}

impl Handler<Unregister> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _ctx: &mut Self::Context) {
        if self
            .peers
            .get(&msg.peer_id)
            .is_some_and(|(conn, _)| *conn == msg.conn)
        {
            self.peers.remove(&msg.peer_id);
        }
        for run_id in msg.runs {
            let Some((room, last)) = self.rooms.leave(run_id) else {
                continue;
            };
            room.do_send(RemoveMember(msg.conn));
            if last {
                room.do_send(CloseRoom);
            }
        }
    }
}

impl Handler<Open> for Hub {
    type Result = MessageResult<Open>;

    fn handle(&mut self, msg: Open, _ctx: &mut Self::Context) -> Self::Result {
        let (shared, arbiters) = (&self.shared, &self.arbiters);
        let room = self.rooms.join(msg.run_id, |generation| {
            let arbiter = &arbiters[(generation as usize) % arbiters.len()];
            let (run_id, shared) = (msg.run_id, shared.clone());
            DocRoom::start_in_arbiter(arbiter, move |_| DocRoom::new(run_id, shared))
        });
        room.do_send(AddMember(msg.conn, msg.member));
        MessageResult(room.clone())
    }
}

impl Handler<RunChanged> for Hub {
    type Result = ();

    fn handle(&mut self, msg: RunChanged, _ctx: &mut Self::Context) {
        if let Some(room) = self.rooms.get(msg.run_id) {
            room.do_send(RunCommitted);
        }
    }
}

/// A deleted run's room steps every peer, and each learns the document is unavailable.
impl Handler<RunTombstoned> for Hub {
    type Result = ();

    fn handle(&mut self, msg: RunTombstoned, _ctx: &mut Self::Context) {
        if let Some(room) = self.rooms.get(msg.tombstone.run_id) {
            room.do_send(RunCommitted);
        }
    }
}

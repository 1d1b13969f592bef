//! The hub: the one place rooms are started and stopped, so a session joining a run never
//! meets a room that is stopping. It routes committed changes and the mesh's presence to the
//! rooms of the runs they concern.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use uuid::Uuid;

use super::room::{
    AddMember, Announce, Changed, CloseRoom, Member, PresenceChanged, RemoveMember, RunRoom,
};
use super::session::BrowserSession;
use super::Shared;
use crate::edge_kit::Rooms;
use crate::presence::PeerPresence;
use crate::runs::{RunChanged, RunTombstoned, Watched};
use crate::socket::Outbox;

/// How often expired presence announcements are swept.
const SWEEP: Duration = Duration::from_secs(5);

#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub run_id: Uuid,
    pub id: u64,
    pub session: Addr<BrowserSession>,
    pub outbox: Outbox,
    pub user: String,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub run_id: Uuid,
    pub id: u64,
}

pub struct Hub {
    shared: Arc<Shared>,
    rooms: Rooms<Addr<RunRoom>>,
    /// Rooms are spread over these threads: a big run's state encoding must not hold up the
    /// fan-out of every other run.
    arbiters: Vec<ArbiterHandle>,
}

impl Hub {
    pub fn new(shared: Arc<Shared>, arbiters: Vec<ArbiterHandle>, watched: Watched) -> Self {
        Hub {
            shared,
            rooms: Rooms::watching(watched),
            arbiters,
        }
    }

    fn presence_changed(&self, runs: &[Uuid]) {
        for run in runs {
            if let Some(room) = self.rooms.get(*run) {
                room.do_send(PresenceChanged);
            }
        }
    }
}

impl Actor for Hub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every committed change of a run with a room passes through here; all come by
        // `do_send`, which the mailbox capacity does not limit.
        ctx.run_interval(SWEEP, |act, _| {
            let changed = act.shared.book.expire(Instant::now());
            act.presence_changed(&changed);
        });
    }
}

impl Handler<Join> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Join, _ctx: &mut Self::Context) {
        let (shared, arbiters) = (&self.shared, &self.arbiters);
        let room = self.rooms.join(msg.run_id, |generation| {
            // The generation keeps one closing room from overwriting its successor's presence.
            let (run, shared) = (msg.run_id, shared.clone());
            let arbiter = &arbiters[(generation as usize) % arbiters.len()];
            RunRoom::start_in_arbiter(arbiter, move |_| RunRoom::new(run, generation, shared))
        });
        room.do_send(AddMember(
            msg.id,
            Member {
                session: msg.session,
                outbox: msg.outbox,
                user: msg.user,
            },
        ));
    }
}

impl Handler<Leave> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Leave, _ctx: &mut Self::Context) {
        let Some((room, last)) = self.rooms.leave(msg.run_id) else {
            return;
        };
        room.do_send(RemoveMember(msg.id));
        if last {
            room.do_send(CloseRoom);
        }
    }
}

impl Handler<RunChanged> for Hub {
    type Result = ();

    fn handle(&mut self, msg: RunChanged, _ctx: &mut Self::Context) {
        if let Some(room) = self.rooms.get(msg.run_id) {
            room.do_send(Changed);
        }
    }
}

/// A deleted run's room reads the state, is told the run is gone and closes its sessions.
impl Handler<RunTombstoned> for Hub {
    type Result = ();

    fn handle(&mut self, msg: RunTombstoned, _ctx: &mut Self::Context) {
        if let Some(room) = self.rooms.get(msg.tombstone.run_id) {
            room.do_send(Changed);
        }
    }
}

impl Handler<PeerPresence> for Hub {
    type Result = ();

    fn handle(&mut self, msg: PeerPresence, _ctx: &mut Self::Context) {
        match msg {
            PeerPresence::Update {
                run_id,
                origin,
                region,
                stamp,
                users,
            } => {
                if self
                    .shared
                    .book
                    .set_remote(run_id, &origin, &region, stamp, users)
                {
                    self.presence_changed(&[run_id]);
                }
            }
            PeerPresence::NodeDown(node) => {
                let changed = self.shared.book.forget_node(&node);
                self.presence_changed(&changed);
            }
            PeerPresence::NodeUp(_) => {
                for room in self.rooms.all() {
                    room.do_send(Announce);
                }
            }
        }
    }
}

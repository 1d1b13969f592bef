//! The hub: the one place rooms are started and stopped, so a session joining a run never
//! meets a room that is stopping. It routes committed changes and the mesh's presence to the
//! rooms of the runs they concern.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use uuid::Uuid;

use super::room::{
    AddMember, Announce, Changed, CloseRoom, Member, PresenceChanged, RemoveMember, RunRoom,
};
use super::session::BrowserSession;
use super::Shared;
use crate::presence::PeerPresence;
use crate::runs::RunChanged;
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

struct Room {
    addr: Addr<RunRoom>,
    members: usize,
}

pub struct Hub {
    shared: Arc<Shared>,
    rooms: HashMap<Uuid, Room>,
    /// Rooms are spread over these threads: a big run's state encoding must not hold up the
    /// fan-out of every other run.
    arbiters: Vec<ArbiterHandle>,
    next_room: u64,
}

impl Hub {
    pub fn new(shared: Arc<Shared>, arbiters: Vec<ArbiterHandle>) -> Self {
        Hub {
            shared,
            rooms: HashMap::new(),
            arbiters,
            next_room: 0,
        }
    }

    fn presence_changed(&self, runs: &[Uuid]) {
        for run in runs {
            if let Some(room) = self.rooms.get(run) {
                room.addr.do_send(PresenceChanged);
            }
        }
    }
}

impl Actor for Hub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every committed change of every run passes through here; all come by `do_send`,
        // which the mailbox capacity does not limit.
        ctx.run_interval(SWEEP, |act, _| {
            let changed = act.shared.book.expire(Instant::now());
            act.presence_changed(&changed);
        });
    }
}

impl Handler<Join> for Hub {
    type Result = ();

    fn handle(&mut self, msg: Join, _ctx: &mut Self::Context) {
        let room = match self.rooms.entry(msg.run_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // Each room a new generation: one closing never overwrites its successor's
                // presence.
                self.next_room += 1;
                let (run, generation) = (msg.run_id, self.next_room);
                let shared = self.shared.clone();
                let arbiter = &self.arbiters[(generation as usize) % self.arbiters.len()];
                let addr = RunRoom::start_in_arbiter(arbiter, move |_| {
                    RunRoom::new(run, generation, shared)
                });
                e.insert(Room { addr, members: 0 })
            }
        };
        room.members += 1;
        room.addr.do_send(AddMember(
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
        let Some(room) = self.rooms.get_mut(&msg.run_id) else {
            return;
        };
        room.addr.do_send(RemoveMember(msg.id));
        room.members = room.members.saturating_sub(1);
        if room.members == 0 {
            room.addr.do_send(CloseRoom);
            self.rooms.remove(&msg.run_id);
        }
    }
}

impl Handler<RunChanged> for Hub {
    type Result = ();

    fn handle(&mut self, msg: RunChanged, _ctx: &mut Self::Context) {
        if let Some(room) = self.rooms.get(&msg.run_id) {
            room.addr.do_send(Changed);
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
                for room in self.rooms.values() {
                    room.addr.do_send(Announce);
                }
            }
        }
    }
}

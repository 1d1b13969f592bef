//! What the client-facing WebSocket edges (browser sessions, automerge-repo connections) share:
//! the door (admission of unproven sockets, a bounded count of open ones, closing them all when
//! the node stops), each session's socket (heartbeat, join timeout, close with a code, a reason
//! and a counted label), the [`Kick`] a room or hub sends a session, and the registry of rooms
//! (one per run, spread over threads, closed when their last member leaves).
//!
//! An edge keeps only its protocol: what a frame means, what joining proves, what a room does.

mod door;
mod rooms;
mod session;

pub use door::{Admitted, Door, NotAdmitted, Seat};
pub use rooms::Rooms;
pub use session::{EdgeSession, EdgeSocket, Timing};

use actix::prelude::*;

use crate::runs::{RunChanged, RunTombstoned, Runs, Watched};

/// Starts an edge's hub on a thread of its own, with a thread per core for its rooms (`make`
/// gets them, and the set of runs with a room, for its [`Rooms`]), subscribed to the committed
/// changes of the runs with a room and to every deletion and restore.
pub fn start_hub<H>(
    runs: &Runs,
    make: impl FnOnce(Vec<ArbiterHandle>, Watched) -> H + Send + 'static,
) -> Addr<H>
where
    H: Actor<Context = Context<H>> + Handler<RunChanged> + Handler<RunTombstoned>,
{
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rooms = (0..threads).map(|_| Arbiter::new().handle()).collect();
    let watched = Watched::default();
    let with_rooms = watched.clone();
    let hub = H::start_in_arbiter(&Arbiter::new().handle(), move |_| make(rooms, with_rooms));
    runs.subscribe_watched(hub.clone().recipient(), watched);
    runs.subscribe_tombstones(hub.clone().recipient());
    hub
}

/// Tells a session to close (its room: it fell behind or was refused; its hub: replaced).
#[derive(actix::Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct Kick {
    pub code: u16,
    pub reason: String,
    /// The reason's label in the edge's closed-sessions counter.
    pub label: &'static str,
}

impl Kick {
    /// The session's queue is full: it is too far behind, and resyncs when it reconnects.
    pub fn too_slow() -> Kick {
        Kick {
            code: run_wire::close::TOO_SLOW,
            reason: "too far behind: reconnect to resync".into(),
            label: "too_slow",
        }
    }
}

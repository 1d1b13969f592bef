//! Presence between the edges: who views which run. The browser edge knows this node's viewers
//! and announces them; the mesh carries announcements between nodes and reports what its peers
//! announced. Neither imports the other: `node.rs` connects them through what is here.

use actix::prelude::*;
use uuid::Uuid;

pub use run_wire::presence::{PresenceUser, MAX_USERS, PRESENCE_TTL, REFRESH};

/// What the mesh tells its presence subscriber (the browser edge).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum PeerPresence {
    /// A node's current viewers of a run (empty: none left).
    Update {
        run_id: Uuid,
        origin: String,
        region: String,
        /// `(epoch, seq)`: announcements reach the subscriber over several links, so one may
        /// arrive after a newer one.
        stamp: (u64, u64),
        users: Vec<PresenceUser>,
    },
    /// A peer node is no longer connected: forget what it announced.
    NodeDown(String),
    /// A peer node connected: announce this node's viewers to it now.
    NodeUp(String),
}

/// Where an edge announces this node's viewers of a run (the mesh; nothing on a lone node).
pub trait Announce: Send + Sync {
    fn announce(&self, run_id: Uuid, users: Vec<PresenceUser>);
}

/// How many people view a run, in every region: the browser edge counts them, the runs list
/// shows them (the HTTP edge holds this, not the browser edge's internals).
pub trait Viewers: Send + Sync {
    fn viewers(&self, run_id: Uuid) -> u64;
}

//! Two Automerge peers syncing over a lossy, reordering-free channel: what the sync tests of
//! the vendored fixes share.

use std::collections::VecDeque;

use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, AutoCommit};

/// One peer: its document, its sync state for the other, and the messages it has sent that the
/// other has not read yet.
pub struct Peer {
    pub doc: AutoCommit,
    pub state: sync::State,
    pub outbox: VecDeque<Vec<u8>>,
}

impl Peer {
    pub fn new(actor: u8) -> Peer {
        Peer {
            doc: AutoCommit::new().with_actor(ActorId::from(vec![actor; 16])),
            state: sync::State::new(),
            outbox: VecDeque::new(),
        }
    }

    pub fn read(&mut self, bytes: &[u8]) {
        let m = sync::Message::decode(bytes).expect("a message we encoded");
        self.doc
            .sync()
            .receive_sync_message(&mut self.state, m)
            .expect("a message we generated");
    }
}

/// Takes the oldest message in flight towards `a` (or `b`), if any, and delivers it unless it
/// is `lost`. Whether there was one.
pub fn deliver(a: &mut Peer, b: &mut Peer, to_a: bool, lost: bool) -> bool {
    let (from, to) = if to_a { (b, a) } else { (a, b) };
    match from.outbox.pop_front() {
        Some(bytes) => {
            if !lost {
                to.read(&bytes);
            }
            true
        }
        None => false,
    }
}

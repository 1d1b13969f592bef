//! Presence over the mesh: who is viewing which run, in every region. Ephemeral — carried in
//! `PRESENCE` frames, never stored in a document or the log.
//!
//! Each node announces its own viewers of a run when they change, and again every
//! [`REFRESH`] while any remain; receivers drop an announcement not refreshed within
//! [`PRESENCE_TTL`]. An announcement carries its origin node and an `(epoch, seq)` pair that
//! only grows (the epoch is the node's start time), so a node forwards to its other peers only
//! what it had not seen, and a chain A–B–C carries presence as it carries changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use actix::prelude::*;

use uuid::Uuid;

use super::directory::MeshState;
use super::transport::queue_text;
use crate::metrics::Metrics;
use run_wire::mesh::Frame;

pub use crate::presence::PeerPresence;
pub use run_wire::presence::{PresenceUser, MAX_USERS, PRESENCE_TTL, REFRESH};
/// Announcements remembered for deduplication before the memory is cleared.
const MAX_SEEN: usize = 100_000;

/// One announcement as the wire carries it (the `PRESENCE` frame's fields).
#[derive(Debug, Clone)]
pub struct Announcement {
    pub run_id: Uuid,
    pub origin: String,
    pub region: String,
    pub epoch: u64,
    pub seq: u64,
    pub users: Vec<PresenceUser>,
}

impl Announcement {
    fn frame(&self) -> Frame {
        Frame::Presence {
            run_id: self.run_id.to_string(),
            origin: self.origin.clone(),
            region: self.region.clone(),
            epoch: self.epoch,
            seq: self.seq,
            users: self.users.clone(),
        }
    }

    /// Queues the announcement on every connected peer node but those in `except`. Ephemeral:
    /// a peer too slow to take it gets the next refresh instead.
    pub fn send(&self, mesh: &MeshState, metrics: &Metrics, max_frame: usize, except: &[&str]) {
        let mut text: Option<Arc<str>> = None;
        for (node, session) in mesh.primaries() {
            if except.contains(&node.as_str()) {
                continue;
            }
            let text = text.get_or_insert_with(|| self.frame().encode().into());
            let _ = queue_text(
                &session.out,
                &session.stats,
                metrics,
                max_frame,
                text.clone(),
                false,
            );
        }
    }
}

/// The mesh's presence state: the subscriber, this node's sequence and what was seen.
pub struct PresenceRelay {
    subscriber: RwLock<Option<Recipient<PeerPresence>>>,
    epoch: u64,
    seq: AtomicU64,
    seen: Mutex<HashMap<(Uuid, String), (u64, u64)>>,
}

impl Default for PresenceRelay {
    fn default() -> Self {
        PresenceRelay {
            subscriber: RwLock::new(None),
            epoch: u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0),
            seq: AtomicU64::new(0),
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl PresenceRelay {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn subscribe(&self, recipient: Recipient<PeerPresence>) {
        *self.subscriber.write().unwrap_or_else(|p| p.into_inner()) = Some(recipient);
    }

    pub fn notify(&self, event: PeerPresence) {
        let subscriber = self.subscriber.read().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = subscriber.as_ref() {
            s.do_send(event);
        }
    }

    /// The next `(epoch, seq)` for this node's own announcement.
    pub fn next_stamp(&self) -> (u64, u64) {
        (self.epoch, self.seq.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Forgets what was seen from `origin` (its link went down: it may come back restarted,
    /// with a clock that went backwards).
    pub fn forget_origin(&self, origin: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|(_, o), _| o != origin);
    }

    /// Records an announcement; true if it is newer than any seen from its origin for its run
    /// (then it is delivered and forwarded).
    pub fn is_new(&self, a: &Announcement) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let key = (a.run_id, a.origin.clone());
        if seen.get(&key).is_some_and(|last| *last >= (a.epoch, a.seq)) {
            return false;
        }
        if seen.len() >= MAX_SEEN {
            // Losing the memory costs at most one extra forward of each announcement.
            seen.clear();
        }
        seen.insert(key, (a.epoch, a.seq));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(origin: &str, epoch: u64, seq: u64) -> Announcement {
        Announcement {
            run_id: Uuid::nil(),
            origin: origin.into(),
            region: "r".into(),
            epoch,
            seq,
            users: vec![],
        }
    }

    #[test]
    fn only_newer_announcements_pass() {
        let relay = PresenceRelay::default();
        assert!(relay.is_new(&announcement("a", 1, 1)));
        assert!(!relay.is_new(&announcement("a", 1, 1)), "a repeat");
        assert!(relay.is_new(&announcement("a", 1, 2)));
        assert!(!relay.is_new(&announcement("a", 1, 1)), "an older one");
        assert!(relay.is_new(&announcement("b", 1, 1)), "another origin");
        assert!(relay.is_new(&announcement("a", 2, 1)), "a restarted origin");
    }
}

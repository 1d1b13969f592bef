//! The broadcaster: every change committed on this node goes to every connected peer node as
//! `CRDT_SYNC` — except back to the peer that delivered it. Changes a peer delivered are sent
//! on to the others, so a chain A–B–C converges; a change already present was never published
//! (the run actor publishes only what was new), so nothing circulates twice.
//!
//! On a database the region's pods share, one pod pushes to each other region (`carrier`), and
//! a commit another pod made (`Origin::Pod`, no changes carried) is pushed as a sync round for
//! the run, which the owner answers.

use std::sync::Arc;

use actix::prelude::*;

use super::directory::MeshState;
use super::directory::SessionHandle;
use super::session::CloseLink;
use super::session::{tombstone_frame, SyncRun};
use super::transport::{queue_text, NotQueued};
use crate::metrics::Metrics;
use crate::runs::{Origin, RunChanged, RunTombstoned};
use run_wire::close;
use run_wire::mesh::{self as protocol, change_frames, encoded_len, Frame};

pub struct Broadcaster {
    pub mesh: MeshState,
    pub metrics: Metrics,
    pub region: String,
    pub max_frame: usize,
    pub carrier: super::carrier::Carrier,
}

impl Actor for Broadcaster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every committed change of every run passes through here.
        ctx.set_mailbox_capacity(usize::MAX);
    }
}

impl Handler<RunChanged> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: RunChanged, _ctx: &mut Self::Context) {
        let (source_region, via) = match &msg.origin {
            Origin::Local | Origin::Pod => (self.region.as_str(), None),
            Origin::Remote { source_region, via } => (source_region.as_str(), via.as_deref()),
        };
        // One frame, encoded once for every peer; changes too big for one frame (a large sync
        // batch) go over several, in order.
        let mut frames: Option<Vec<Arc<str>>> = None;
        for (peer, session) in self.mesh.primaries_by_region() {
            if Some(peer.node_id.as_str()) == via || !self.carrier.carries(&peer.region) {
                continue;
            }
            if msg.origin == Origin::Pod {
                session.addr.do_send(SyncRun(msg.run_id));
                continue;
            }
            let frames = frames.get_or_insert_with(|| {
                self.frames(&msg, source_region)
                    .iter()
                    .map(|f| Arc::from(f.encode()))
                    .collect()
            });
            for text in frames.iter() {
                if !self.send(&session, text.clone()) {
                    break;
                }
            }
        }
    }
}

/// A run deleted or restored here goes to every connected peer node but the one it came from;
/// after a restore every peer syncs the run again (what a cut-off region wrote meanwhile, it
/// still holds).
impl Handler<RunTombstoned> for Broadcaster {
    type Result = ();

    fn handle(&mut self, msg: RunTombstoned, _ctx: &mut Self::Context) {
        let text: Arc<str> = Arc::from(tombstone_frame(&msg.tombstone).encode());
        for (node_id, session) in self.mesh.primaries() {
            if Some(node_id.as_str()) != msg.via.as_deref() {
                self.send(&session, text.clone());
            }
            if !msg.tombstone.deleted {
                session.addr.do_send(SyncRun(msg.tombstone.run_id));
            }
        }
    }
}

impl Broadcaster {
    fn frames(&self, msg: &RunChanged, source_region: &str) -> Vec<Frame> {
        if encoded_len(msg.changes.len()) <= self.max_frame {
            return vec![Frame::CrdtSync {
                run_id: msg.run_id.to_string(),
                source_region: source_region.to_string(),
                changes: protocol::b64(&msg.changes),
                timestamp: msg.lamport,
            }];
        }
        match run_doc::parse_own_changes(&msg.changes) {
            Ok(changes) => change_frames(
                msg.run_id,
                source_region,
                msg.lamport,
                &changes,
                self.max_frame,
            ),
            Err(e) => {
                log::error!(
                    "mesh: run {}: cannot split committed changes: {e}",
                    msg.run_id
                );
                Vec::new()
            }
        }
    }

    /// Queues one frame for a peer; false when the peer's queue is full (it is then dropped).
    fn send(&self, session: &SessionHandle, text: Arc<str>) -> bool {
        let len = text.len();
        let queued = queue_text(
            &session.out,
            &session.stats,
            &self.metrics,
            self.max_frame,
            text,
            true,
        );
        match queued {
            Ok(()) => true,
            Err(NotQueued::TooLarge) => {
                log::error!("mesh: a change of {len} bytes exceeds crdt.mesh.max-frame-bytes; peers get it only by catch-up");
                true
            }
            // The peer's catch-up on reconnect brings what it misses now.
            Err(NotQueued::Full) => {
                session.addr.do_send(CloseLink {
                    code: close::TOO_SLOW,
                    reason: "outgoing queue full".into(),
                });
                false
            }
            Err(NotQueued::Closed) => false,
        }
    }
}

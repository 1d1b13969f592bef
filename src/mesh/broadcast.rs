//! The broadcaster: every change committed on this node goes to every connected peer node as
//! `CRDT_SYNC` — except back to the peer that delivered it. Changes a peer delivered are sent
//! on to the others, so a chain A–B–C converges; a change already present was never published
//! (the run actor publishes only what was new), so nothing circulates twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc::error::TrySendError;

use super::directory::MeshState;
use super::protocol::{self, close, Frame};
use super::session::CloseLink;
use super::transport::Out;
use crate::metrics::Metrics;
use crate::runs::{Origin, RunChanged};

pub struct Broadcaster {
    pub mesh: MeshState,
    pub metrics: Metrics,
    pub region: String,
    pub max_frame: usize,
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
            Origin::Local => (self.region.as_str(), None),
            Origin::Remote { source_region, via } => (source_region.as_str(), via.as_deref()),
        };
        let mut text: Option<Arc<str>> = None;
        // Base64 grows the changes by a third; a frame over the peers' limit would drop the
        // link. Such a change reaches them through the sync protocol's catch-up instead.
        if msg.changes.len() / 3 * 4 + 512 > self.max_frame {
            self.metrics
                .sync_failures
                .with_label_values(&["too_large"])
                .inc();
            log::error!(
                "mesh: run {}: {} bytes of changes exceed crdt.mesh.max-frame-bytes; not broadcast",
                msg.run_id,
                msg.changes.len()
            );
            return;
        }
        for (node_id, session) in self.mesh.primaries() {
            if Some(node_id.as_str()) == via {
                continue;
            }
            let text = text
                .get_or_insert_with(|| {
                    Frame::CrdtSync {
                        run_id: msg.run_id.to_string(),
                        source_region: source_region.to_string(),
                        changes: protocol::b64(&msg.changes),
                        timestamp: msg.lamport,
                    }
                    .encode()
                    .into()
                })
                .clone();
            match session.out.try_send(Out::Text(text)) {
                Ok(()) => {
                    session.stats.messages_out.fetch_add(1, Ordering::Relaxed);
                    self.metrics.sync_messages.with_label_values(&["out"]).inc();
                }
                // The peer's catch-up on reconnect brings what it misses now.
                Err(TrySendError::Full(_)) => session.addr.do_send(CloseLink {
                    code: close::SLOW_PEER,
                    reason: "outgoing queue full".into(),
                }),
                Err(TrySendError::Closed(_)) => {}
            }
        }
    }
}

//! Browser sessions: people editing a run together, live.
//!
//! - [`protocol`]: the JSON frames of `/ws/runs/{runId}`;
//! - [`session`]: `BrowserSession`, one actor per WebSocket: join, token, mutations, acks;
//! - [`room`]: `RunRoom`, one actor per run with viewers here: pushes the run's state after
//!   every change (fetched once, sent to all) and who is present;
//! - [`hub`]: finds or starts rooms, feeds them committed changes and the mesh's presence;
//! - [`presence`]: who views which run, here and in other regions.
//!
//! Each session's outgoing queue is bounded: a browser that cannot keep up is closed with a
//! reason and resyncs when it reconnects, so it never slows a run or its other viewers down.

mod hub;
pub mod presence;
mod room;
mod session;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use crate::admission::PreAuth;
use crate::config::Settings;
use crate::edge_kit::{Admitted, Door, NotAdmitted, Timing};
use crate::identity::{Auth, Identity};
use crate::metrics::Metrics;
use crate::presence::{Announce, PeerPresence};
use crate::runs::Runs;
use crate::socket::{OutgoingBudget, ReadLimits};
use hub::Hub;
use presence::PresenceBook;
use session::BrowserSession;

#[derive(Debug, Clone)]
pub struct BrowserConfig {
    pub region: String,
    pub node_id: String,
    pub queue: usize,
    pub max_sessions: usize,
    pub max_frame: usize,
    /// Bytes one session may have queued before it counts as too far behind.
    pub queue_bytes: usize,
    /// The heartbeat, and how long a client has to prove itself.
    pub timing: Timing,
    /// Bytes queued for every session of the node, in all.
    pub outgoing: OutgoingBudget,
}

impl BrowserConfig {
    pub fn from_settings(s: &Settings, outgoing: &OutgoingBudget) -> Self {
        let b = &s.crdt.browser;
        BrowserConfig {
            outgoing: outgoing.clone(),
            region: s.crdt.region.clone(),
            node_id: s.node_id().to_string(),
            queue: b.queue_frames,
            max_sessions: b.max_sessions,
            max_frame: b.max_frame_bytes,
            queue_bytes: b.queue_bytes,
            timing: Timing {
                heartbeat: Duration::from_millis(b.heartbeat_ms),
                join_timeout: Duration::from_millis(s.crdt.admission.pre_auth_timeout_ms),
            },
        }
    }
}

/// What sessions, rooms and the hub share.
struct Shared {
    config: BrowserConfig,
    runs: Runs,
    /// Where this node's viewers are announced (the mesh).
    announcer: Arc<dyn Announce>,
    metrics: Metrics,
    book: PresenceBook,
    /// Admission, open sessions, closing them all when the node stops.
    door: Door,
    /// The credentials a session may join with.
    auth: Arc<Auth>,
}

/// The browser edge: cheap to clone.
#[derive(Clone)]
pub struct Browser {
    shared: Arc<Shared>,
    hub: Addr<Hub>,
}

impl Browser {
    /// Starts the hub on a thread of its own and subscribes it to committed changes; this
    /// node's viewers are announced to `announcer`, and [`Browser::peer_presence`] takes what
    /// other nodes announce.
    pub fn start(
        config: BrowserConfig,
        pre_auth: PreAuth,
        runs: Runs,
        announcer: Arc<dyn Announce>,
        auth: Arc<Auth>,
        metrics: Metrics,
    ) -> Self {
        let door = Door::new(
            config.max_sessions,
            metrics.browser_sessions.clone(),
            metrics.browser_closed.clone(),
            pre_auth,
        );
        let shared = Arc::new(Shared {
            config,
            runs: runs.clone(),
            announcer,
            metrics,
            book: PresenceBook::default(),
            door,
            auth,
        });
        let hub = {
            let shared = shared.clone();
            crate::edge_kit::start_hub(&runs, move |rooms, watched| {
                Hub::new(shared, rooms, watched)
            })
        };
        Browser { shared, hub }
    }

    /// Where other nodes' presence is to be delivered.
    pub fn peer_presence(&self) -> Recipient<PeerPresence> {
        self.hub.clone().recipient()
    }

    /// Admits a socket from `address` (see `edge_kit::Door`).
    pub fn admit(&self, address: Option<IpAddr>, proven: bool) -> Result<Admitted, NotAdmitted> {
        self.shared.door.admit(address, proven)
    }

    /// Starts the session of an admitted socket on the current arbiter. `upgraded` is who the
    /// upgrade request's bearer token proved (non-browser clients); a browser joins with a
    /// token in `JOIN`.
    pub fn accept(
        &self,
        (socket, payload, limits): (actix_ws::Session, actix_web::web::Payload, ReadLimits),
        run_id: Uuid,
        admitted: Admitted,
        upgraded: Option<Identity>,
    ) {
        let shared = &self.shared;
        let config = &shared.config;
        let (edge, io) = shared.door.socket(config.queue, admitted, config.timing);
        let parts = session::Parts {
            run_id,
            shared: shared.clone(),
            hub: self.hub.clone(),
            upgraded,
        };
        let session = BrowserSession::new(parts, edge).start();
        crate::socket::serve(socket, payload, limits, session.recipient(), io);
    }

    /// The largest message a joined session may send.
    pub fn max_frame(&self) -> usize {
        self.shared.config.max_frame
    }

    /// Open sessions on the run, in every region.
    pub fn viewers(&self, run_id: Uuid) -> u64 {
        self.shared.book.count(run_id)
    }

    /// Closes every session ("going away") and refuses new ones: the node is stopping.
    pub fn close(&self) {
        self.shared.door.close();
    }
}

impl crate::presence::Viewers for Browser {
    fn viewers(&self, run_id: Uuid) -> u64 {
        Browser::viewers(self, run_id)
    }
}

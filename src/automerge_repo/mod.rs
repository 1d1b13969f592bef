//! automerge-repo clients: any `@automerge/automerge-repo` peer (browser or Node) syncs runs
//! directly over `/ws/automerge`, as it would with the reference sync server.
//!
//! - [`wire`]: the CBOR messages (`join`/`peer`, `request`/`sync`, `doc-unavailable`,
//!   `ephemeral`, `error`);
//! - [`doc_id`]: a run's document id is its UUID in bs58check, `automerge:<id>` its URL;
//! - [`session`]: `RepoSession`, one actor per connection: handshake, token, routing;
//! - [`room`]: `DocRoom`, one actor per run with clients here: each connection's own sync
//!   state, sync steps through the run's actor, live pushes after every commit, ephemeral relay;
//! - [`hub`]: peer ids (a second `join` with one id replaces the first connection) and rooms.
//!
//! A client's change is an ordinary run change: the run's actor applies it, logs it and
//! answers only once it is durable; it then reaches the mesh, browser sessions and the other
//! clients like any other. Close codes: 4001 refused token, 4002 protocol error, 4008 silent,
//! 4009 too far behind, 1001 node stopping, 1013 database unavailable (retry later).

mod hub;
mod room;
mod session;

use crate::socket::{OutgoingBudget, ReadLimits};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::admission::PreAuth;
use crate::config::Settings;
use crate::edge_kit::{Admitted, Door, NotAdmitted, Timing};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::runs::Runs;
use hub::Hub;
use session::RepoSession;

#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub region: String,
    /// This node's automerge-repo peer id.
    pub peer_id: String,
    pub queue: usize,
    pub max_connections: usize,
    pub max_frame: usize,
    pub max_documents: usize,
    /// Commits to a run within this long of the last push reach its clients in one message.
    pub push_delay: Duration,
    /// Bytes one connection may have queued (see `queue`).
    pub queue_bytes: usize,
    /// The heartbeat, and how long a client has to prove itself.
    pub timing: Timing,
    /// Bytes queued for every session of the node, in all.
    pub outgoing: OutgoingBudget,
}

impl RepoConfig {
    pub fn from_settings(s: &Settings, outgoing: &OutgoingBudget) -> Self {
        let a = &s.crdt.automerge;
        RepoConfig {
            outgoing: outgoing.clone(),
            region: s.crdt.region.clone(),
            peer_id: format!("crdt-node:{}", s.node_id()),
            queue: a.queue_frames,
            max_connections: a.max_connections,
            max_frame: a.max_frame_bytes,
            max_documents: a.max_documents,
            push_delay: Duration::from_millis(a.push_delay_ms),
            queue_bytes: a.queue_bytes,
            timing: Timing {
                heartbeat: Duration::from_millis(a.heartbeat_ms),
                join_timeout: Duration::from_millis(s.crdt.admission.pre_auth_timeout_ms),
            },
        }
    }
}

/// What connections, rooms and the hub share.
struct Shared {
    config: RepoConfig,
    runs: Runs,
    metrics: Metrics,
    /// Admission, open connections, closing them all when the node stops.
    door: Door,
}

impl Shared {
    fn count(&self, kind: &str, direction: &str) {
        self.metrics
            .repo_messages
            .with_label_values(&[kind, direction])
            .inc();
    }
}

/// The automerge-repo edge: cheap to clone.
#[derive(Clone)]
pub struct AutomergeRepo {
    shared: Arc<Shared>,
    hub: Addr<Hub>,
}

impl AutomergeRepo {
    /// Starts the hub on a thread of its own, rooms on one thread per core, and subscribes
    /// the hub to committed changes.
    pub fn start(config: RepoConfig, pre_auth: PreAuth, runs: Runs, metrics: Metrics) -> Self {
        let door = Door::new(
            config.max_connections,
            metrics.repo_sessions.clone(),
            metrics.repo_closed.clone(),
            pre_auth,
        );
        let shared = Arc::new(Shared {
            config,
            runs: runs.clone(),
            metrics,
            door,
        });
        let hub = {
            let shared = shared.clone();
            crate::edge_kit::start_hub(&runs, move |rooms, watched| {
                Hub::new(shared, rooms, watched)
            })
        };
        AutomergeRepo { shared, hub }
    }

    /// Admits a socket from `address` (see `edge_kit::Door`).
    pub fn admit(&self, address: Option<IpAddr>, proven: bool) -> Result<Admitted, NotAdmitted> {
        self.shared.door.admit(address, proven)
    }

    /// Starts the session of an admitted socket. `identity` is who the upgrade's token proved,
    /// or why it proved no one (then the client's `join` is refused with the reason).
    pub fn accept(
        &self,
        (socket, payload, limits): (actix_ws::Session, actix_web::web::Payload, ReadLimits),
        admitted: Admitted,
        identity: Result<Identity, String>,
    ) {
        let shared = &self.shared;
        let config = &shared.config;
        let (edge, io) = shared.door.socket(config.queue, admitted, config.timing);
        let parts = session::Parts {
            shared: shared.clone(),
            hub: self.hub.clone(),
            identity,
        };
        let session = RepoSession::new(parts, edge).start();
        crate::socket::serve(socket, payload, limits, session.recipient(), io);
    }

    /// The largest message a joined connection may send.
    pub fn max_frame(&self) -> usize {
        self.shared.config.max_frame
    }

    /// Closes every connection ("going away") and refuses new ones: the node is stopping.
    pub fn close(&self) {
        self.shared.door.close();
    }
}

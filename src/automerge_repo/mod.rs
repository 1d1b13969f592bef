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

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::admission::{PreAuth, PreAuthSlot, Refused};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::runs::Runs;
use hub::Hub;
use session::RepoSession;

#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub region: String,
    /// This node's automerge-repo peer id.
    pub peer_id: String,
    pub token: Option<String>,
    pub queue: usize,
    pub max_connections: usize,
    pub heartbeat: Duration,
    pub max_frame: usize,
    pub max_documents: usize,
    /// Commits to a run within this long of the last push reach its clients in one message.
    pub push_delay: Duration,
    /// Bytes one connection may have queued (see `queue`).
    pub queue_bytes: usize,
    /// How long a connection has to `join`.
    pub join_timeout: Duration,
}

impl RepoConfig {
    pub fn from_settings(s: &Settings) -> Self {
        let a = &s.crdt.automerge;
        RepoConfig {
            region: s.crdt.region.clone(),
            peer_id: format!("crdt-node:{}", s.node_id()),
            token: s.crdt.api.token.clone(),
            queue: a.queue_frames,
            max_connections: a.max_connections,
            heartbeat: Duration::from_millis(a.heartbeat_ms),
            max_frame: a.max_frame_bytes,
            max_documents: a.max_documents,
            push_delay: Duration::from_millis(a.push_delay_ms),
            queue_bytes: a.queue_bytes,
            join_timeout: Duration::from_millis(s.crdt.admission.pre_auth_timeout_ms),
        }
    }
}

/// What connections, rooms and the hub share.
struct Shared {
    config: RepoConfig,
    runs: Runs,
    metrics: Metrics,
    open: AtomicUsize,
    /// Connections that have not joined yet (see `admission`).
    pre_auth: PreAuth,
    next_id: AtomicU64,
    /// Set when the node stops: every connection closes ("going away").
    closing: tokio::sync::watch::Sender<bool>,
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

/// Holds one place among the node's open connections until dropped.
pub struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.repo_sessions.dec();
    }
}

impl AutomergeRepo {
    /// Starts the hub on a thread of its own, rooms on one thread per core, and subscribes
    /// the hub to committed changes.
    pub fn start(config: RepoConfig, pre_auth: PreAuth, runs: Runs, metrics: Metrics) -> Self {
        let shared = Arc::new(Shared {
            config,
            runs: runs.clone(),
            metrics,
            open: AtomicUsize::new(0),
            pre_auth,
            next_id: AtomicU64::new(1),
            closing: tokio::sync::watch::Sender::new(false),
        });
        let hub = {
            let shared = shared.clone();
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            let rooms = (0..threads).map(|_| Arbiter::new().handle()).collect();
            Hub::start_in_arbiter(&Arbiter::new().handle(), move |_| Hub::new(shared, rooms))
        };
        runs.subscribe(hub.clone().recipient());
        AutomergeRepo { shared, hub }
    }

    /// A place among the connections that have not joined yet, for one from `address`.
    pub fn pre_auth(&self, address: Option<IpAddr>) -> Result<PreAuthSlot, Refused> {
        self.shared.pre_auth.admit(address)
    }

    /// A place for one more connection, if the node has room and is not stopping.
    pub fn slot(&self) -> Option<ConnectionSlot> {
        if *self.shared.closing.borrow() {
            return None;
        }
        let taken = self.shared.open.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.repo_sessions.inc();
        let slot = ConnectionSlot(self.shared.clone());
        (taken < self.shared.config.max_connections).then_some(slot)
    }

    /// Starts the session of an accepted socket. `authorized` when the upgrade carried the
    /// API token (or none is configured); otherwise the client's `join` is refused.
    pub fn accept(
        &self,
        socket: actix_ws::Session,
        stream: actix_ws::MessageStream,
        slot: ConnectionSlot,
        pre_auth: PreAuthSlot,
        authorized: bool,
    ) {
        let config = &self.shared.config;
        let (io, out, shutdown) = crate::socket::channels(config.queue);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let session = RepoSession::new(
            session::Parts {
                id,
                shared: self.shared.clone(),
                hub: self.hub.clone(),
                out,
                _slot: slot,
                pre_auth: Some(pre_auth),
                authorized,
            },
            shutdown,
        )
        .start();
        crate::socket::serve(socket, stream, config.max_frame, session.recipient(), io);
    }

    /// Closes every connection ("going away") and refuses new ones: the node is stopping.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
    }
}

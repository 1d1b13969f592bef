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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use crate::admission::{PreAuth, PreAuthSlot, Refused};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::presence::{Announce, PeerPresence};
use crate::runs::Runs;
use hub::Hub;
use presence::PresenceBook;
use session::BrowserSession;

#[derive(Debug, Clone)]
pub struct BrowserConfig {
    pub region: String,
    pub node_id: String,
    pub token: Option<String>,
    pub queue: usize,
    pub max_sessions: usize,
    pub heartbeat: Duration,
    pub max_frame: usize,
    /// Bytes one session may have queued before it counts as too far behind.
    pub queue_bytes: usize,
    /// How long a session has to JOIN.
    pub join_timeout: Duration,
}

impl BrowserConfig {
    pub fn from_settings(s: &Settings) -> Self {
        let b = &s.crdt.browser;
        BrowserConfig {
            region: s.crdt.region.clone(),
            node_id: s.node_id().to_string(),
            token: s.crdt.api.token.clone(),
            queue: b.queue_frames,
            max_sessions: b.max_sessions,
            heartbeat: Duration::from_millis(b.heartbeat_ms),
            max_frame: b.max_frame_bytes,
            queue_bytes: b.queue_bytes,
            join_timeout: Duration::from_millis(s.crdt.admission.pre_auth_timeout_ms),
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
    open: AtomicUsize,
    /// Connections that have not joined yet (see `admission`).
    pre_auth: PreAuth,
    next_id: AtomicU64,
    /// Set when the node stops: every session closes ("going away"), new ones are refused.
    closing: tokio::sync::watch::Sender<bool>,
}

/// The browser edge: cheap to clone.
#[derive(Clone)]
pub struct Browser {
    shared: Arc<Shared>,
    hub: Addr<Hub>,
}

/// Holds one place among the node's open sessions until dropped.
pub struct SessionSlot(Arc<Shared>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.browser_sessions.dec();
    }
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
        metrics: Metrics,
    ) -> Self {
        let shared = Arc::new(Shared {
            config,
            runs: runs.clone(),
            announcer,
            metrics,
            book: PresenceBook::default(),
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
        Browser { shared, hub }
    }

    /// Where other nodes' presence is to be delivered.
    pub fn peer_presence(&self) -> Recipient<PeerPresence> {
        self.hub.clone().recipient()
    }

    /// A place among the sessions that have not joined yet, for one from `address`.
    pub fn pre_auth(&self, address: Option<IpAddr>) -> Result<PreAuthSlot, Refused> {
        self.shared.pre_auth.admit(address)
    }

    /// A place for one more session, if the node has room and is not stopping.
    pub fn session_slot(&self) -> Option<SessionSlot> {
        if *self.shared.closing.borrow() {
            return None;
        }
        let taken = self.shared.open.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.browser_sessions.inc();
        let slot = SessionSlot(self.shared.clone());
        (taken < self.shared.config.max_sessions).then_some(slot)
    }

    /// Starts the session of an accepted socket on the current arbiter. `authorized` when the
    /// upgrade request already carried the API token (non-browser clients).
    pub fn accept(
        &self,
        socket: actix_ws::Session,
        stream: actix_ws::MessageStream,
        run_id: Uuid,
        slot: SessionSlot,
        pre_auth: PreAuthSlot,
        authorized: bool,
    ) {
        let config = &self.shared.config;
        let (io, out, shutdown) = crate::socket::channels(config.queue);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let session = BrowserSession::new(
            session::Parts {
                id,
                run_id,
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

    /// Open sessions on the run, in every region.
    pub fn viewers(&self, run_id: Uuid) -> u64 {
        self.shared.book.count(run_id)
    }

    /// Closes every session ("going away") and refuses new ones: the node is stopping.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
    }
}

//! The mesh between regions: WebSocket links to peer nodes, over which every run converges.
//!
//! - [`protocol`]: the frames and the handshake;
//! - [`transport`]: a link's socket as two tasks, for inbound (actix-ws) and outbound (awc);
//! - [`session`]: `PeerSession`, one actor per link: handshake, heartbeat, sync and catch-up;
//! - [`connector`]: keeps each configured peer connected, with back-off;
//! - [`broadcast`]: sends every committed change to the connected peers;
//! - [`directory`]: links, their health, `register-peer` registrations;
//! - [`presence`]: who views which run, relayed between nodes, never stored.

pub mod broadcast;
pub mod carrier;
pub mod connector;
pub mod directory;
pub mod presence;
pub mod session;
pub mod transport;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

pub use directory::{Direction, MeshState, MAX_REGIONS_PER_RUN};
pub(crate) use session::MAX_HANDSHAKE_FRAME;

use crate::admission::{PreAuth, PreAuthSlot, Refused};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::runs::Runs;
use session::{PeerSession, SessionParts, SyncRun};

/// What links need to know of the configuration.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub node_id: String,
    pub region: String,
    pub secret: Option<String>,
    /// Also accepted in a peer's proof (during a rotation).
    pub accept_secret: Option<String>,
    pub heartbeat: Duration,
    pub peer_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub max_frame: usize,
    /// Unproven inbound links one address may hold.
    pub pre_auth_per_address: usize,
    /// How long an inbound link has to finish its handshake.
    pub handshake_timeout: Duration,
}

impl MeshConfig {
    pub fn from_settings(s: &Settings) -> Self {
        let m = &s.crdt.mesh;
        MeshConfig {
            node_id: s.node_id().to_string(),
            region: s.crdt.region.clone(),
            secret: m.secret.clone(),
            accept_secret: m.accept_secret.clone(),
            heartbeat: Duration::from_millis(m.heartbeat_ms),
            peer_timeout: Duration::from_millis(m.peer_timeout_ms),
            reconnect_min: Duration::from_millis(m.reconnect_min_ms),
            reconnect_max: Duration::from_millis(m.reconnect_max_ms),
            max_frame: m.max_frame_bytes,
            pre_auth_per_address: s.crdt.admission.pre_auth_per_address,
            handshake_timeout: Duration::from_millis(s.crdt.admission.pre_auth_timeout_ms),
        }
    }
}

/// Inbound links allowed to be in their handshake at once: each may hold a frame's worth of
/// memory before it has proved anything.
const MAX_PENDING_HANDSHAKES: usize = 64;

/// The running mesh: cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    state: MeshState,
    pub config: Arc<MeshConfig>,
    runs: Runs,
    metrics: Metrics,
    handshakes: PreAuth,
}

impl Mesh {
    /// Subscribes the broadcaster to the runtime and starts a connector per configured peer.
    pub fn start(config: MeshConfig, peers: &[String], runs: Runs, metrics: Metrics) -> Self {
        let state = MeshState::new(
            &config.node_id,
            &config.region,
            metrics.peers_connected.clone(),
        );
        let handshakes = PreAuth::new(
            MAX_PENDING_HANDSHAKES,
            config.pre_auth_per_address,
            MAX_PENDING_HANDSHAKES / 2,
        );
        let config = Arc::new(config);
        let carrier = match runs.ownership() {
            Some(ownership) => {
                carrier::Carrier::start(state.clone(), ownership.clone(), runs.clone())
            }
            None => carrier::Carrier::default(),
        };
        let broadcaster = broadcast::Broadcaster {
            mesh: state.clone(),
            metrics: metrics.clone(),
            region: config.region.clone(),
            max_frame: config.max_frame,
            carrier,
        }
        .start();
        runs.subscribe(broadcaster.clone().recipient());
        runs.subscribe_tombstones(broadcaster.recipient());
        for url in peers {
            let connector = connector::Connector::new(
                url.clone(),
                config.clone(),
                state.clone(),
                runs.clone(),
                metrics.clone(),
            );
            // Each connector on its own thread: its links' reading and writing stay off the
            // HTTP workers.
            Connector::start_in_arbiter(&Arbiter::new().handle(), move |_| connector);
        }
        Mesh {
            state,
            config,
            runs,
            metrics,
            handshakes,
        }
    }

    /// Whether an inbound upgrade request carries a valid proof of the mesh secret (see
    /// `run_wire::mesh::UPGRADE_PROOF_HEADER`): such a socket skips the handshake pool.
    pub fn proven_upgrade(&self, header: Option<&str>) -> bool {
        let Some(header) = header else { return false };
        let now = connector::unix_ms();
        [&self.config.secret, &self.config.accept_secret]
            .into_iter()
            .flatten()
            .any(|secret| run_wire::mesh::verify_upgrade(secret, header, now))
    }

    /// A place for one more inbound handshake from `address`, if there is room.
    pub fn handshake_slot(&self, address: Option<IpAddr>) -> Result<PreAuthSlot, Refused> {
        self.handshakes.admit(address)
    }

    /// Starts the session of an inbound link (the `/ws` route) on the current arbiter.
    pub fn accept(
        &self,
        socket: actix_ws::Session,
        (payload, limits): (actix_web::web::Payload, crate::socket::ReadLimits),
        remote: Option<String>,
        handshake: Option<PreAuthSlot>,
    ) {
        let (link, stats) = self.state.add_link(Direction::Inbound, None, remote);
        let (io, out, shutdown) = crate::socket::channels(transport::QUEUE);
        let session = PeerSession::new(SessionParts {
            link,
            direction: Direction::Inbound,
            config: self.config.clone(),
            mesh: self.state.clone(),
            runs: self.runs.clone(),
            metrics: self.metrics.clone(),
            out,
            shutdown,
            stats,
            owner: None,
            handshake,
        })
        .start();
        crate::socket::serve(socket, payload, limits, session.recipient(), io);
    }

    /// The largest frame a proven peer may send.
    pub fn max_frame(&self) -> usize {
        self.config.max_frame
    }

    /// Closes every link ("going away") and stops redialling: a stopping node's links would
    /// otherwise hold its HTTP workers until the shutdown timeout.
    pub fn close(&self) {
        for session in self.state.close() {
            session.addr.do_send(session::CloseLink {
                code: 1001,
                reason: "node shutting down".into(),
            });
        }
    }

    /// Announces this node's viewers of a run to every connected peer node.
    fn announce_presence(&self, run_id: Uuid, users: Vec<presence::PresenceUser>) {
        let (epoch, seq) = self.state.presence().next_stamp();
        let announcement = presence::Announcement {
            run_id,
            origin: self.config.node_id.clone(),
            region: self.config.region.clone(),
            epoch,
            seq,
            users,
        };
        announcement.send(&self.state, &self.metrics, self.config.max_frame, &[]);
    }

    /// Every link and registration, as `mesh/status` shows them.
    pub fn status(&self) -> directory::MeshSnapshot {
        self.state.snapshot()
    }

    /// Registers `run` for `region` (true if new); its connected nodes get it at once (how
    /// many there are).
    pub fn register_run(
        &self,
        run: Uuid,
        region: &str,
    ) -> Result<(bool, usize), directory::TooManyRegions> {
        let newly = self.state.register(run, region)?;
        Ok((newly, self.sync_run_to(run, region)))
    }

    /// Where this node's browser presence is relayed to other regions.
    pub fn presence(&self) -> &presence::PresenceRelay {
        self.state.presence()
    }

    /// Syncs `run` now to every connected node of `region`; returns how many there are.
    pub fn sync_run_to(&self, run: Uuid, region: &str) -> usize {
        let sessions = self.state.sessions_in(region);
        for s in &sessions {
            s.addr.do_send(SyncRun(run));
        }
        sessions.len()
    }
}

use connector::Connector;

impl crate::presence::Announce for Mesh {
    fn announce(&self, run_id: Uuid, users: Vec<crate::presence::PresenceUser>) {
        self.announce_presence(run_id, users);
    }
}

//! `Connector`: keeps one configured peer connected. It opens the WebSocket, hands the socket
//! to a new [`PeerSession`], and when the session ends, tries again after an exponential
//! back-off with jitter (reset once a link comes up), so a peer that restarts is found again
//! without anyone's help.

use std::sync::Arc;

use actix::prelude::*;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use super::directory::{Direction, MeshState};
use super::session::{LinkEvent, PeerSession, SessionParts};
use super::transport;
use super::MeshConfig;
use crate::metrics::Metrics;
use crate::runs::Runs;
use run_wire::mesh as protocol;

pub struct Connector {
    url: String,
    link: u64,
    config: Arc<MeshConfig>,
    mesh: MeshState,
    runs: Runs,
    metrics: Metrics,
    backoff: ExponentialBackoff,
    session: Option<Addr<PeerSession>>,
}

impl Connector {
    pub fn new(
        url: String,
        config: Arc<MeshConfig>,
        mesh: MeshState,
        runs: Runs,
        metrics: Metrics,
    ) -> Self {
        let (link, _) = mesh.add_link(Direction::Outbound, Some(url.clone()), None);
        let backoff = Self::backoff(&config);
        Connector {
            url,
            link,
            config,
            mesh,
            runs,
            metrics,
            backoff,
            session: None,
        }
    }

    fn backoff(config: &MeshConfig) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(config.reconnect_min)
            .with_max_delay(config.reconnect_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn retry(&mut self, ctx: &mut Context<Self>) {
        if self.mesh.is_closing() {
            return ctx.stop();
        }
        let delay = self.backoff.next().unwrap_or(self.config.reconnect_max);
        log::debug!(
            "mesh: reconnecting to {} in {} ms",
            self.url,
            delay.as_millis()
        );
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let url = self.url.clone();
        let timeout = self.config.peer_timeout;
        let max_frame = self.config.max_frame;
        // Proven on the upgrade: the socket skips the peer's pool of unproven ones.
        let proof = self
            .config
            .secret
            .as_deref()
            .map(|s| protocol::prove_upgrade(s, unix_ms()));
        let connecting = async move {
            let client = awc::Client::builder()
                .connector(awc::Connector::new().connector(crate::socket::NoDelay::default()))
                .timeout(timeout)
                .max_http_version(awc::http::Version::HTTP_11)
                .finish();
            // awc's error is not `Send`; only its text leaves this future.
            let mut request = client.ws(url.as_str()).max_frame_size(max_frame);
            if let Some(proof) = proof {
                request = request.set_header(protocol::UPGRADE_PROOF_HEADER, proof);
            }
            request
                .connect()
                .await
                .map(|(_, socket)| socket)
                .map_err(|e| e.to_string())
        };
        let stats = self.mesh.attempt(self.link, self.url.clone());
        ctx.wait(connecting.into_actor(self).map(move |result, act, ctx| {
            let socket = match result {
                Ok(s) => s,
                Err(e) => {
                    log::debug!("mesh: cannot reach {}: {e}", act.url);
                    act.mesh.link_error(act.link, format!("connect: {e}"));
                    return act.retry(ctx);
                }
            };
            let (io, out, shutdown) = crate::socket::channels(transport::QUEUE);
            let session = PeerSession::new(SessionParts {
                link: act.link,
                direction: Direction::Outbound,
                config: act.config.clone(),
                mesh: act.mesh.clone(),
                runs: act.runs.clone(),
                metrics: act.metrics.clone(),
                out,
                shutdown,
                stats,
                owner: Some(ctx.address().recipient()),
                handshake: None,
            })
            .start();
            transport::client(socket, session.clone(), io);
            act.session = Some(session);
        }));
    }
}

impl Actor for Connector {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.connect(ctx);
    }
}

impl Handler<LinkEvent> for Connector {
    type Result = ();

    fn handle(&mut self, msg: LinkEvent, ctx: &mut Self::Context) {
        match msg {
            LinkEvent::Up => self.backoff = Self::backoff(&self.config),
            LinkEvent::Down(_) => {
                self.session = None;
                self.retry(ctx);
            }
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

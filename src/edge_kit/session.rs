//! A client session's socket, as every client-facing edge keeps it: the outgoing queue and
//! the shutdown that closes the socket, when the client was last heard, its place at the door
//! until it proves itself, and the timers every session runs (heartbeat, join timeout, the
//! node stopping).

use std::time::{Duration, Instant};

use actix::prelude::*;
use prometheus::IntCounterVec;
use tokio::sync::{mpsc, watch};

use super::Seat;
use crate::admission::PreAuthSlot;
use crate::socket::{Out, Shutdown};
use run_wire::close;

pub struct EdgeSocket {
    pub id: u64,
    pub(super) out: mpsc::Sender<Out>,
    pub(super) shutdown: Option<Shutdown>,
    pub(super) last_heard: Instant,
    /// Held until the client proves itself: it counts among the unproven sockets.
    pub(super) pre_auth: Option<PreAuthSlot>,
    /// Held until the session stops: it counts among the door's open sessions.
    pub(super) _seat: Seat,
    /// The door's closed-sessions counter, by reason.
    pub(super) closed: IntCounterVec,
    pub(super) timing: Timing,
    pub(super) closing: watch::Receiver<bool>,
}

/// How an edge's sessions are timed.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A ping this often; nothing heard for three of them closes the session.
    pub heartbeat: Duration,
    /// How long a client has to prove itself.
    pub join_timeout: Duration,
}

impl EdgeSocket {
    /// The outgoing queue.
    pub fn out(&self) -> &mpsc::Sender<Out> {
        &self.out
    }

    /// Something came from the client.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// The client proved itself: its place among the unproven sockets is free.
    pub fn proved(&mut self) {
        self.pre_auth = None;
    }

    /// Closes the socket with `code` and `reason`, counted as `label`; `who` names the session
    /// in the log. Frames already queued (an error saying why) go first if the queue has room.
    /// Only the first close counts.
    pub fn close(&mut self, code: u16, reason: String, label: &'static str, who: &str) {
        if let Some(shutdown) = self.shutdown.take() {
            log::info!("{who}: closing: {reason}");
            self.closed.with_label_values(&[label]).inc();
            crate::socket::close_session(&self.out, shutdown, code, reason);
        }
    }

    /// The session stopped: the writer stops and closes the socket.
    pub fn stopped(&mut self) {
        self.shutdown.take();
    }

    /// Pings the client, or says why it is gone.
    fn beat(&mut self) -> Result<(), String> {
        let limit = self.timing.heartbeat * 3;
        if self.last_heard.elapsed() > limit {
            return Err(format!("nothing heard for {} ms", limit.as_millis()));
        }
        let _ = self.out.try_send(Out::Ping(actix_web::web::Bytes::new()));
        Ok(())
    }
}

/// A client session of an edge: the kit runs its timers and closes it.
pub trait EdgeSession: Actor<Context = Context<Self>> {
    /// The protocol's name for its first message, in the timeout's reason.
    const JOIN: &'static str;

    fn socket(&mut self) -> &mut EdgeSocket;

    /// Whether the client has proved itself.
    fn joined(&self) -> bool;

    /// Closes the session (logging who it is) and stops it.
    fn close(&mut self, code: u16, reason: String, label: &'static str, ctx: &mut Context<Self>);

    /// Closes the session as `kick` says (a room's or hub's `Kick`, or the session's own).
    fn kick(&mut self, kick: super::Kick, ctx: &mut Context<Self>) {
        self.close(kick.code, kick.reason, kick.label, ctx);
    }

    /// Starts the timers every session runs: the heartbeat, the join timeout, and closing when
    /// the node stops. Call from `Actor::started`.
    fn start_edge(&mut self, ctx: &mut Context<Self>)
    where
        Self: Sized,
    {
        let socket = self.socket();
        let Timing {
            heartbeat,
            join_timeout: limit,
        } = socket.timing;
        let mut closing = socket.closing.clone();
        ctx.run_interval(heartbeat, |act, ctx| {
            if let Err(reason) = act.socket().beat() {
                act.close(close::TIMEOUT, reason, "timeout", ctx);
            }
        });
        ctx.run_later(limit, move |act, ctx| {
            if !act.joined() {
                let reason = format!("no {} within {} ms", Self::JOIN, limit.as_millis());
                act.close(close::TIMEOUT, reason, "timeout", ctx);
            }
        });
        let stopping = async move {
            let _ = closing.wait_for(|c| *c).await;
        };
        ctx.spawn(stopping.into_actor(self).map(|_, act, ctx| {
            let reason = "node shutting down".to_string();
            act.close(close::GOING_AWAY, reason, "shutdown", ctx);
        }));
    }
}

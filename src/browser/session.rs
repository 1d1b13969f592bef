//! `BrowserSession`: one actor per browser WebSocket.
//!
//! A session must `JOIN` (with the API token when one is configured) within `admission.pre-auth-timeout-ms`;
//! then it joins its run's room, which sends it the state and presence, and it may send
//! mutations. Each mutation is answered with `ACK` once its change is committed to the log, or
//! with `ERROR` and the reason; a malformed frame gets `ERROR` and the session stays open.

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::hub::{Hub, Join, Leave};
use super::Shared;
use crate::api_error::ApiError;
use crate::edge_kit::{EdgeSession, EdgeSocket, Kick};
use crate::identity::{Access, Identity};
use crate::runs::Mutate;
use crate::socket::{Inbound, Out, Outbox};
use run_wire::browser::{self as protocol, ClientFrame, Op, ServerFrame, MAX_OP_ID};
use run_wire::close;

/// Mutations one session may have waiting for their commit.
pub const MAX_IN_FLIGHT: usize = 64;

pub struct Parts {
    pub run_id: Uuid,
    pub shared: Arc<Shared>,
    pub hub: Addr<Hub>,
    /// Who the upgrade request's bearer token proved, if it carried one.
    pub upgraded: Option<Identity>,
}

pub struct BrowserSession {
    p: Parts,
    socket: EdgeSocket,
    /// The outgoing queue as its room sees it: bounded in bytes too.
    outbox: Outbox,
    user: Option<String>,
    /// Who joined, once joined.
    identity: Option<Identity>,
    /// Closes the session when the user token expires; replaced when it is renewed.
    expiry: Option<SpawnHandle>,
    in_flight: usize,
}

impl BrowserSession {
    pub fn new(p: Parts, socket: EdgeSocket) -> Self {
        let config = &p.shared.config;
        let outbox = Outbox::new(socket.out().clone(), config.queue_bytes, &config.outgoing);
        BrowserSession {
            outbox,
            p,
            socket,
            user: None,
            identity: None,
            expiry: None,
            in_flight: 0,
        }
    }

    /// Queues a frame; a full queue means the browser is too far behind, so it is closed.
    fn send(&mut self, frame: ServerFrame<'_>, ctx: &mut Context<Self>) {
        let text: Arc<str> = frame.encode().into();
        match self.socket.out().try_send(Out::Text(text)) {
            Ok(()) => self
                .p
                .shared
                .metrics
                .browser_frames
                .with_label_values(&["out"])
                .inc(),
            Err(mpsc::error::TrySendError::Full(_)) => self.kick(Kick::too_slow(), ctx),
            Err(mpsc::error::TrySendError::Closed(_)) => ctx.stop(),
        }
    }

    fn error(&mut self, op_id: Option<&str>, error: &str, message: &str, ctx: &mut Context<Self>) {
        self.send(
            ServerFrame::Error {
                op_id,
                error,
                message,
            },
            ctx,
        );
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let frame = match protocol::decode(text) {
            Ok(f) => f,
            Err(reason) => {
                // Name the operation when the frame has one, so the client can drop it.
                let op_id = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v.get("opId")?.as_str().map(str::to_string))
                    .filter(|id| id.len() <= MAX_OP_ID);
                return self.error(op_id.as_deref(), "bad_frame", &reason, ctx);
            }
        };
        match frame {
            ClientFrame::Join { user, token } => self.join(user, token, ctx),
            ClientFrame::Mutate { op_id, op } => self.mutate(op_id, op, ctx),
            ClientFrame::Token { token } => self.renew(token, ctx),
        }
    }

    fn join(&mut self, user: Option<String>, token: Option<String>, ctx: &mut Context<Self>) {
        if self.user.is_some() {
            return self.error(None, "bad_frame", "already joined", ctx);
        }
        // A token in JOIN counts; else the one the upgrade request carried.
        let identity = match (token, self.p.upgraded.clone()) {
            (None, Some(upgraded)) => Ok(upgraded),
            (token, _) => self.p.shared.auth.identify(token.as_deref()),
        };
        let identity = match identity {
            Ok(identity) => identity,
            Err(e) => return self.refuse(&e.to_string(), ctx),
        };
        if let Err(denied) = identity.allows(self.p.run_id, Access::Read) {
            return self.refuse(&denied.to_string(), ctx);
        }
        // A user token names the user; a service names it in JOIN.
        let named = identity.user(None).or(user);
        let user = match run_doc::rules::name("user", named.as_deref()).map_err(ApiError::from) {
            Ok(u) => u,
            Err(e) => return self.error(None, e.code(), &e.to_string(), ctx),
        };
        self.expire_at(&identity, ctx);
        self.identity = Some(identity);
        let shared = self.p.shared.clone();
        self.send(
            ServerFrame::Welcome {
                run_id: self.p.run_id,
                region: &shared.config.region,
                node_id: &shared.config.node_id,
                user: &user,
                session_id: self.socket.id,
            },
            ctx,
        );
        self.p.hub.do_send(Join {
            run_id: self.p.run_id,
            id: self.socket.id,
            session: ctx.address(),
            outbox: self.outbox.clone(),
            user: user.clone(),
        });
        self.user = Some(user);
        self.socket.proved();
    }

    /// Says why the session may not join, and closes it (4001).
    fn refuse(&mut self, reason: &str, ctx: &mut Context<Self>) {
        self.error(None, "unauthorized", reason, ctx);
        self.close(close::UNAUTHORIZED, reason.into(), "unauthorized", ctx);
    }

    /// Closes the session (4001) when the identity's token expires, unless renewed first.
    fn expire_at(&mut self, identity: &Identity, ctx: &mut Context<Self>) {
        if let Some(old) = self.expiry.take() {
            ctx.cancel_future(old);
        }
        if let Some(left) = identity.expires_in() {
            let handle = ctx.run_later(left, |act, ctx| {
                let reason = "the token expired: send TOKEN with a fresh one before it does";
                act.error(None, "unauthorized", reason, ctx);
                act.close(close::UNAUTHORIZED, reason.into(), "token_expired", ctx);
            });
            self.expiry = Some(handle);
        }
    }

    /// `TOKEN`: a fresh token for the same user and run replaces the one the session joined
    /// with; anything else is refused and the session keeps its token.
    fn renew(&mut self, token: Option<String>, ctx: &mut Context<Self>) {
        let Some(Identity::User(current)) = self.identity.clone() else {
            return self.error(
                None,
                "bad_frame",
                "TOKEN renews the user token of a joined session",
                ctx,
            );
        };
        let renewed = match self.p.shared.auth.identify(token.as_deref()) {
            Ok(Identity::User(grant)) if grant.sub == current.sub => Identity::User(grant),
            Ok(_) => {
                let reason = format!("a renewed token must name the same user ({})", current.sub);
                return self.error(None, "unauthorized", &reason, ctx);
            }
            Err(e) => return self.error(None, "unauthorized", &e.to_string(), ctx),
        };
        if let Err(denied) = renewed.allows(self.p.run_id, Access::Read) {
            return self.error(None, "forbidden", &denied.to_string(), ctx);
        }
        let Identity::User(grant) = &renewed else {
            return;
        };
        let expires = grant.expires;
        self.expire_at(&renewed, ctx);
        self.identity = Some(renewed);
        self.send(ServerFrame::TokenAccepted { expires }, ctx);
    }

    fn mutate(&mut self, op_id: Option<String>, op: Op, ctx: &mut Context<Self>) {
        if op_id.as_ref().is_some_and(|id| id.len() > MAX_OP_ID) {
            let message = format!("opId is longer than {MAX_OP_ID} bytes");
            return self.error(None, "invalid_field", &message, ctx);
        }
        let Some(user) = self.user.clone() else {
            return self.error(op_id.as_deref(), "not_joined", "send JOIN first", ctx);
        };
        let allowed = self
            .identity
            .as_ref()
            .map(|i| i.allows(self.p.run_id, Access::Write));
        if let Some(Err(denied)) = allowed {
            return self.error(op_id.as_deref(), "forbidden", &denied.to_string(), ctx);
        }
        if self.in_flight >= MAX_IN_FLIGHT {
            let message = format!("more than {MAX_IN_FLIGHT} mutations waiting; wait for acks");
            return self.error(op_id.as_deref(), "busy", &message, ctx);
        }
        let mutation = match op.into_mutation(&user).map_err(ApiError::from) {
            Ok(m) => m,
            Err(e) => return self.error(op_id.as_deref(), e.code(), &e.to_string(), ctx),
        };
        self.in_flight += 1;
        let runs = self.p.shared.runs.clone();
        let run_id = self.p.run_id;
        let msg = Mutate {
            mutation,
            user: Some(user),
            op_id: op_id.clone(),
        };
        let fut = async move { runs.mutate(run_id, msg).await };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            act.in_flight -= 1;
            match result.map_err(ApiError::from) {
                Ok(out) => act.send(
                    ServerFrame::Ack {
                        op_id: op_id.as_deref(),
                        changed: out.changed,
                        lamport: out.lamport,
                        heads: &out.heads,
                        graft: out.graft.as_ref(),
                    },
                    ctx,
                ),
                Err(e) => act.error(op_id.as_deref(), e.code(), &e.to_string(), ctx),
            }
        }));
    }
}

impl EdgeSession for BrowserSession {
    const JOIN: &'static str = "JOIN";

    fn socket(&mut self) -> &mut EdgeSocket {
        &mut self.socket
    }

    fn joined(&self) -> bool {
        self.user.is_some()
    }

    fn close(&mut self, code: u16, reason: String, label: &'static str, ctx: &mut Context<Self>) {
        let who = format!(
            "browser: session {} on run {}",
            self.socket.id, self.p.run_id
        );
        self.socket.close(code, reason, label, &who);
        ctx.stop();
    }
}

impl Actor for BrowserSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.start_edge(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.socket.stopped();
        if self.user.is_some() {
            self.p.hub.do_send(Leave {
                run_id: self.p.run_id,
                id: self.socket.id,
            });
        }
    }
}

impl Handler<Inbound> for BrowserSession {
    type Result = ();

    fn handle(&mut self, msg: Inbound, ctx: &mut Self::Context) {
        self.socket.heard();
        if matches!(msg, Inbound::Text(_) | Inbound::Binary(_)) {
            let frames = &self.p.shared.metrics.browser_frames;
            frames.with_label_values(&["in"]).inc();
        }
        match msg {
            Inbound::Text(t) => self.on_text(&t, ctx),
            Inbound::Binary(_) => self.error(
                None,
                "bad_frame",
                "binary frames are not part of this protocol; send JSON text",
                ctx,
            ),
            Inbound::Pong(_) => {}
            Inbound::Closed(_) => ctx.stop(),
        }
    }
}

impl Handler<Kick> for BrowserSession {
    type Result = ();

    fn handle(&mut self, msg: Kick, ctx: &mut Self::Context) {
        self.kick(msg, ctx);
    }
}

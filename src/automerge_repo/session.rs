//! `RepoSession`: one actor per automerge-repo WebSocket.
//!
//! The client's first message must be `join` with protocol "1" among its versions (and, when
//! the node has an API token, a connection that presented it); the node answers `peer`.
//! Then every document message is routed to its run's room, opened on first use. A malformed
//! message, an unknown document id or a message in another peer's name gets an `error` with
//! the reason, and the connection closes: the JS client reconnects and resyncs.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use run_doc::DocError;
use uuid::Uuid;

use super::hub::{Hub, Open, Register, Unregister};
use super::room::{DocRoom, Incoming, Member, Relay};
use super::Shared;
use crate::edge_kit::{EdgeSession, EdgeSocket, Kick};
use crate::identity::{Access, Denied, Identity};
use crate::socket::{Inbound, Outbox, Queued};
use run_wire::automerge_repo::doc_id;
use run_wire::automerge_repo::wire::{self, FromClient, ToClient, PROTOCOL_V1};
use run_wire::close;

/// The largest ephemeral payload relayed to a document's other clients.
pub const MAX_EPHEMERAL_BYTES: usize = 64 * 1024;

pub struct Parts {
    pub shared: Arc<Shared>,
    pub hub: Addr<Hub>,
    /// Who the upgrade's token proved, or why it proved no one.
    pub identity: Result<Identity, String>,
}

pub struct RepoSession {
    p: Parts,
    socket: EdgeSocket,
    /// The client's peer id, once it joined.
    peer_id: Option<String>,
    docs: HashMap<Uuid, Addr<DocRoom>>,
    /// The outgoing queue as rooms see it: bounded in bytes too.
    outbox: Outbox,
}

impl RepoSession {
    pub fn new(p: Parts, socket: EdgeSocket) -> Self {
        let config = &p.shared.config;
        let outbox = Outbox::new(socket.out().clone(), config.queue_bytes, &config.outgoing);
        RepoSession {
            outbox,
            p,
            socket,
            peer_id: None,
            docs: HashMap::new(),
        }
    }

    fn send(&mut self, message: ToClient<'_>, ctx: &mut Context<Self>) {
        let kind = message.kind();
        match self.outbox.binary(message.encode(), false) {
            Queued::Sent | Queued::Dropped => self.p.shared.count(kind, "out"),
            Queued::TooSlow => self.kick(Kick::too_slow(), ctx),
            Queued::Closed => ctx.stop(),
        }
    }

    /// Sends `error` with the reason, then closes with `code`.
    fn refuse(&mut self, code: u16, reason: String, label: &'static str, ctx: &mut Context<Self>) {
        let target = self.peer_id.clone().unwrap_or_default();
        let server = self.p.shared.config.peer_id.clone();
        self.send(
            ToClient::Error {
                sender_id: &server,
                target_id: &target,
                message: &reason,
            },
            ctx,
        );
        self.close(code, reason, label, ctx);
    }

    fn on_binary(&mut self, bytes: &[u8], ctx: &mut Context<Self>) {
        let message = match wire::decode(bytes) {
            Ok(m) => m,
            Err(e) => return self.refuse(close::PROTOCOL, e.to_string(), "bad_message", ctx),
        };
        self.p.shared.count(message.kind(), "in");
        let Some(peer_id) = self.peer_id.clone() else {
            return match message {
                FromClient::Join {
                    sender_id,
                    versions,
                    ..
                } => self.join(sender_id, versions, ctx),
                other => {
                    let reason = format!("a {} message before join", other.kind());
                    self.refuse(close::PROTOCOL, reason, "bad_message", ctx)
                }
            };
        };
        if message.sender_id() != peer_id {
            let reason = format!(
                "senderId {:?} is not the peer that joined on this connection ({peer_id:?})",
                message.sender_id()
            );
            return self.refuse(close::PROTOCOL, reason, "bad_message", ctx);
        }
        match message {
            FromClient::Join { .. } => {
                self.refuse(close::PROTOCOL, "joined twice".into(), "bad_message", ctx)
            }
            FromClient::Leave { .. } => self.close(1000, "peer left".into(), "left", ctx),
            FromClient::Sync {
                document_id, data, ..
            } => {
                let message = match run_doc::decode_sync_message(&data) {
                    Ok(m) => m,
                    Err(e @ DocError::TooLarge(_)) => {
                        return self.refuse(close::TOO_BIG, e.to_string(), "too_large", ctx);
                    }
                    Err(e) => {
                        let reason = format!("data is not an Automerge sync message: {e}");
                        return self.refuse(close::PROTOCOL, reason, "bad_message", ctx);
                    }
                };
                // A message that carries changes writes; one that only asks reads.
                let access = if message.changes.is_empty() {
                    Access::Read
                } else {
                    Access::Write
                };
                self.with_room(&document_id, access, ctx, move |conn, room| {
                    room.do_send(Incoming { conn, message })
                });
            }
            FromClient::Ephemeral(message) if message.data.len() > MAX_EPHEMERAL_BYTES => {
                // Presence and cursors are small; a large one would be copied to every
                // other client of the document. Dropped, not refused: the client's sync goes on.
                self.p.shared.count("ephemeral_too_large", "in");
                log::debug!(
                    "automerge-repo: {peer_id}: dropped an ephemeral message of {} bytes",
                    message.data.len()
                );
            }
            FromClient::Ephemeral(message) => {
                let document_id = message.document_id.clone();
                self.with_room(&document_id, Access::Read, ctx, move |conn, room| {
                    room.do_send(Relay { conn, message })
                });
            }
            // The client lacks a document too: nothing to do (this node only ever answers).
            FromClient::DocUnavailable { .. } => {}
            FromClient::Other { kind, .. } => {
                log::debug!("automerge-repo: {peer_id}: ignoring a {kind} message");
            }
        }
    }

    fn join(&mut self, sender_id: String, versions: Option<Vec<String>>, ctx: &mut Context<Self>) {
        self.peer_id = Some(sender_id.clone());
        let identity = match &self.p.identity {
            Ok(identity) => identity.clone(),
            Err(reason) => {
                let reason = format!("{reason}: add ?token=<token> to the URL");
                return self.refuse(close::UNAUTHORIZED, reason, "unauthorized", ctx);
            }
        };
        // A client that sends no list is an old one that speaks "1" (as the JS server assumes).
        if let Some(v) = versions.filter(|v| !v.iter().any(|v| v == PROTOCOL_V1)) {
            let reason = format!("unsupported protocol version(s) {v:?}: this node speaks \"1\"");
            return self.refuse(close::PROTOCOL, reason, "unsupported_version", ctx);
        }
        self.socket.proved();
        if let Some(left) = identity.expires_in() {
            ctx.run_later(left, |act, ctx| {
                let reason = "the token expired: reconnect with a fresh one".to_string();
                act.refuse(close::UNAUTHORIZED, reason, "token_expired", ctx);
            });
        }
        self.p.hub.do_send(Register {
            peer_id: sender_id.clone(),
            conn: self.socket.id,
            session: ctx.address(),
        });
        let server = self.p.shared.config.peer_id.clone();
        self.send(
            ToClient::Peer {
                sender_id: &server,
                target_id: &sender_id,
            },
            ctx,
        );
    }

    /// Runs `f` with the room of a document, opening it first (other messages wait meanwhile,
    /// so they stay in order).
    fn with_room(
        &mut self,
        document_id: &str,
        access: Access,
        ctx: &mut Context<Self>,
        f: impl FnOnce(u64, &Addr<DocRoom>) + 'static,
    ) {
        let run_id = match doc_id::decode(document_id) {
            Ok(r) => r,
            Err(e) => return self.refuse(close::PROTOCOL, e.to_string(), "bad_document", ctx),
        };
        let allowed = self.p.identity.as_ref().map(|i| i.allows(run_id, access));
        if let Ok(Err(denied)) = allowed {
            let code = match denied {
                Denied::OtherRun(_) => close::UNAUTHORIZED,
                Denied::ReadOnly(_) => close::FORBIDDEN,
            };
            return self.refuse(code, denied.to_string(), "forbidden", ctx);
        }
        let conn = self.socket.id;
        if let Some(room) = self.docs.get(&run_id) {
            return f(conn, room);
        }
        let limit = self.p.shared.config.max_documents;
        if self.docs.len() >= limit {
            let reason = format!("more than {limit} documents on one connection");
            return self.refuse(close::PROTOCOL, reason, "too_many_documents", ctx);
        }
        let open = Open {
            run_id,
            conn,
            member: Member {
                peer_id: self.peer_id.clone().unwrap_or_default(),
                user: self
                    .p
                    .identity
                    .as_ref()
                    .ok()
                    .and_then(|i| i.user(self.peer_id.clone()))
                    .unwrap_or_default(),
                author: self.p.identity.as_ref().ok().and_then(|i| i.author()),
                outbox: self.outbox.clone(),
                session: ctx.address(),
            },
        };
        let hub = self.p.hub.clone();
        ctx.wait(async move { hub.send(open).await }.into_actor(self).map(
            move |room, act, ctx| match room {
                Ok(room) => {
                    f(conn, &room);
                    act.docs.insert(run_id, room);
                }
                Err(_) => act.close(1011, "node stopping".into(), "shutdown", ctx),
            },
        ));
    }
}

impl EdgeSession for RepoSession {
    const JOIN: &'static str = "join";

    fn socket(&mut self) -> &mut EdgeSocket {
        &mut self.socket
    }

    fn joined(&self) -> bool {
        self.peer_id.is_some()
    }

    fn close(&mut self, code: u16, reason: String, label: &'static str, ctx: &mut Context<Self>) {
        let who = format!(
            "automerge-repo: connection {} ({})",
            self.socket.id,
            self.peer_id.as_deref().unwrap_or("not joined")
        );
        // The `error` saying why, if any, goes first.
        self.socket.close(code, reason, label, &who);
        ctx.stop();
    }
}

impl Actor for RepoSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.start_edge(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.socket.stopped();
        if let Some(peer_id) = self.peer_id.take() {
            self.p.hub.do_send(Unregister {
                peer_id,
                conn: self.socket.id,
                runs: self.docs.keys().copied().collect(),
            });
        }
    }
}

impl Handler<Inbound> for RepoSession {
    type Result = ();

    fn handle(&mut self, msg: Inbound, ctx: &mut Self::Context) {
        self.socket.heard();
        match msg {
            Inbound::Binary(bytes) => self.on_binary(&bytes, ctx),
            Inbound::Text(_) => self.refuse(
                close::PROTOCOL,
                "text frames are not part of this protocol: send CBOR in binary frames".into(),
                "bad_message",
                ctx,
            ),
            Inbound::Pong(_) => {}
            Inbound::Closed(_) => ctx.stop(),
        }
    }
}

impl Handler<Kick> for RepoSession {
    type Result = ();

    fn handle(&mut self, msg: Kick, ctx: &mut Self::Context) {
        self.kick(msg, ctx);
    }
}

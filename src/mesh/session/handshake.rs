//! The handshake: both ends send HELLO; the dialling end proves itself first, the accepting
//! end only after checking that proof (see `protocol`).

use super::*;

impl PeerSession {
    pub(super) fn on_hello(&mut self, hello: Hello, version: u32, ctx: &mut Context<Self>) {
        if version != PROTOCOL_VERSION {
            return self.close(
                close::PROTOCOL,
                format!(
                    "protocol version {version} is not supported (this node speaks {PROTOCOL_VERSION})"
                ),
                ctx,
            );
        }
        if hello.node_id == self.config.node_id {
            return self.close(
                close::SELF_LINK,
                "this link leads back to the same node".into(),
                ctx,
            );
        }
        // The rules every door applies: a region as the event log stores it (a peer holding
        // the secret cannot make this run's appends fail with a longer one).
        if !run_doc::rules::is_node_id(&hello.node_id)
            || !run_doc::rules::is_region(&hello.region)
            || !(32..=128).contains(&hello.nonce.len())
        {
            return self.close(close::HANDSHAKE, "malformed HELLO".into(), ctx);
        }
        self.phase = Phase::Handshake { hello: Some(hello) };
        // The dialling end proves itself first; the accepting end only after it has checked
        // that proof, so it never signs anything for a stranger.
        if self.role() == Role::Initiator {
            self.send_proof(ctx);
        }
    }

    pub(super) fn secret(&self) -> &str {
        self.config.secret.as_deref().unwrap_or_default()
    }

    pub(super) fn role(&self) -> Role {
        match self.direction {
            Direction::Outbound => Role::Initiator,
            Direction::Inbound => Role::Acceptor,
        }
    }

    /// The link's nonces, once the peer's HELLO is in.
    pub(super) fn nonces(&self) -> Option<(String, String)> {
        let Phase::Handshake { hello: Some(h) } = &self.phase else {
            return None;
        };
        Some(match self.role() {
            Role::Initiator => (self.nonce.clone(), h.nonce.clone()),
            Role::Acceptor => (h.nonce.clone(), self.nonce.clone()),
        })
    }

    pub(super) fn send_proof(&mut self, ctx: &mut Context<Self>) {
        let Some((initiator, acceptor)) = self.nonces() else {
            return;
        };
        let proof = protocol::prove(
            self.secret(),
            self.role(),
            Nonces {
                initiator: &initiator,
                acceptor: &acceptor,
            },
            &self.config.node_id,
            &self.config.region,
        );
        self.send(&Frame::Auth { proof }, ctx);
    }

    pub(super) fn on_auth(&mut self, proof: &str, ctx: &mut Context<Self>) {
        let (Phase::Handshake { hello: Some(h) }, Some((initiator, acceptor))) =
            (&self.phase, self.nonces())
        else {
            return;
        };
        let peer = PeerIdentity {
            node_id: h.node_id.clone(),
            region: h.region.clone(),
        };
        let nonces = Nonces {
            initiator: &initiator,
            acceptor: &acceptor,
        };
        let verifies = |secret: &str| {
            protocol::verify(
                secret,
                proof,
                self.role().other(),
                nonces,
                &peer.node_id,
                &peer.region,
            )
        };
        if !(verifies(self.secret()) || self.config.accept_secret.as_deref().is_some_and(verifies))
        {
            return self.refuse(
                "auth",
                close::UNAUTHORIZED,
                "authentication failed: the peer does not know the mesh secret".into(),
                ctx,
            );
        }
        if self.role() == Role::Acceptor {
            self.send_proof(ctx);
        }
        self.ready(peer, ctx);
    }

    pub(super) fn ready(&mut self, peer: PeerIdentity, ctx: &mut Context<Self>) {
        log::info!(
            "mesh: {} link {} to {} ({}) is up",
            match self.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
            self.link,
            peer.node_id,
            peer.region
        );
        let handle = SessionHandle {
            addr: ctx.address(),
            out: self.out.clone(),
            stats: self.stats.clone(),
        };
        if let Some(warning) = self.mesh.link_up(self.link, peer.clone(), handle) {
            log::warn!("mesh: {warning}");
        }
        self.phase = Phase::Ready(peer);
        self.handshake = None;
        if let Some(owner) = &self.owner {
            owner.do_send(LinkEvent::Up);
        }
        self.list_runs(ctx);
    }
}

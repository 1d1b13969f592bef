//! A run another pod of the region owns, reached from here: the sync steps of this pod's
//! peers (automerge-repo clients, other regions' nodes), changes another region sent, and
//! whole documents are handed to the owner (`run_wire::cluster`), which answers with what its
//! actor answered. This pod keeps the peers' sync states, as it does for its own runs; the
//! owner keeps nothing per caller. The owner decodes what it is sent with the same bounds as
//! any door (`run_doc::decode_sync_message`, `parse_peer_changes`).
//!
//! The transport is a port: the HTTP edge provides it (`http/cluster_link.rs`), so the runtime
//! imports no edge. Commits on other pods are announced to this pod's rooms through the
//! change feed, which reads the shared log (`Runs::follow_region`).

use std::sync::Arc;

use automerge::sync;
use futures_util::future::BoxFuture;
use run_store::Owner;
use run_wire::cluster::{self as wire, Call, Decision, Failure, Reply};
use serde_bytes::ByteBuf;
use uuid::Uuid;

use super::api::{
    BadInput, ChangesSince, FullDocument, ReadChanges, ReadDocument, RemoteChanges, SyncOutcome,
    SyncStep, SyncStepReply,
};
use super::{RunError, Runs, Tombstone};
use crate::runs::run_actor::Call as Ask;

/// How calls reach another pod: `post(address, run, body)` answers the owner's reply body.
pub trait Transport: Send + Sync {
    fn post(
        &self,
        address: &str,
        run_id: Uuid,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>>;
}

/// The path a call to the owner of `run_id` is posted to.
pub fn path(run_id: Uuid) -> String {
    format!("/internal/runs/{run_id}")
}

fn failure(e: RunError) -> Failure {
    match e {
        RunError::Unavailable(s) => Failure::Unavailable(s),
        RunError::Busy(s) => Failure::Busy(s),
        RunError::Stopped => Failure::Unavailable(RunError::Stopped.to_string()),
        RunError::Deleted(t) => Failure::Deleted(decision(&t)),
        RunError::NoSuchRun(_) => Failure::NoSuchRun,
        RunError::Elsewhere(_) => Failure::Moved,
        other => Failure::Refused(other.to_string()),
    }
}

fn run_error(run_id: Uuid, f: Failure) -> RunError {
    match f {
        Failure::Unavailable(s) => RunError::Unavailable(s),
        Failure::Busy(s) => RunError::Busy(s),
        Failure::Deleted(d) => RunError::Deleted(tombstone(run_id, d)),
        Failure::NoSuchRun => RunError::NoSuchRun(run_id),
        Failure::Refused(s) => RunError::Doc(run_doc::DocError::InvalidChanges(s)),
        Failure::Moved => {
            RunError::Unavailable("the run is moving between this region's pods; try again".into())
        }
    }
}

fn decision(t: &Tombstone) -> Decision {
    Decision {
        deleted: t.deleted,
        decided_at: t.decided_at,
        region: t.region.clone(),
        by: t.by.clone(),
        purged: t.purged,
    }
}

fn tombstone(run_id: Uuid, d: Decision) -> Tombstone {
    Tombstone {
        run_id,
        deleted: d.deleted,
        decided_at: d.decided_at,
        region: d.region,
        by: d.by,
        purged: d.purged,
    }
}

fn bad_input_code(b: BadInput) -> u8 {
    match b {
        BadInput::TooLarge => 1,
        BadInput::Malformed => 2,
        BadInput::Forbidden => 3,
    }
}

fn bad_input(code: u8) -> Option<BadInput> {
    match code {
        1 => Some(BadInput::TooLarge),
        2 => Some(BadInput::Malformed),
        3 => Some(BadInput::Forbidden),
        _ => None,
    }
}

/// An incarnation number that differs from every other owner's: the sync driver takes a new
/// number for a reloaded run (what the old actor held back is gone), and the run may also
/// have moved to another pod.
fn incarnation(owner: &str, n: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    owner.hash(&mut h);
    h.finish() ^ n
}

impl Runs {
    /// The port other pods are reached through (set once the HTTP edge exists).
    pub fn set_transport(&self, transport: Arc<dyn Transport>) {
        let _ = self.inner.transport.set(transport);
    }

    async fn call_owner(
        &self,
        run_id: Uuid,
        owner: &Owner,
        call: &Call,
    ) -> Result<Reply, RunError> {
        let transport = self.inner.transport.get().ok_or_else(|| {
            RunError::Unavailable("this pod cannot reach the run's owner yet".into())
        })?;
        let reply = transport
            .post(&owner.address, run_id, wire::encode(call))
            .await
            .map_err(|e| {
                log::warn!(
                    "run {run_id}: its pod at {} did not answer: {e}",
                    owner.address
                );
                self.owner_unreachable(run_id);
                RunError::Unavailable(format!("the run's pod did not answer; try again ({e})"))
            })?;
        self.inner
            .metrics
            .forwarded
            .with_label_values(&["runtime"])
            .inc();
        match wire::decode::<Reply>(&reply) {
            Ok(Reply::Failed(f)) => {
                if f == Failure::Moved {
                    self.owner_unreachable(run_id);
                }
                Err(run_error(run_id, f))
            }
            Ok(reply) => Ok(reply),
            Err(e) => Err(RunError::Unavailable(format!(
                "the run's pod answered something else: {e}"
            ))),
        }
    }

    pub(super) async fn remote_sync_step(
        &self,
        run_id: Uuid,
        owner: &Owner,
        s: SyncStep,
    ) -> Result<SyncStepReply, RunError> {
        let call = Call::SyncStep {
            state: Box::new(wire::SyncState::from(&*s.state)),
            incoming: s
                .incoming
                .into_iter()
                .map(|m| ByteBuf::from(m.encode()))
                .collect(),
            source_region: s.source_region,
            via: s.via,
            client: s.client,
            author: s.author,
        };
        match self.call_owner(run_id, owner, &call).await? {
            Reply::SyncStep {
                state,
                outgoing,
                applied,
                lamport,
                error,
                bad_input: bad,
                incarnation: n,
                stored,
            } => {
                let state = state
                    .into_state()
                    .map_err(|e| RunError::Unavailable(e.to_string()))?;
                let outgoing = outgoing
                    .map(|b| sync::Message::decode(&b))
                    .transpose()
                    .map_err(|e| RunError::Unavailable(format!("the owner's message: {e}")))?;
                Ok(SyncStepReply {
                    state: Box::new(state),
                    outgoing,
                    applied,
                    lamport,
                    error,
                    bad_input: bad.and_then(bad_input),
                    incarnation: incarnation(&owner.member, n),
                    stored,
                })
            }
            _ => Err(unexpected()),
        }
    }

    pub(super) async fn remote_apply(
        &self,
        run_id: Uuid,
        owner: &Owner,
        c: RemoteChanges,
    ) -> Result<SyncOutcome, RunError> {
        let call = Call::ApplyChanges {
            changes: ByteBuf::from(run_doc::concat_changes(&c.changes)),
            source_region: c.source_region,
            lamport: c.lamport,
            via: c.via,
        };
        match self.call_owner(run_id, owner, &call).await? {
            Reply::Applied {
                applied,
                duplicates,
                parked,
                lamport,
                heads,
            } => Ok(SyncOutcome {
                applied,
                duplicates,
                parked,
                lamport,
                heads,
            }),
            _ => Err(unexpected()),
        }
    }

    pub(super) async fn remote_document(
        &self,
        run_id: Uuid,
        owner: &Owner,
    ) -> Result<FullDocument, RunError> {
        match self.call_owner(run_id, owner, &Call::FullDocument).await? {
            Reply::Document { bytes, lamport } => Ok(FullDocument {
                bytes: bytes.into_vec(),
                lamport,
            }),
            _ => Err(unexpected()),
        }
    }

    pub(super) async fn remote_changes_since(
        &self,
        run_id: Uuid,
        owner: &Owner,
        heads: &[automerge::ChangeHash],
    ) -> Result<ChangesSince, RunError> {
        match self
            .call_owner(run_id, owner, &Call::changes_since(heads))
            .await?
        {
            Reply::Changes {
                changes,
                count,
                heads,
            } => Ok(ChangesSince {
                changes: changes.into_vec(),
                count,
                heads,
            }),
            _ => Err(unexpected()),
        }
    }

    pub(super) async fn remote_tombstone(
        &self,
        owner: &Owner,
        t: &Tombstone,
        via: String,
    ) -> Result<Tombstone, RunError> {
        let call = Call::Tombstone {
            decision: decision(t),
            via,
        };
        match self.call_owner(t.run_id, owner, &call).await? {
            Reply::Decided(d) => Ok(tombstone(t.run_id, d)),
            _ => Err(unexpected()),
        }
    }

    /// Serves another pod's call for a run this pod owns. Never forwarded again: a run that
    /// is not (or no longer) here answers `Moved`.
    pub async fn serve_call(&self, run_id: Uuid, body: &[u8]) -> Vec<u8> {
        // Handing its runs over, this pod serves none: the caller looks again.
        if self.ownership().is_some_and(|o| o.is_leaving()) {
            return wire::encode(&Reply::Failed(Failure::Moved));
        }
        let reply = match wire::decode::<Call>(body) {
            Ok(call) => self
                .serve(run_id, call)
                .await
                .unwrap_or_else(|e| Reply::Failed(failure(e))),
            Err(e) => Reply::Failed(Failure::Refused(e.to_string())),
        };
        wire::encode(&reply)
    }

    async fn serve(&self, run_id: Uuid, call: Call) -> Result<Reply, RunError> {
        let bad =
            |e: wire::WireError| RunError::Doc(run_doc::DocError::InvalidChanges(e.to_string()));
        match call {
            Call::SyncStep {
                state,
                incoming,
                source_region,
                via,
                client,
                author,
            } => {
                let incoming = incoming
                    .iter()
                    .map(|b| run_doc::decode_sync_message(b))
                    .collect::<Result<Vec<_>, _>>()?;
                let step = SyncStep {
                    state: Box::new(state.into_state().map_err(bad)?),
                    incoming,
                    source_region,
                    via,
                    client,
                    author,
                };
                let r = self.send_here(run_id, Ask(step)).await??;
                Ok(Reply::SyncStep {
                    state: Box::new(wire::SyncState::from(&*r.state)),
                    outgoing: r.outgoing.map(|m| ByteBuf::from(m.encode())),
                    applied: r.applied,
                    lamport: r.lamport,
                    error: r.error,
                    bad_input: r.bad_input.map(bad_input_code),
                    incarnation: r.incarnation,
                    stored: r.stored,
                })
            }
            Call::ApplyChanges {
                changes,
                source_region,
                lamport,
                via,
            } => {
                let changes = run_doc::parse_peer_changes(&changes)?;
                let c = RemoteChanges {
                    changes,
                    source_region,
                    lamport,
                    via,
                };
                let o = self.send_here(run_id, Ask(c)).await??;
                Ok(Reply::Applied {
                    applied: o.applied,
                    duplicates: o.duplicates,
                    parked: o.parked,
                    lamport: o.lamport,
                    heads: o.heads,
                })
            }
            Call::Tombstone { decision, via } => {
                let tombstone = tombstone(run_id, decision);
                let t = self
                    .send_here(
                        run_id,
                        Ask(super::run_actor::Decide::Peer { tombstone, via }),
                    )
                    .await??;
                Ok(Reply::Decided(self::decision(&t)))
            }
            Call::FullDocument => {
                let d = self.send_here(run_id, Ask(ReadDocument)).await??;
                Ok(Reply::Document {
                    bytes: ByteBuf::from(d.bytes),
                    lamport: d.lamport,
                })
            }
            Call::ChangesSince { heads } => {
                let heads = Call::heads(heads).map_err(bad)?;
                let c = self.send_here(run_id, Ask(ReadChanges(heads))).await??;
                Ok(Reply::Changes {
                    changes: ByteBuf::from(c.changes),
                    count: c.count,
                    heads: c.heads,
                })
            }
        }
    }
}

fn unexpected() -> RunError {
    RunError::Unavailable("the run's pod answered another call".into())
}

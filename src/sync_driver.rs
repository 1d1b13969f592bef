//! One peer's sync of one run, without IO: events in, actions out. Used by the mesh (a peer
//! node) and by automerge-repo connections (a foreign client); the caller does the IO (asks
//! the run for a step through `Runs::sync_step`, sends what the actions say) and this decides.
//!
//! It keeps the peer's sync state (handed out while a step is with the run), notices a run
//! reloaded between steps (a new incarnation lost what the old one held back, so the state
//! starts afresh and the peer is asked to resend), counts failed and idle rounds so two sides
//! never talk forever, and turns a step's reply into what to send.

use automerge::sync;

use crate::runs::{BadInput, RunError, SyncOutcome, SyncStepReply};

/// Who the peer is: what a reset keeps, and what a step may offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// Another node: a reset keeps the heads both sides agreed on and sets Automerge's reset
    /// flag, so catch-up costs what was missed.
    Node,
    /// A foreign Automerge client (automerge-repo): a reset starts from nothing. A run nobody
    /// has written is offered as its genesis to a client that holds nothing of it (so an app
    /// can mint a run id, find it and write); to a client that holds a document of its own
    /// under the run's id, nothing is offered (that document must not take in the genesis).
    Client,
}

/// Failed rounds that restart the sync; beyond this the run waits for the next link.
pub const MAX_ERROR_RESYNCS: u8 = 3;
/// Steps in a row that carry no changes either way before the sync is reset: two sides whose
/// heads differ but that send each other nothing would otherwise talk forever.
pub const MAX_IDLE_ROUNDS: u8 = 6;
/// Resets for a stalled sync; after them it pauses until the next link.
pub const MAX_STALL_RESETS: u8 = 2;

/// What a step is to be asked with.
#[derive(Debug)]
pub struct StepRequest {
    pub state: Box<sync::State>,
    pub incoming: Vec<sync::Message>,
}

/// What the caller is to do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Send this sync message to the peer.
    Send(sync::Message),
    /// Start a fresh round now (the caller asks [`SyncDriver::resync`] for its request).
    Resync,
    /// Start a fresh round after a pause: this side failed to take what the peer sent.
    RetryLater,
    /// The run refused what the peer sent; `bad_input` says when it was the bytes themselves.
    Refused {
        reason: String,
        bad_input: Option<BadInput>,
    },
    /// The run could not be reached (storage down, actor restarting): nothing was taken.
    Unreachable(String),
    /// The sync makes no progress and has been reset too often: it waits for the next link.
    Paused,
}

/// One peer's sync of one run.
#[derive(Debug)]
pub struct SyncDriver {
    kind: PeerKind,
    /// `None` while a step is with the run.
    state: Option<Box<sync::State>>,
    /// The run actor's incarnation that answered the last step.
    incarnation: Option<u64>,
    error_resyncs: u8,
    idle_rounds: u8,
    stall_resets: u8,
}

impl SyncDriver {
    /// A sync starting from `saved` (a state kept from an earlier link) or from nothing.
    pub fn new(kind: PeerKind, saved: Option<Box<sync::State>>) -> Self {
        SyncDriver {
            kind,
            state: Some(saved.unwrap_or_default()),
            incarnation: None,
            error_resyncs: 0,
            idle_rounds: 0,
            stall_resets: 0,
        }
    }

    /// Whether a step is with the run.
    pub fn stepping(&self) -> bool {
        self.state.is_none()
    }

    /// The state to keep when the link goes (none while a step is out).
    pub fn state(&self) -> Option<&sync::State> {
        self.state.as_deref()
    }

    /// A step with `incoming`, the peer's messages in order (none: offer what the peer may
    /// lack), unless one is out.
    pub fn step(
        &mut self,
        incoming: impl IntoIterator<Item = sync::Message>,
    ) -> Option<StepRequest> {
        let state = self.state.take()?;
        Some(StepRequest {
            state,
            incoming: incoming.into_iter().collect(),
        })
    }

    /// A fresh round from what both sides last agreed on, asking the peer to resend what this
    /// side lacks; unless a step is out.
    pub fn resync(&mut self) -> Option<StepRequest> {
        let state = self.state.take()?;
        Some(StepRequest {
            state: self.reset(Some(&state)),
            incoming: Vec::new(),
        })
    }

    /// The peer reported an error for this run: a fresh round, a few times per link.
    pub fn peer_error(&mut self) -> Option<Action> {
        (self.error_resyncs < MAX_ERROR_RESYNCS).then(|| {
            self.error_resyncs += 1;
            Action::Resync
        })
    }

    /// Other work for the run went through (live changes applied, the whole run sent).
    pub fn progressed(&mut self) {
        self.error_resyncs = 0;
        self.stall_resets = 0;
    }

    /// Live changes from the peer were applied (or not): held-back changes need a round to
    /// fetch what they build on; a refusal is retried later.
    pub fn changes_applied(&mut self, result: Result<SyncOutcome, RunError>) -> Vec<Action> {
        match result {
            Ok(outcome) => {
                self.progressed();
                if outcome.parked > 0 {
                    vec![Action::Resync]
                } else {
                    Vec::new()
                }
            }
            Err(RunError::Doc(run_doc::DocError::MissingDependencies(_))) => {
                self.progressed();
                vec![Action::Resync]
            }
            Err(e) => self.failed_round(Action::Refused {
                reason: e.to_string(),
                bad_input: None,
            }),
        }
    }

    /// A step asked with `request` finished. `answered` says whether it answered a message
    /// of the peer's (its idle rounds are counted), `holds` whether that message said the peer
    /// holds the run.
    pub fn stepped(
        &mut self,
        sent: Option<&sync::State>,
        result: Result<SyncStepReply, RunError>,
        answered: bool,
        holds: bool,
    ) -> Vec<Action> {
        let reply = match result {
            Ok(reply) => reply,
            Err(e) => {
                // The peer must resend: the state kept asks it to.
                self.state = Some(self.reset(sent));
                return self.failed_round(Action::Unreachable(e.to_string()));
            }
        };
        if let Some(reason) = reply.error {
            self.state = Some(self.reset(Some(&reply.state)));
            return self.failed_round(Action::Refused {
                reason,
                bad_input: reply.bad_input,
            });
        }
        let reloaded = self
            .incarnation
            .is_some_and(|before| before != reply.incarnation);
        self.incarnation = Some(reply.incarnation);
        if reloaded {
            // The new incarnation lost whatever the old one held back: ask the peer to resend.
            self.state = Some(self.reset(Some(&reply.state)));
            return vec![Action::Resync];
        }
        self.state = Some(reply.state);
        let moved = reply.applied > 0
            || reply
                .outgoing
                .as_ref()
                .is_some_and(|m| !m.changes.is_empty());
        if moved {
            self.progressed();
        }
        let mut actions = Vec::new();
        if let Some(mut out) = reply.outgoing {
            if self.kind == PeerKind::Client && !reply.stored && holds {
                // Ask for the client's document, offer nothing of a run not stored here.
                out.changes = sync::ChunkList::empty();
            }
            actions.push(Action::Send(out));
        }
        if answered {
            self.idle_rounds = if moved || actions.is_empty() {
                // Progress, or the exchange is over.
                0
            } else {
                self.idle_rounds + 1
            };
            if self.idle_rounds >= MAX_IDLE_ROUNDS {
                self.idle_rounds = 0;
                actions.clear();
                if self.stall_resets < MAX_STALL_RESETS {
                    self.stall_resets += 1;
                    actions.push(Action::Resync);
                } else {
                    actions.push(Action::Paused);
                }
            }
        }
        actions
    }

    /// A round failed on this side: say why, and retry later a few times per link.
    fn failed_round(&mut self, why: Action) -> Vec<Action> {
        let mut actions = vec![why];
        if self.error_resyncs < MAX_ERROR_RESYNCS {
            self.error_resyncs += 1;
            actions.push(Action::RetryLater);
        }
        actions
    }

    /// The state a reset starts from.
    fn reset(&self, state: Option<&sync::State>) -> Box<sync::State> {
        match (self.kind, state) {
            // Kept: the shared heads and what the peer can do (with its capabilities known,
            // the reset is a flag; without, the peer must assume we lost everything).
            (PeerKind::Node, Some(s)) => {
                let mut fresh = s.clone();
                fresh.sent_hashes.clear();
                fresh.last_sent_heads.clear();
                fresh.their_have = None;
                fresh.their_need = None;
                fresh.in_flight = false;
                fresh.have_responded = false;
                fresh.needs_reset = true;
                Box::new(fresh)
            }
            (PeerKind::Node, None) => {
                let mut fresh = sync::State::new();
                fresh.needs_reset = true;
                Box::new(fresh)
            }
            (PeerKind::Client, _) => Box::default(),
        }
    }
}

#[cfg(test)]
mod tests;

//! The runtime's API, as the edges see it: typed requests in, named results out. The edges
//! never see the run actors' messages or the store; each method finds (or starts and loads) the
//! run's actor and asks it.

use std::time::Duration;

use automerge::{sync, Change, ChangeHash};
use run_doc::{Graft, Mutation, SharedState};
use uuid::Uuid;

use super::run_actor::Call;
use super::{RunError, Runs};

/// A local mutation, with the user to record in the log.
#[derive(Debug, Clone)]
pub struct Mutate {
    pub mutation: Mutation,
    pub user: Option<String>,
    /// A client's id for this operation: a repeat of an id this run recently applied (a client
    /// re-sending what it never saw acknowledged) is answered with the first outcome instead
    /// of being applied again over what others did since.
    pub op_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct MutationOutcome {
    /// False when the mutation changed nothing (so nothing was written).
    pub changed: bool,
    pub graft: Option<Graft>,
    pub lamport: u64,
    pub heads: Vec<String>,
}

/// Changes from another replica (HTTP sync, the mesh).
#[derive(Debug, Clone)]
pub struct RemoteChanges {
    pub changes: Vec<Change>,
    pub source_region: String,
    pub lamport: Option<u64>,
    /// The peer node that delivered them, when they came over the mesh. Changes from a peer
    /// that arrive ahead of their dependencies are held back rather than refused.
    pub via: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SyncOutcome {
    pub applied: usize,
    pub duplicates: usize,
    /// Changes held back for missing dependencies (mesh only).
    pub parked: usize,
    pub lamport: u64,
    pub heads: Vec<String>,
}

/// One step of Automerge's sync protocol with a peer. The caller owns `state` (one per run
/// per peer) and gets it back with the reply to send.
#[derive(Debug, Clone)]
pub struct SyncStep {
    pub state: Box<sync::State>,
    /// The peer's messages, taken in order before one reply; none: offer what it may lack.
    pub incoming: Vec<sync::Message>,
    pub source_region: String,
    pub via: String,
    /// Set when the peer is a foreign Automerge client (automerge-repo) rather than a node:
    /// its peer id, recorded as the events' user.
    pub client: Option<String>,
    /// The user whose own changes the message carries (a user token's `sub`): refused whole
    /// unless they keep the run's authorship rules for that user (`run_doc` `authorship`).
    pub author: Option<String>,
}

#[derive(Debug)]
pub struct SyncStepReply {
    pub state: Box<sync::State>,
    pub outgoing: Option<sync::Message>,
    pub applied: usize,
    pub lamport: u64,
    /// Why the incoming message was not (wholly) taken; what was applied before it is logged.
    pub error: Option<String>,
    /// Set when the incoming message was refused as bad bytes rather than as a change the run
    /// cannot take.
    pub bad_input: Option<BadInput>,
    /// Which incarnation of the run's actor answered: a new one lost what the old held back.
    pub incarnation: u64,
    /// Whether the run has anything stored (else it exists only as its genesis, here).
    pub stored: bool,
}

/// Why a peer's sync message was refused as input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadInput {
    /// It would cost more than one message may (see `run_doc::Budget`).
    TooLarge,
    /// Its bytes are not what they claim (not Automerge, truncated, an unaccepted chunk).
    Malformed,
    /// Its changes do what the writer may not (another user's name, an entry not theirs).
    Forbidden,
}

/// Every change the holder of some heads lacks.
#[derive(Debug, Clone)]
pub struct ChangesSince {
    /// The changes, concatenated in the wire format (`run_doc::parse_changes` reads it).
    pub changes: Vec<u8>,
    pub count: usize,
    pub heads: Vec<String>,
}

/// The whole document (`save()`) and the clock, for a peer that lacks the run.
#[derive(Debug, Clone)]
pub struct FullDocument {
    pub bytes: Vec<u8>,
    pub lamport: u64,
}

/// A run and when it last had a change committed: an entry of the runs list, and (the last
/// entry of a page) where the next page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunActivity {
    pub run_id: Uuid,
    pub last_activity: chrono::NaiveDateTime,
}

impl From<run_store::RunActivity> for RunActivity {
    fn from(a: run_store::RunActivity) -> Self {
        RunActivity {
            run_id: a.run_id,
            last_activity: a.last_activity,
        }
    }
}

impl From<&RunActivity> for run_store::RunActivity {
    fn from(a: &RunActivity) -> Self {
        run_store::RunActivity {
            run_id: a.run_id,
            last_activity: a.last_activity,
        }
    }
}

/// A page of the runs list, most recently active first.
#[derive(Debug, Clone)]
pub struct RunsPage {
    pub runs: Vec<RunActivity>,
    /// Where the next page starts, if there is one.
    pub next: Option<RunActivity>,
}

/// What the readiness probe reports of storage.
#[derive(Debug, Clone)]
pub struct Health {
    pub backend: &'static str,
    /// `Err` says why the database did not answer.
    pub database: Result<(), String>,
    /// Runs whose stored changes did not all load again, with how many did not (a few of
    /// them; see [`Runs::damaged`]).
    pub damaged: Vec<(Uuid, usize)>,
}

/// Queries the actors answer; private to the runtime.
#[derive(Debug, Clone)]
pub(crate) struct ReadState;
#[derive(Debug, Clone)]
pub(crate) struct ReadChanges(pub Vec<ChangeHash>);
#[derive(Debug, Clone)]
pub(crate) struct ReadHistory {
    pub after: Option<ChangeHash>,
    pub limit: usize,
}
#[derive(Debug, Clone)]
pub(crate) struct ReadStateAt(pub Vec<ChangeHash>);
#[derive(Debug, Clone)]
pub(crate) struct ReadDiff {
    pub from: Vec<ChangeHash>,
    pub to: Option<Vec<ChangeHash>>,
}
#[derive(Debug, Clone)]
pub(crate) struct ReadDocument;

/// Damaged runs the health endpoint names.
const MAX_DAMAGED_SHOWN: usize = 20;

/// How long the readiness probe waits for the database.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

impl Runs {
    /// Applies a local mutation; answers once it is durable.
    pub async fn mutate(&self, run_id: Uuid, m: Mutate) -> Result<MutationOutcome, RunError> {
        self.send(run_id, Call(m)).await?
    }

    /// Applies changes from another replica; answers once they are durable.
    pub async fn apply_changes(
        &self,
        run_id: Uuid,
        c: RemoteChanges,
    ) -> Result<SyncOutcome, RunError> {
        self.ask_or_owner(run_id, Call(c), |owner, Call(c)| async move {
            self.remote_apply(run_id, &owner, c).await
        })
        .await
    }

    /// The run's state as the log holds it.
    pub async fn state(&self, run_id: Uuid) -> Result<std::sync::Arc<SharedState>, RunError> {
        self.send(run_id, Call(ReadState)).await?
    }

    /// Every durable change the holder of `heads` lacks.
    pub async fn changes_since(
        &self,
        run_id: Uuid,
        heads: Vec<ChangeHash>,
    ) -> Result<ChangesSince, RunError> {
        self.ask_or_owner(
            run_id,
            Call(ReadChanges(heads)),
            |owner, Call(ReadChanges(heads))| async move {
                self.remote_changes_since(run_id, &owner, &heads).await
            },
        )
        .await
    }

    /// A page of the run's history: up to `limit` changes after the change `after`, in the
    /// causal order every region gives alike.
    pub async fn history(
        &self,
        run_id: Uuid,
        after: Option<ChangeHash>,
        limit: usize,
    ) -> Result<run_doc::HistoryPage, RunError> {
        self.send(run_id, Call(ReadHistory { after, limit }))
            .await?
    }

    /// The run's state as it was at `heads`.
    pub async fn state_at(
        &self,
        run_id: Uuid,
        heads: Vec<ChangeHash>,
    ) -> Result<run_doc::RunState, RunError> {
        self.send(run_id, Call(ReadStateAt(heads))).await?
    }

    /// What changed between two points of the run (`to`: now), and who did it.
    pub async fn diff(
        &self,
        run_id: Uuid,
        from: Vec<ChangeHash>,
        to: Option<Vec<ChangeHash>>,
    ) -> Result<run_doc::RunDiff, RunError> {
        self.send(run_id, Call(ReadDiff { from, to })).await?
    }

    /// The whole durable document.
    pub async fn full_document(&self, run_id: Uuid) -> Result<FullDocument, RunError> {
        self.ask_or_owner(run_id, Call(ReadDocument), |owner, _| async move {
            self.remote_document(run_id, &owner).await
        })
        .await
    }

    /// One step of the sync protocol with a peer.
    pub async fn sync_step(&self, run_id: Uuid, s: SyncStep) -> Result<SyncStepReply, RunError> {
        self.ask_or_owner(run_id, Call(s), |owner, Call(s)| async move {
            self.remote_sync_step(run_id, &owner, s).await
        })
        .await
    }

    /// Runs, most recently active first, `limit` at a time after `after`.
    pub async fn recent_runs(
        &self,
        after: Option<&RunActivity>,
        limit: i64,
    ) -> Result<RunsPage, RunError> {
        // One more than asked says whether there is a next page.
        let after = after.map(run_store::RunActivity::from);
        let mut runs: Vec<RunActivity> = self
            .inner
            .store
            .recent_runs(after.as_ref(), limit + 1)
            .await
            .map_err(|e| RunError::Unavailable(e.to_string()))?
            .into_iter()
            .map(RunActivity::from)
            .collect();
        let more = runs.len() as i64 > limit;
        runs.truncate(usize::try_from(limit).unwrap_or(0));
        let next = more.then(|| runs.last().cloned()).flatten();
        Ok(RunsPage { runs, next })
    }

    /// The ids of every run stored here, `page` at a time after `after`, in id order.
    pub async fn stored_runs(&self, after: Option<Uuid>, page: i64) -> Result<Vec<Uuid>, RunError> {
        self.inner
            .store
            .list_runs(after, page)
            .await
            .map_err(|e| RunError::Unavailable(e.to_string()))
    }

    /// Whether the database answers (within two seconds).
    pub async fn health(&self) -> Health {
        let database = match tokio::time::timeout(PING_TIMEOUT, self.inner.store.ping()).await {
            // A pod of a region sharing the database serves once it is a member (and while it
            // is not leaving): until then it could claim nothing.
            Ok(Ok(())) if self.ownership().is_some_and(|o| !o.is_member()) => {
                Err("not (or no longer) a member of the region's pods".into())
            }
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the database did not answer within {} s",
                PING_TIMEOUT.as_secs()
            )),
        };
        Health {
            backend: self.inner.store.backend(),
            database,
            damaged: self.damaged(MAX_DAMAGED_SHOWN),
        }
    }
}

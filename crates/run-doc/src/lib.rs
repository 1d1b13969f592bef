//! The run document: one Automerge document per workflow run, with no IO and no actix.
//!
//! A run holds three things, each a CRDT inside one Automerge document:
//! - `grafts`: a list of agents grafted into the run (`{id, agent, afterStep, user, region,
//!   lamport, createdAt}`); concurrent grafts are all kept;
//! - `prunedSteps`: a map used as a set, stepId → `{user, region, lamport}`; a concurrent prune
//!   and unprune resolve to pruned (add wins);
//! - `flags`: a map of JSON values; concurrent writes to one key keep a deterministic winner and
//!   the losing values stay visible as a conflict.
//!
//! [`RunDoc`] owns the document and the run's Lamport clock. Every local mutation increments the
//! clock and stamps it into the graft or prune entry and into the change's commit message;
//! applying a remote change advances the clock to at least the change's stamp. This module owns
//! the document's rules; it does not know about actors, storage or the network.

mod authorship;
mod bounds;
mod changes;
mod describe;
mod genesis;
mod graft_index;
mod grafts_end;
mod history;
mod json;
mod legacy;
mod projection;
mod reader;
pub mod rules;
mod schema;
mod state;
mod sync_message;

use std::collections::{HashMap, HashSet};

use automerge::{
    sync::{self, SyncDoc},
    transaction::{CommitOptions, Transactable},
    ActorId, AutoCommit, AutomergeError, Change, ChangeHash, ObjType, Prop, ReadDoc, ScalarValue,
};
use serde_json::Value as Json;
use uuid::Uuid;

pub use bounds::{Budget, MAX_OPS_PER_CHANGE, MAX_OPS_PER_REQUEST, MAX_PEER_OPS_PER_REQUEST};
pub use changes::{
    concat_changes, parse_changes, parse_changes_or_document, parse_document, parse_own_changes,
    parse_own_document, parse_peer_changes, parse_peer_document, Stamp,
};
pub use describe::{entry_user, Described, Kind};
pub use genesis::genesis_actor;
pub use history::{FlagChange, HistoryEntry, HistoryPage, RunDiff, Touched};
pub use legacy::{legacy_actor, LegacyEvent};
pub use projection::Projection;
use rules::MAX_FOREIGN_JUMP;
pub use rules::{MAX_LAMPORT, MAX_LAMPORT_STEP};
pub use state::{Graft, PrunedStep, RunState, SharedState};
pub use sync_message::decode_sync_message;

use genesis::{FLAGS, GRAFTS, PRUNED_STEPS};
use state::root_obj;

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("invalid change bytes: {0}")]
    InvalidChanges(String),
    /// Bytes that would cost more than a request may (operations, inflated size).
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("changes depend on {} change(s) this run does not have: {}", .0.len(), hashes(.0))]
    MissingDependencies(Vec<ChangeHash>),
    #[error("the document does not follow the run schema: {0}")]
    Schema(String),
    /// A user's changes did what the user may not (see `authorship`): refused whole.
    #[error("refused: {0}")]
    NotPermitted(String),
    #[error("change {hash} is refused: {reason}")]
    Refused { hash: ChangeHash, reason: String },
    /// A Lamport timestamp too far past the run's clock: accepting it would pin the clock (and
    /// so the order of every later graft) in every region.
    #[error("{0}")]
    ClockJump(String),
    /// A point of history named by a change the run does not hold.
    #[error("{0} is not a change of this run")]
    UnknownChange(ChangeHash),
    #[error("not a saved document of run {run_id}: {reason}")]
    NotThisRun { run_id: Uuid, reason: String },
    #[error("automerge rejected the operation: {0}")]
    Automerge(#[from] AutomergeError),
}

fn hashes(hs: &[ChangeHash]) -> String {
    hs.iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The highest Lamport stamp among the document's changes: where its clock resumes.
fn highest_stamp(doc: &mut AutoCommit) -> u64 {
    doc.get_changes_meta(&[])
        .iter()
        .filter_map(|m| Stamp::parse(m.message.as_deref()?))
        .map(|s| s.lamport)
        .max()
        .unwrap_or(0)
}

/// A mutation a user asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    Graft {
        id: Uuid,
        /// True when the client chose `id` so that it can retry safely: a graft with this id
        /// already present is then answered instead of grafted again (a look-up in the graft
        /// index). Fresh server-chosen ids skip it.
        retry_safe: bool,
        agent: String,
        after_step: String,
        user: String,
    },
    Prune {
        step_id: String,
        user: String,
    },
    Unprune {
        step_id: String,
    },
    SetFlag {
        key: String,
        value: Json,
    },
    DeleteFlag {
        key: String,
    },
    /// One change after which the run's state is its state at `to` (history is never
    /// rewritten: grafts, pruned steps and flags made since are removed, those removed since
    /// are written again).
    Revert {
        to: Vec<ChangeHash>,
    },
    /// Names the run's current heads: a change with no operations whose stamp carries the
    /// label, so it replicates with the run and the history lists it.
    Checkpoint {
        label: String,
    },
}

impl Mutation {
    /// The event type recorded in `collaboration_events`.
    pub fn event_type(&self) -> &'static str {
        match self {
            Mutation::Graft { .. } => "GRAFT",
            Mutation::Prune { .. } => "PRUNE",
            Mutation::Unprune { .. } => "UNPRUNE",
            Mutation::SetFlag { .. } => "SET_FLAG",
            Mutation::DeleteFlag { .. } => "DELETE_FLAG",
            Mutation::Revert { .. } => "REVERT",
            Mutation::Checkpoint { .. } => "CHECKPOINT",
        }
    }
}

/// The result of a local mutation.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The new change; `None` when the mutation changed nothing (unprune of a step that is not
    /// pruned, delete of an absent flag).
    pub change: Option<Change>,
    /// The graft as stored, for graft mutations.
    pub graft: Option<Graft>,
    pub lamport: u64,
}

/// The result of applying changes from elsewhere.
#[derive(Debug, Default)]
pub struct RemoteApplied {
    /// Changes that were new to this document, in the order they were applied.
    pub applied: Vec<Change>,
    /// Changes that were already present (a no-op).
    pub duplicates: usize,
    /// Set when a change failed to apply; the changes before it stay applied.
    pub error: Option<DocError>,
    /// Changes held back for missing dependencies (only [`RunDoc::apply_remote_parking`]).
    pub parked: usize,
}

impl RemoteApplied {
    /// Adds what a later batch did to this one's.
    fn absorb(&mut self, later: RemoteApplied) {
        self.applied.extend(later.applied);
        self.duplicates += later.duplicates;
        // How many are held back now, not per batch.
        self.parked = later.parked;
        if later.error.is_some() {
            self.error = later.error;
        }
    }
}

/// One run's Automerge document and Lamport clock.
pub struct RunDoc {
    run_id: Uuid,
    region: String,
    doc: AutoCommit,
    lamport: u64,
    genesis: ChangeHash,
    /// Changes a peer's sync message carried before what they build on (a Bloom filter false
    /// positive hides a change from the sender): kept until their dependencies arrive, and
    /// asked for meanwhile. Not applied, not logged, not acknowledged.
    parked: HashMap<ChangeHash, Change>,
    grafts: graft_index::GraftIndex,
    /// The history's order, kept until the heads move (see `history::Order`).
    order: Option<history::Order>,
    /// Where the next graft goes, kept until the heads move (see `grafts_end`).
    grafts_end: grafts_end::GraftsEnd,
}

/// What one mutation's operations did: true if anything changed; for a graft, its object, what
/// it reads as, and the grafts list with the length it has once the change commits.
type Written = (
    bool,
    Option<(automerge::ObjId, Graft, (automerge::ObjId, usize))>,
);

/// The result of one sync-protocol step; see [`RunDoc::sync_step`].
#[derive(Debug, Default)]
pub struct SyncStep {
    /// New changes applied (to be logged), and the error that stopped the step, if any.
    pub applied: RemoteApplied,
    pub reply: Option<sync::Message>,
}

/// Parked changes per run; beyond this they are dropped and the protocol fetches them again.
const MAX_PARKED: usize = 100_000;
const MAX_PARKED_BYTES: usize = 64 * 1024 * 1024;

impl RunDoc {
    /// A new, empty run: the deterministic genesis, then a fresh random actor id for this
    /// incarnation's own changes.
    pub fn new(run_id: Uuid, region: &str) -> Self {
        let mut doc = genesis::genesis_doc(run_id);
        let genesis = doc.get_heads()[0];
        doc.set_actor(ActorId::random());
        RunDoc {
            run_id,
            region: region.to_string(),
            doc,
            lamport: 0,
            genesis,
            parked: HashMap::new(),
            grafts: Default::default(),
            order: None,
            grafts_end: Default::default(),
        }
    }

    /// A run from a saved document (a snapshot). The clock starts at the highest stamp found.
    pub fn load(run_id: Uuid, region: &str, bytes: &[u8]) -> Result<Self, DocError> {
        let not_this_run = |reason: String| DocError::NotThisRun { run_id, reason };
        // A snapshot is the node's own: what it committed it must load again, so no count
        // bound applies (a bound here would lose acknowledged writes). The walk still refuses
        // what is not a well-formed document (a torn row, chunk types Automerge's loader
        // would allocate gigabytes for).
        Budget::own()
            .admit_all(bytes)
            .map_err(|e| not_this_run(e.to_string()))?;
        let mut doc = changes::load_document(bytes).map_err(not_this_run)?;
        let genesis = genesis::genesis_doc(run_id).get_heads()[0];
        if doc.get_change_meta_by_hash(&genesis).is_none() {
            return Err(not_this_run("it lacks the run's genesis change".into()));
        }
        let lamport = highest_stamp(&mut doc);
        doc.set_actor(ActorId::random());
        Ok(RunDoc {
            run_id,
            region: region.to_string(),
            doc,
            lamport,
            genesis,
            parked: HashMap::new(),
            grafts: Default::default(),
            order: None,
            grafts_end: Default::default(),
        })
    }

    /// The document as it was at `heads` (what the log holds), under a fresh actor id: the
    /// changes after it were never made durable, and their actor's sequence must not be reused.
    pub fn rolled_back(&mut self, heads: &[ChangeHash], lamport: u64) -> Result<RunDoc, DocError> {
        let mut doc = self.doc.fork_at(heads)?;
        doc.set_actor(ActorId::random());
        Ok(RunDoc {
            run_id: self.run_id,
            region: self.region.clone(),
            doc,
            lamport,
            genesis: self.genesis,
            // Held-back peer changes are not in the document: they stay held back.
            parked: std::mem::take(&mut self.parked),
            grafts: Default::default(),
            order: None,
            grafts_end: Default::default(),
        })
    }

    /// A copy of the document and its graft index, to be saved elsewhere: a snapshot is built
    /// on the snapshot thread from this, not by pausing the run to serialize it. Cloning
    /// copies Automerge's columns (memory copies), far cheaper than `save`. Changes held back
    /// for missing dependencies are not part of the document and are not copied.
    pub fn copy_for_snapshot(&self) -> RunDoc {
        RunDoc {
            run_id: self.run_id,
            region: self.region.clone(),
            doc: self.doc.clone(),
            lamport: self.lamport,
            genesis: self.genesis,
            parked: HashMap::new(),
            grafts: self.grafts.clone(),
            order: None,
            grafts_end: Default::default(),
        }
    }

    pub fn lamport(&self) -> u64 {
        self.lamport
    }

    /// Advances the clock to at least `seen` (a timestamp received or recovered from storage).
    pub fn observe_lamport(&mut self, seen: u64) {
        if seen <= MAX_LAMPORT {
            self.lamport = self.lamport.max(seen);
        }
    }

    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    pub fn state(&mut self) -> RunState {
        let heads = self.doc.get_heads().iter().map(|h| h.to_string()).collect();
        let grafts = self.grafts.grafts(&mut self.doc);
        state::read_state(reader::At::now(&self.doc), self.lamport, heads, grafts)
    }

    /// The state and where each graft sits, to be kept with a snapshot of this document.
    pub fn projection(&mut self) -> Projection {
        let state = self.state();
        let list = self.grafts.export(&mut self.doc);
        Projection::new(state, list)
    }

    /// Builds the graft index from the projection kept with the snapshot this document was
    /// loaded from, before anything else is applied. False when it is not of these heads or
    /// does not match (the first read then rebuilds the index).
    pub fn seed_index(&mut self, projection: &Projection) -> bool {
        let heads = self.doc.get_heads();
        let same = heads.len() == projection.state.heads.len()
            && heads
                .iter()
                .zip(&projection.state.heads)
                .all(|(h, p)| h.to_string() == *p);
        same && self.grafts.seed(&mut self.doc, projection)
    }

    /// Applies a local mutation as one change, stamped with the next Lamport timestamp.
    /// On error nothing is left half-done in the document.
    pub fn apply(&mut self, mutation: &Mutation, now_ms: i64) -> Result<Applied, DocError> {
        self.apply_by(mutation, now_ms, None)
    }

    /// [`Self::apply`], recording `user` as the change's author in its stamp, which travels
    /// with the change to every region.
    pub fn apply_by(
        &mut self,
        mutation: &Mutation,
        now_ms: i64,
        user: Option<&str>,
    ) -> Result<Applied, DocError> {
        if let Mutation::Graft {
            id,
            retry_safe: true,
            ..
        } = mutation
        {
            // A retried graft (same id) is answered with the graft already stored.
            if let Some(existing) = self.grafts.find(&mut self.doc, &id.to_string()) {
                return Ok(Applied {
                    change: None,
                    graft: Some(existing),
                    lamport: self.lamport,
                });
            }
        }
        let lamport = self.lamport.saturating_add(1).min(MAX_LAMPORT);
        // Only an index in use follows local changes directly (else the next read rebuilds it).
        let built_on = if self.grafts.in_use() {
            self.doc.get_heads()
        } else {
            Vec::new()
        };
        let (changed, written) = match self.write(mutation, lamport, now_ms) {
            Ok(r) => r,
            Err(e) => {
                self.doc.rollback();
                return Err(e);
            }
        };
        // The one definition of a valid change holds for this node's own too: a change every
        // replica accepts from a peer and loads again. The doors bound mutations well inside
        // this (names, flag values); this is the backstop.
        let ops = self.doc.pending_ops() as u64;
        if ops > MAX_OPS_PER_CHANGE {
            self.doc.rollback();
            return Err(DocError::TooLarge(format!(
                "the mutation would make a change of {ops} operations; at most \
                 {MAX_OPS_PER_CHANGE} are accepted"
            )));
        }
        if !changed {
            self.doc.rollback();
            return Ok(Applied {
                change: None,
                graft: None,
                lamport: self.lamport,
            });
        }
        let stamp = Stamp {
            lamport,
            region: self.region.clone(),
            user: user.map(str::to_string),
            revert_to: match mutation {
                Mutation::Revert { to } => Some(to.iter().map(|h| h.to_string()).collect()),
                _ => None,
            },
            checkpoint: match mutation {
                Mutation::Checkpoint { label } => Some(label.clone()),
                _ => None,
            },
        };
        let options = CommitOptions::default()
            .with_message(stamp.to_message())
            .with_time(now_ms.div_euclid(1000));
        if matches!(mutation, Mutation::Checkpoint { .. }) {
            // A change of no operations, which Automerge's commit would drop.
            self.doc.empty_change(options);
        } else if self.doc.commit_with(options).is_none() {
            // Automerge drops writes that change nothing (a flag set to its current value):
            // then there is no change, and the clock does not move.
            return Ok(Applied {
                change: None,
                graft: None,
                lamport: self.lamport,
            });
        }
        self.lamport = lamport;
        let graft = written.map(|(obj, g, (list, len))| {
            // Known only once committed: a write refused above teaches nothing.
            self.grafts_end.remember(self.doc.get_heads(), list, len);
            (obj, g)
        });
        let shown = graft.as_ref().map(|(_, g)| g.clone());
        if matches!(mutation, Mutation::Revert { .. }) {
            // It may remove grafts: the index catches up from Automerge's diff.
            self.grafts.note_changes(&mut self.doc, 1);
        } else {
            self.grafts.local_change(&mut self.doc, &built_on, graft);
        }
        let graft = shown;
        let change = self.doc.get_last_local_change();
        Ok(Applied {
            change,
            graft,
            lamport,
        })
    }

    /// The operations of one mutation, in the open transaction (see [`Written`]).
    fn write(
        &mut self,
        mutation: &Mutation,
        lamport: u64,
        now_ms: i64,
    ) -> Result<Written, DocError> {
        let region = self.region.clone();
        Ok(match mutation {
            Mutation::Graft {
                id,
                agent,
                after_step,
                user,
                ..
            } => {
                // Nothing is written yet, so reading the heads commits no open transaction.
                let (list, at) = match self.grafts_end.at(&self.doc.get_heads()) {
                    Some(end) => end,
                    None => {
                        let list = self.root(GRAFTS, ObjType::List)?;
                        let at = self.doc.length(&list);
                        (list, at)
                    }
                };
                let g = Graft {
                    id: id.to_string(),
                    agent: agent.clone(),
                    after_step: after_step.clone(),
                    user: user.clone(),
                    region,
                    lamport,
                    created_at: chrono::DateTime::from_timestamp_millis(now_ms)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                        .unwrap_or_default(),
                };
                let entry = object([
                    ("id", g.id.as_str().into()),
                    ("agent", g.agent.as_str().into()),
                    ("afterStep", g.after_step.as_str().into()),
                    ("user", g.user.as_str().into()),
                    ("region", g.region.as_str().into()),
                    ("lamport", lamport_scalar(lamport)),
                    ("createdAt", ScalarValue::Timestamp(now_ms)),
                ]);
                // One batch operation for the whole map: Automerge applies it several times
                // faster than one put per field, and the ops are the same.
                let obj = self.doc.batch_create_object(&list, at, &entry, true)?;
                (true, Some((obj, g, (list, at + 1))))
            }
            Mutation::Prune { step_id, user } => {
                let pruned = self.root(PRUNED_STEPS, ObjType::Map)?;
                let entry = object([
                    ("user", user.as_str().into()),
                    ("region", region.as_str().into()),
                    ("lamport", lamport_scalar(lamport)),
                ]);
                self.doc
                    .batch_create_object(&pruned, step_id.as_str(), &entry, false)?;
                (true, None)
            }
            Mutation::Unprune { step_id } => {
                let pruned = self.root(PRUNED_STEPS, ObjType::Map)?;
                (self.delete_if_present(&pruned, step_id)?, None)
            }
            Mutation::SetFlag { key, value } => {
                let flags = self.root(FLAGS, ObjType::Map)?;
                json::put_json(&mut self.doc, &flags, Prop::Map(key.clone()), value)?;
                (true, None)
            }
            Mutation::DeleteFlag { key } => {
                let flags = self.root(FLAGS, ObjType::Map)?;
                (self.delete_if_present(&flags, key)?, None)
            }
            Mutation::Revert { to } => (self.write_revert(to)?, None),
            Mutation::Checkpoint { .. } => (true, None),
        })
    }

    /// The operations that bring the state back to its state at `to`; true if any.
    fn write_revert(&mut self, to: &[ChangeHash]) -> Result<bool, DocError> {
        // Read before anything is written: forking closes the open transaction.
        let then = self.at(to)?.state();
        let now = self.state();
        let mut changed = false;
        // Grafts: those made since go (every entry of their id), those removed since return.
        let kept: HashSet<&str> = then.grafts.iter().map(|g| g.id.as_str()).collect();
        let list = self.root(GRAFTS, ObjType::List)?;
        let doomed: Vec<usize> = self
            .doc
            .list_range(&list, ..)
            .filter(|item| {
                let id = match item.value {
                    automerge::ValueRef::Object(ObjType::Map) => {
                        state::str_field(&self.doc, &item.id(), "id")
                    }
                    _ => None,
                };
                id.is_some_and(|id| !kept.contains(id.as_str()))
            })
            .map(|item| item.index)
            .collect();
        for index in doomed.into_iter().rev() {
            self.doc.delete(&list, index)?;
            changed = true;
        }
        let present: HashSet<&str> = now.grafts.iter().map(|g| g.id.as_str()).collect();
        for g in then
            .grafts
            .iter()
            .filter(|g| !present.contains(g.id.as_str()))
        {
            let at = self.doc.length(&list);
            let created = chrono::DateTime::parse_from_rfc3339(&g.created_at)
                .map_or(0, |t| t.timestamp_millis());
            let entry = object([
                ("id", g.id.as_str().into()),
                ("agent", g.agent.as_str().into()),
                ("afterStep", g.after_step.as_str().into()),
                ("user", g.user.as_str().into()),
                ("region", g.region.as_str().into()),
                ("lamport", lamport_scalar(g.lamport)),
                ("createdAt", ScalarValue::Timestamp(created)),
            ]);
            self.doc.batch_create_object(&list, at, &entry, true)?;
            changed = true;
        }
        // Pruned steps and flags: as they were.
        let pruned = self.root(PRUNED_STEPS, ObjType::Map)?;
        for p in &now.pruned_steps {
            if !then.pruned_steps.iter().any(|t| t.step_id == p.step_id) {
                changed |= self.delete_if_present(&pruned, &p.step_id)?;
            }
        }
        for p in &then.pruned_steps {
            // Missing now, or pruned again since by someone else: the entry as it was.
            if !now.pruned_steps.contains(p) {
                let entry = object([
                    ("user", p.user.as_str().into()),
                    ("region", p.region.as_str().into()),
                    ("lamport", lamport_scalar(p.lamport)),
                ]);
                self.doc
                    .batch_create_object(&pruned, p.step_id.as_str(), &entry, false)?;
                changed = true;
            }
        }
        let flags = self.root(FLAGS, ObjType::Map)?;
        for key in now.flags.keys() {
            if !then.flags.contains_key(key) {
                changed |= self.delete_if_present(&flags, key)?;
            }
        }
        for (key, value) in &then.flags {
            let same = now.flags.get(key) == Some(value) && !now.flag_conflicts.contains_key(key);
            if !same {
                json::put_json(&mut self.doc, &flags, Prop::Map(key.clone()), value)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    fn root(&self, key: &str, kind: ObjType) -> Result<automerge::ObjId, DocError> {
        root_obj(&self.doc, key, kind).map_err(DocError::Schema)
    }

    fn delete_if_present(&mut self, map: &automerge::ObjId, key: &str) -> Result<bool, DocError> {
        if self.doc.get(map, key)?.is_none() {
            return Ok(false);
        }
        self.doc.delete(map, key)?;
        Ok(true)
    }

    /// Applies changes from another replica. Changes already present are skipped (a no-op);
    /// a batch whose dependencies are neither here nor in the batch is refused whole, and so is
    /// a batch holding a change that could take over the run's root objects (see
    /// [`Self::check_foreign`]). The clock advances to the highest stamp seen, and to
    /// `remote_lamport` when at least one change was new.
    pub fn apply_remote(
        &mut self,
        changes: Vec<Change>,
        remote_lamport: Option<u64>,
    ) -> Result<RemoteApplied, DocError> {
        let (ordered, stuck, duplicates) = self.order_new_changes(changes);
        if !stuck.is_empty() {
            return Err(DocError::MissingDependencies(self.missing_of(&stuck)));
        }
        let clock = self.check_stamps(&ordered, true)?;
        if let Some(l) = remote_lamport.filter(|l| *l > clock.saturating_add(MAX_LAMPORT_STEP)) {
            return Err(DocError::ClockJump(format!(
                "lamportTimestamp {l} is more than {MAX_LAMPORT_STEP} past the run's clock \
                 ({clock} with these changes)"
            )));
        }
        self.apply_ordered(ordered, duplicates, remote_lamport, true)
    }

    /// As [`RunDoc::apply_remote`], for changes from a mesh peer: those whose dependencies are
    /// missing are parked, not refused, so the next sync round asks for exactly what they need
    /// (a refusal would make the peer resend the same batch, with the same gap, again).
    pub fn apply_remote_parking(
        &mut self,
        changes: Vec<Change>,
        remote_lamport: Option<u64>,
    ) -> Result<RemoteApplied, DocError> {
        // A peer's: each stamp is checked, not the batch as a whole (see `check_stamps`).
        let (ordered, stuck, duplicates) = self.with_parked(changes, false)?;
        self.park(stuck);
        let mut out = self.apply_ordered(ordered, duplicates, remote_lamport, false)?;
        out.parked = self.parked.len();
        Ok(out)
    }

    /// Holds back changes whose dependencies are missing; false if there were too many to keep.
    fn park(&mut self, stuck: Vec<Change>) -> bool {
        let bytes: usize = stuck.iter().map(|c| c.raw_bytes().len()).sum();
        if stuck.len() > MAX_PARKED || bytes > MAX_PARKED_BYTES {
            return false;
        }
        self.parked.extend(stuck.into_iter().map(|c| (c.hash(), c)));
        true
    }

    /// Applies new changes already in dependency order, after checking every one.
    fn apply_ordered(
        &mut self,
        ordered: Vec<Change>,
        duplicates: usize,
        remote_lamport: Option<u64>,
        batch_bound: bool,
    ) -> Result<RemoteApplied, DocError> {
        for change in &ordered {
            self.check_foreign(change)?;
        }
        let mut out = RemoteApplied {
            duplicates,
            ..Default::default()
        };
        // One batch is far cheaper than one call per change; if Automerge rejects the batch,
        // go one at a time so the changes before the bad one stay applied and reported.
        if self.doc.apply_changes_batch(ordered.clone()).is_ok() {
            out.applied = ordered;
        } else {
            for change in ordered {
                if self.has(&change.hash()) {
                    out.applied.push(change);
                    continue;
                }
                if let Err(e) = self.doc.apply_changes([change.clone()]) {
                    out.error = Some(DocError::Automerge(e));
                    break;
                }
                out.applied.push(change);
            }
        }
        let ceiling = match batch_bound {
            true => self.batch_ceiling(out.applied.len()),
            false => u64::MAX,
        };
        for change in &out.applied {
            self.observe_stamp(change, ceiling);
        }
        self.grafts.note_changes(&mut self.doc, out.applied.len());
        // A peer's clock for the run may be ahead of the changes it sent so far (it pages a
        // long history); one beyond the step is ignored, never taken.
        let within = self.lamport.saturating_add(MAX_LAMPORT_STEP);
        if let Some(l) = remote_lamport.filter(|l| !out.applied.is_empty() && *l <= within) {
            self.observe_lamport(l);
        }
        Ok(out)
    }

    /// One step of Automerge's sync protocol with one peer: applies the changes `incoming`
    /// carries, checked like any remote change, then returns the reply to send, if any.
    ///
    /// Changes whose dependencies are missing are parked and their dependencies added to the
    /// reply's `need`, so the peer sends what its Bloom filter wrongly thought we had. On an
    /// error the step stops: the changes applied before it are reported (they must be logged),
    /// no reply is made, and the caller resets the sync state.
    pub fn sync_step(
        &mut self,
        state: &mut sync::State,
        incoming: impl IntoIterator<Item = sync::Message>,
        budget: Budget,
    ) -> SyncStep {
        self.sync_step_by(state, incoming, budget, None)
    }

    /// As [`RunDoc::sync_step`], for a user's own changes: with `author`, the changes must keep
    /// the run's authorship rules for that user (see `authorship`), or the whole message is
    /// refused with [`DocError::NotPermitted`] and nothing of it stays in the document.
    ///
    /// Several messages are taken in order, each on its own (its own budget, its own
    /// authorship check), before one reply: what a peer sent while its last step was being
    /// made durable costs one step, not one each. A refused message stops the step; those
    /// before it stay applied.
    pub fn sync_step_by(
        &mut self,
        state: &mut sync::State,
        incoming: impl IntoIterator<Item = sync::Message>,
        budget: Budget,
        author: Option<&str>,
    ) -> SyncStep {
        let mut step = SyncStep::default();
        let mut newly_parked = false;
        for message in incoming {
            let mut applied = RemoteApplied::default();
            let received = self.receive(state, message, budget.clone(), author, &mut applied);
            step.applied.absorb(applied);
            match received {
                Ok(parked) => newly_parked |= parked,
                Err(e) => step.applied.error = Some(e),
            }
            if step.applied.error.is_some() {
                return step;
            }
        }
        if !step.applied.applied.is_empty() {
            // A later message without changes, whose heads are now ours, would have Automerge
            // think the peer knows we hold them: it must hear our heads (as `receive` says).
            state.last_sent_heads.clear();
        }
        step.reply = self.doc.sync().generate_sync_message(state);
        self.ask_for_parked(state, &mut step.reply, newly_parked);
        step
    }

    /// Returns the document to `heads` (changes just applied are refused): the document as it
    /// was, under the same actor, with its clock and held-back changes as they were.
    fn undo(&mut self, heads: &[ChangeHash], lamport: u64, parked: HashMap<ChangeHash, Change>) {
        let actor = self.doc.get_actor().clone();
        // Forking at heads the document holds cannot fail; if it ever did, the refused changes
        // would stay in memory, so it panics and the run's guard unloads the run, which reloads
        // from the log (where they never went).
        let mut doc = self
            .doc
            .fork_at(heads)
            .expect("forking at the document's own earlier heads");
        doc.set_actor(actor);
        self.doc = doc;
        self.lamport = lamport;
        self.parked = parked;
        self.grafts = Default::default();
    }

    /// Takes a peer's sync message: its changes (bounded, checked, held back while their
    /// dependencies are missing) into `applied`, the rest into `state`. True when it left more
    /// changes held back than before.
    fn receive(
        &mut self,
        state: &mut sync::State,
        mut message: sync::Message,
        mut budget: Budget,
        author: Option<&str>,
        applied: &mut RemoteApplied,
    ) -> Result<bool, DocError> {
        validate_sync_message(&message)?;
        let mut changes = Vec::new();
        // One budget for the whole message: its chunks together are one request.
        for chunk in message.changes.iter() {
            changes.extend(changes::parse_within(chunk, &mut budget)?);
        }
        let before = self.parked.len();
        let bound = !budget.is_peer();
        let undo = author.map(|_| (self.doc.get_heads(), self.lamport, self.parked.clone()));
        let (ordered, stuck, duplicates) = self.with_parked(changes, bound)?;
        *applied = self.apply_ordered(ordered, duplicates, None, bound)?;
        if let (Some(author), Some((heads, lamport, parked))) = (author, undo) {
            if !applied.applied.is_empty() {
                let checked = authorship::check_stamps(&applied.applied, author)
                    .and_then(|()| authorship::check(&mut self.doc, &heads, author));
                if let Err(reason) = checked {
                    self.undo(&heads, lamport, parked);
                    *applied = RemoteApplied::default();
                    return Err(DocError::NotPermitted(reason));
                }
            }
        }
        if applied.error.is_some() {
            return Ok(false);
        }
        let newly_parked = stuck.len() > before;
        if !self.park(stuck) {
            // Dropped: the peer counts them as sent, so ask it to forget what it sent.
            state.needs_reset = true;
        }
        // The changes are in; the rest of the message updates what we know of the peer.
        message.changes = sync::ChunkList::empty();
        self.doc.sync().receive_sync_message(state, message)?;
        if !applied.applied.is_empty() {
            // Automerge answers a message that brought changes; with the changes applied by us
            // it would think nothing came, and the peer would not learn our heads.
            state.last_sent_heads.clear();
        }
        Ok(newly_parked)
    }

    /// Checks `changes` from elsewhere, joins the held-back ones to them and orders the lot:
    /// (applicable in order, still missing dependencies, duplicates). A refusal leaves the
    /// held-back changes held.
    fn with_parked(
        &mut self,
        mut changes: Vec<Change>,
        batch_bound: bool,
    ) -> Result<(Vec<Change>, Vec<Change>, usize), DocError> {
        // Refused before the held-back changes join them: a refusal must not drop those.
        for change in &changes {
            self.check_foreign(change)?;
        }
        let held: Vec<Change> = self.parked.values().cloned().collect();
        changes.extend(self.parked.drain().map(|(_, c)| c));
        let (ordered, stuck, duplicates) = self.order_new_changes(changes);
        if let Err(e) = self.check_stamps(&ordered, batch_bound) {
            self.park(held);
            return Err(e);
        }
        Ok((ordered, stuck, duplicates))
    }

    /// While changes are held back, the reply asks for what they need (starting a round when
    /// the protocol thinks it is done).
    fn ask_for_parked(
        &mut self,
        state: &mut sync::State,
        reply: &mut Option<sync::Message>,
        newly_parked: bool,
    ) {
        if self.parked.is_empty() {
            return;
        }
        if reply.is_none() && newly_parked {
            *state = sync::State::decode(&state.encode()).unwrap_or_default();
            *reply = self.doc.sync().generate_sync_message(state);
        }
        let parked: Vec<Change> = self.parked.values().cloned().collect();
        let missing = self.missing_of(&parked);
        if let Some(reply) = reply.as_mut() {
            // Automerge encodes hash lists sorted (and asserts it in debug builds).
            reply.need.extend(missing);
            reply.need.sort();
            reply.need.dedup();
        }
    }

    /// Replays stored changes (loading a run): everything whose dependencies are present is
    /// applied; changes that cannot be are returned, so the caller can report them.
    pub fn replay(&mut self, changes: Vec<Change>) -> Vec<Change> {
        let (ordered, stuck, _) = self.order_new_changes(changes);
        // The node's own log: never judged more strictly than when it was written.
        for change in &ordered {
            self.observe_stamp(change, u64::MAX);
        }
        let mut rejected = stuck;
        self.grafts.note_changes(&mut self.doc, ordered.len());
        if self.doc.apply_changes_batch(ordered.clone()).is_err() {
            // Find the culprits one at a time; the others still apply.
            for change in ordered {
                let hash = change.hash();
                if !self.has(&hash) && self.doc.apply_changes([change.clone()]).is_err() {
                    rejected.push(change);
                }
            }
        }
        rejected
    }

    /// A change from outside must build on this run (only the run's own genesis has no
    /// dependencies). One that breaks the run's shape is taken all the same (see
    /// [`schema`]): every replica must hold the same changes.
    fn check_foreign(&self, change: &Change) -> Result<(), DocError> {
        let refuse = |reason: &str| DocError::Refused {
            hash: change.hash(),
            reason: reason.into(),
        };
        if change.deps().is_empty() && change.hash() != self.genesis {
            return Err(refuse(
                "it does not build on this run (no dependencies, not the run's genesis)",
            ));
        }
        Ok(())
    }

    /// Refuses changes (in the order they would apply) whose stamp is more than
    /// [`MAX_LAMPORT_STEP`] past the clock as it would be when each applies: a node stamps its
    /// change one past everything the change builds on, so an honest stamp never is. Returns
    /// the clock after them.
    ///
    /// With `batch_bound` (a client's or service's request), the batch as a whole may move the
    /// clock at most a step plus one per change. Not for a peer node's: its history may hold
    /// stamps that followed its own clients' jumps (unstamped changes, not counted here), and
    /// refusing that history would keep the run split between regions.
    fn check_stamps(&self, ordered: &[Change], batch_bound: bool) -> Result<u64, DocError> {
        let mut clock = self.lamport;
        for change in ordered {
            let Some(stamp) = Stamp::of(change) else {
                continue;
            };
            if stamp.lamport > clock.saturating_add(MAX_LAMPORT_STEP) {
                return Err(DocError::ClockJump(format!(
                    "change {} is stamped {}, more than {MAX_LAMPORT_STEP} past the run's \
                     clock ({clock})",
                    change.hash(),
                    stamp.lamport
                )));
            }
            clock = clock.max(stamp.lamport);
        }
        // Each stamp may be a step past the clock, but not a step past the one before it, over
        // and over: 5,000 chained changes moved the clock by 10^10 in one request.
        let allowed = self.batch_ceiling(ordered.len());
        if batch_bound && clock > allowed {
            return Err(DocError::ClockJump(format!(
                "these {} changes would move the run's clock from {} to {clock}; one request \
                 may move it at most {MAX_LAMPORT_STEP} plus one per change",
                ordered.len(),
                self.lamport
            )));
        }
        Ok(clock)
    }

    /// The highest clock a batch of `changes` from elsewhere may bring the run to.
    fn batch_ceiling(&self, changes: usize) -> u64 {
        self.lamport
            .saturating_add(MAX_LAMPORT_STEP)
            .saturating_add(changes as u64)
    }

    /// Advances the clock past a change's stamp: a node's is in its commit message; a
    /// foreign client's (automerge-repo) in the `lamport` fields it wrote, up to `ceiling`
    /// for the batch it came in.
    fn observe_stamp(&mut self, change: &Change, ceiling: u64) {
        let seen = match Stamp::of(change) {
            Some(s) => Some(s.lamport),
            // A client's own stamps may move the clock only so far: one absurd value must
            // not pin every later stamp at the maximum.
            None if change.hash() != self.genesis => schema::written_lamport(change)
                .filter(|l| *l <= self.lamport.saturating_add(MAX_FOREIGN_JUMP) && *l <= ceiling),
            None => None,
        };
        if let Some(l) = seen {
            self.observe_lamport(l);
        }
    }

    /// What `changes`, already applied, broke of the run schema (empty if nothing). Checked
    /// for changes from foreign clients, whose writes the node did not shape itself.
    pub fn schema_violations(&self, changes: &[Change]) -> Vec<String> {
        // Automerge walks the document's parents here with asserts of its own: on a shape
        // it did not expect, report instead of taking the run's thread down.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            schema::check_changes(&self.doc, self.run_id, changes)
        }))
        .unwrap_or_else(|_| vec!["the schema check failed on these changes".into()])
    }

    fn has(&mut self, hash: &ChangeHash) -> bool {
        self.doc.get_change_meta_by_hash(hash).is_some()
    }

    /// Splits `changes` into (new ones in dependency order, new ones whose dependencies are
    /// missing, count of duplicates). A topological sort (Kahn's), linear in the batch, so a
    /// large batch in reverse order costs no more than one in order.
    fn order_new_changes(&mut self, changes: Vec<Change>) -> (Vec<Change>, Vec<Change>, usize) {
        let total = changes.len();
        let mut index: HashMap<ChangeHash, usize> = HashMap::with_capacity(total);
        let mut pending: Vec<Option<Change>> = Vec::with_capacity(total);
        for c in changes {
            let hash = c.hash();
            if !index.contains_key(&hash) && !self.has(&hash) {
                index.insert(hash, pending.len());
                pending.push(Some(c));
            }
        }
        let duplicates = total - pending.len();
        // For each change: how many of its dependencies are in the batch and not yet ordered,
        // and whether one is neither here nor in the batch.
        let mut unmet = vec![0usize; pending.len()];
        let mut missing = vec![false; pending.len()];
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); pending.len()];
        for (i, change) in pending.iter().enumerate() {
            for dep in change.as_ref().map_or(&[][..], |c| c.deps()) {
                match index.get(dep) {
                    Some(&j) => {
                        unmet[i] += 1;
                        children[j].push(i);
                    }
                    None if !self.has(dep) => missing[i] = true,
                    None => {}
                }
            }
        }
        let mut ready: Vec<usize> = (0..pending.len())
            .filter(|&i| unmet[i] == 0 && !missing[i])
            .collect();
        let mut ordered = Vec::with_capacity(pending.len());
        while let Some(i) = ready.pop() {
            if let Some(change) = pending[i].take() {
                ordered.push(change);
            }
            for &child in &children[i] {
                unmet[child] -= 1;
                if unmet[child] == 0 && !missing[child] {
                    ready.push(child);
                }
            }
        }
        let stuck = pending.into_iter().flatten().collect();
        (ordered, stuck, duplicates)
    }

    /// The dependencies of `stuck` that nothing here or in `stuck` provides.
    fn missing_of(&mut self, stuck: &[Change]) -> Vec<ChangeHash> {
        let inside: HashSet<ChangeHash> = stuck.iter().map(|c| c.hash()).collect();
        let mut missing: Vec<ChangeHash> = stuck
            .iter()
            .flat_map(|c| c.deps().to_vec())
            .filter(|d| !inside.contains(d))
            .collect();
        missing.retain(|d| !self.has(d));
        missing.sort();
        missing.dedup();
        missing
    }

    /// A page of the run's history (see `history`): up to `limit` entries after the change
    /// `after`, in the causal order every region gives alike.
    pub fn history(
        &mut self,
        after: Option<ChangeHash>,
        limit: usize,
    ) -> Result<HistoryPage, DocError> {
        let legacy = legacy_actor(self.run_id);
        let order = self.take_order();
        let page = history::page(&mut self.doc, &order, &legacy, after, limit);
        self.order = Some(order);
        page
    }

    /// The history's order at the current heads: the one kept, or worked out anew.
    fn take_order(&mut self) -> history::Order {
        let heads = self.doc.get_heads();
        match self.order.take() {
            Some(order) if order.is_for(&heads) => order,
            _ => history::Order::of(&mut self.doc, self.genesis),
        }
    }

    /// The run as it was at `heads` (changes of this run; not empty).
    fn at(&mut self, heads: &[ChangeHash]) -> Result<RunDoc, DocError> {
        self.known(heads)?;
        let mut doc = self.doc.fork_at(heads)?;
        let lamport = highest_stamp(&mut doc);
        Ok(RunDoc {
            run_id: self.run_id,
            region: self.region.clone(),
            doc,
            lamport,
            genesis: self.genesis,
            parked: HashMap::new(),
            grafts: Default::default(),
            order: None,
            grafts_end: Default::default(),
        })
    }

    /// The state exactly as it was at `heads`, read in place (Automerge's reads at heads),
    /// not from a copy of the document forked there.
    pub fn state_at(&mut self, heads: &[ChangeHash]) -> Result<RunState, DocError> {
        self.known(heads)?;
        let mut point = heads.to_vec();
        point.sort();
        point.dedup();
        if point == self.doc.get_heads() {
            return Ok(self.state());
        }
        let order = self.take_order();
        let (lamport, before) = order.up_to(&point);
        let near_now = before * 2 > order.len();
        self.order = Some(order);
        // Near now, the grafts kept read serve, less what changed since; early on, the few
        // grafts there were are read at the point.
        let grafts = match near_now {
            true => self.grafts.read_near(&mut self.doc, &point),
            false => graft_index::GraftIndex::read(reader::At::point(&self.doc, &point)),
        };
        let at = reader::At::point(&self.doc, &point);
        let shown = point.iter().map(|h| h.to_string()).collect();
        Ok(state::read_state(at, lamport, shown, grafts))
    }

    /// Refuses a point of history this run does not hold, or none at all.
    fn known(&mut self, heads: &[ChangeHash]) -> Result<(), DocError> {
        if let Some(h) = heads
            .iter()
            .find(|h| self.doc.get_change_meta_by_hash(h).is_none())
        {
            return Err(DocError::UnknownChange(*h));
        }
        if heads.is_empty() {
            return Err(DocError::InvalidChanges(
                "a point of history names its heads".into(),
            ));
        }
        Ok(())
    }

    /// What changed from `from` to `to` (now, if `None`), with who did it.
    pub fn diff(
        &mut self,
        from: &[ChangeHash],
        to: Option<&[ChangeHash]>,
    ) -> Result<RunDiff, DocError> {
        let mut before = self.at(from)?;
        // Up to now: this document itself, not a copy of it.
        let mut forked = to.map(|to| self.at(to)).transpose()?;
        let after = forked.as_mut().unwrap_or(self);
        let who = history::authors(&mut after.doc, &mut before.doc);
        Ok(history::diff(&before.state(), &after.state(), &who))
    }

    /// What `change` (which this run holds) did, as the change feed describes it.
    pub fn describe(&mut self, change: &Change) -> Described {
        let heads = self.doc.get_heads();
        describe::describe(&self.doc, change, &heads)
    }

    /// Every change the holder of `heads` lacks. Heads this document does not know are
    /// ignored, so the answer is a superset of what is missing (applying a change twice is a
    /// no-op).
    pub fn changes_since(&mut self, heads: &[ChangeHash]) -> Vec<Change> {
        let known: Vec<ChangeHash> = heads.iter().filter(|h| self.has(h)).copied().collect();
        self.doc.get_changes(&known)
    }

    /// A digest of the heads: two replicas with the same digest hold the same changes.
    pub fn heads_digest(&mut self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut heads = self.doc.get_heads();
        heads.sort();
        let mut hasher = Sha256::new();
        for h in &heads {
            hasher.update(h.as_ref());
        }
        hasher.finalize().into()
    }

    /// Whether changes wait here for their dependencies (see [`RunDoc::sync_step`]).
    pub fn has_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// How many operations and changes the document holds.
    pub fn size(&self) -> (u64, u64) {
        let stats = self.doc.stats();
        (stats.num_ops, stats.num_changes)
    }

    /// The whole document in Automerge's compact form.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }
}

/// An Automerge map of scalar fields, for a batch create.
fn object<const N: usize>(fields: [(&str, ScalarValue); N]) -> automerge::hydrate::Value {
    let map: HashMap<&str, automerge::hydrate::Value> = fields
        .into_iter()
        .map(|(k, v)| (k, automerge::hydrate::Value::scalar(v)))
        .collect();
    automerge::hydrate::Value::from(map)
}

/// Lamport timestamps are stored as signed integers: JavaScript clients and BIGINT columns
/// both read them without surprises.
fn lamport_scalar(lamport: u64) -> ScalarValue {
    ScalarValue::Int(i64::try_from(lamport).unwrap_or(i64::MAX))
}

/// Rejects what Automerge would choke on in a peer's sync message: its Bloom filters are read
/// without checks, so a zero divisor would panic the run's thread and a huge probe count
/// would allocate gigabytes.
pub fn validate_sync_message(message: &sync::Message) -> Result<(), DocError> {
    for have in &message.have {
        let bytes = have.bloom.to_bytes();
        let mut rest = &bytes[..];
        let mut field = || {
            let (value, len) = changes::read_uleb128(rest)?;
            rest = &rest[len..];
            Some(value)
        };
        let header = (field(), field(), field());
        let ok = match header {
            _ if bytes.is_empty() => true,
            (Some(0), _, _) => true,
            // Automerge writes 10 bits per entry and 7 probes; nothing else is meaningful.
            (Some(entries), Some(10), Some(7)) => {
                entries <= 100_000_000 && rest.len() as u64 >= (entries * 10).div_ceil(8)
            }
            _ => false,
        };
        if !ok {
            return Err(DocError::InvalidChanges(
                "the sync message's Bloom filter is malformed".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

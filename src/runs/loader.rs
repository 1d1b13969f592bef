//! Loading a run from storage: the newest snapshot, then only the events after it.
//!
//! A snapshot that does not load (torn, corrupt, written for another run) is skipped with a
//! warning in favour of the next older one, and with none left the run is rebuilt from its whole
//! event log; events are never deleted. A stored change that cannot be applied is reported, and
//! everything that does not depend on it is still applied. Legacy operational-transform rows
//! (no `crdt_changes`) are replayed first, deterministically (see `doc::legacy`); a malformed
//! one is skipped with a warning.
//!
//! Reading storage is async ([`fetch`]); building the document is CPU work (a 50,000-graft run
//! takes most of a second) and runs on a blocking thread, never on the arbiter thread that
//! serves the other runs. The projection kept with the snapshot builds the graft index without
//! reading every graft (`RunDoc::seed_index`), and lets a run actor answer reads while the
//! document loads (see `run_actor::lifecycle`).

use std::sync::Arc;

use uuid::Uuid;

use run_doc::{parse_own_changes, LegacyEvent, Projection, RunDoc};
use run_store::{Snapshot, Store, StoreError, StoredEvent};

pub struct Loaded {
    pub doc: RunDoc,
    /// `run_seq` of the last event in the log (the next local event gets this + 1).
    pub last_seq: i64,
    /// `run_seq` covered by the snapshot the run was loaded from (0 if none).
    pub snapshot_seq: i64,
    /// Stored events or changes that could not be read or applied (reported in the log).
    pub unreadable: usize,
    /// Legacy (OT) rows replayed, and those skipped as malformed.
    pub legacy_replayed: usize,
    pub legacy_skipped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("building the run's document failed: {0}")]
    Build(String),
}

/// What storage holds of a run: a snapshot (if any) and the events after it.
pub struct Stored {
    snapshot: Option<Snapshot>,
    events: Vec<StoredEvent>,
}

impl Stored {
    /// The snapshot's projection, when it describes all that is stored: no event follows it.
    fn full_projection(&self) -> Option<&[u8]> {
        if !self.events.is_empty() {
            return None;
        }
        self.snapshot.as_ref()?.projection.as_deref()
    }
}

/// How many older snapshots to try before replaying the whole log.
const SNAPSHOT_ATTEMPTS: usize = 3;

/// The newest snapshot (below `below` events, to fall back from one that does not load) and
/// the events after it.
pub async fn fetch(
    store: &dyn Store,
    run_id: Uuid,
    below: Option<i32>,
) -> Result<Stored, StoreError> {
    let snapshot = store.latest_snapshot(run_id, below).await?;
    let after = snapshot.as_ref().map_or(0, |s| i64::from(s.event_count));
    let events = store.events_after(run_id, after).await?;
    Ok(Stored { snapshot, events })
}

/// [`fetch`], with the snapshot's projection when it covers all that is stored, decoded on a
/// blocking thread (a large run's takes tens of milliseconds to inflate and parse).
pub async fn fetch_projected(
    store: &dyn Store,
    run_id: Uuid,
) -> Result<(Stored, Option<Arc<Projection>>), LoadError> {
    let stored = fetch(store, run_id, None).await?;
    if stored.full_projection().is_none() {
        return Ok((stored, None));
    }
    tokio::task::spawn_blocking(move || {
        let projection = stored.full_projection().and_then(|bytes| {
            Projection::decode(bytes)
                .inspect_err(|e| log::warn!("run {run_id}: its projection is not used: {e}"))
                .ok()
        });
        (stored, projection.map(Arc::new))
    })
    .await
    .map_err(|e| LoadError::Build(e.to_string()))
}

pub async fn load(store: &dyn Store, run_id: Uuid, region: &str) -> Result<Loaded, LoadError> {
    let stored = fetch(store, run_id, None).await?;
    load_from(store, run_id, region, stored, None).await
}

/// Builds the run from what [`fetch`] read, falling back to older snapshots and at last to the
/// whole log. `projection`: the snapshot's, already decoded by the caller.
pub async fn load_from(
    store: &dyn Store,
    run_id: Uuid,
    region: &str,
    mut stored: Stored,
    mut projection: Option<Arc<Projection>>,
) -> Result<Loaded, LoadError> {
    let mut attempts = 0;
    loop {
        let region = region.to_string();
        let seed = projection.take();
        let built = tokio::task::spawn_blocking(move || build(run_id, &region, stored, seed))
            .await
            .map_err(|e| LoadError::Build(e.to_string()))?;
        let below = match built {
            Ok(loaded) => return Ok(loaded),
            Err(below) => below,
        };
        attempts += 1;
        stored = if attempts < SNAPSHOT_ATTEMPTS {
            fetch(store, run_id, Some(below)).await?
        } else {
            // Never fails: with no snapshot there is nothing to fall back from.
            Stored {
                snapshot: None,
                events: store.events_after(run_id, 0).await?,
            }
        };
    }
}

/// The run from a snapshot and the events after it; `Err(event_count)` of a snapshot that
/// does not load, to try an older one.
fn build(
    run_id: Uuid,
    region: &str,
    stored: Stored,
    projection: Option<Arc<Projection>>,
) -> Result<Loaded, i32> {
    let Stored { snapshot, events } = stored;
    let from_snapshot = snapshot.is_some();
    let (mut doc, snapshot_seq) = match snapshot {
        None => (RunDoc::new(run_id, region), 0),
        Some(snapshot) => match RunDoc::load(run_id, region, &snapshot.data) {
            Ok(mut doc) => {
                doc.observe_lamport(u64::try_from(snapshot.lamport).unwrap_or(0));
                let projection = projection.or_else(|| {
                    let bytes = snapshot.projection.as_deref()?;
                    Projection::decode(bytes).ok().map(Arc::new)
                });
                if let Some(p) = projection {
                    if !doc.seed_index(&p) {
                        log::warn!(
                            "run {run_id}: snapshot {}'s projection does not match it",
                            snapshot.id
                        );
                    }
                }
                (doc, i64::from(snapshot.event_count))
            }
            Err(e) => {
                log::warn!(
                    "run {run_id}: snapshot {} does not load ({e}); trying an older one",
                    snapshot.id
                );
                return Err(snapshot.event_count);
            }
        },
    };
    // Legacy rows come only with the whole log (no snapshot), first, onto the bare genesis:
    // replayed before anything else touches the document, they come out identical everywhere.
    // A snapshot already holds the replay.
    let legacy: Vec<LegacyEvent> = events
        .iter()
        .filter(|e| e.crdt_changes.is_none() && !from_snapshot)
        .map(|e| LegacyEvent {
            event_type: &e.event_type,
            payload: e.payload.as_deref(),
            user_id: e.user_id.as_deref(),
            created_at: e.created_at,
        })
        .collect();
    let skipped = doc.replay_legacy(run_id, &legacy);
    for (position, reason) in &skipped {
        log::warn!("run {run_id}: legacy event #{position} skipped: {reason}");
    }
    let mut last_seq = snapshot_seq;
    let mut changes = Vec::with_capacity(events.len());
    let mut unreadable = 0;
    for event in &events {
        last_seq = last_seq.max(event.run_seq.unwrap_or(0));
        if let Some(l) = event.lamport {
            doc.observe_lamport(u64::try_from(l).unwrap_or(0));
        }
        // Legacy rows (no changes) were replayed above. The log holds only what this node
        // accepted: it is read back with no bound (a stricter rule here would drop
        // acknowledged writes and everything after them).
        if let Some(bytes) = &event.crdt_changes {
            match parse_own_changes(bytes) {
                Ok(mut c) => changes.append(&mut c),
                Err(e) => {
                    unreadable += 1;
                    log::error!(
                        "run {run_id}: event {:?} holds bad change bytes: {e}",
                        event.run_seq
                    );
                }
            }
        }
    }
    if !changes.is_empty() {
        let rejected = doc.replay(changes);
        unreadable += rejected.len();
        if !rejected.is_empty() {
            log::error!(
                "run {run_id}: {} stored change(s) could not be applied (first: {})",
                rejected.len(),
                rejected[0].hash()
            );
        }
    }
    Ok(Loaded {
        doc,
        last_seq,
        snapshot_seq,
        unreadable,
        legacy_replayed: legacy.len() - skipped.len(),
        legacy_skipped: skipped.len(),
    })
}

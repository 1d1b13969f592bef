//! Loading a run from storage: the newest snapshot, then only the events after it.
//!
//! A snapshot that does not load (torn, corrupt, written for another run) is skipped with a
//! warning in favour of the next older one, and with none left the run is rebuilt from its whole
//! event log; events are never deleted. A stored change that cannot be applied is reported, and
//! everything that does not depend on it is still applied. Legacy operational-transform rows
//! (no `crdt_changes`) are replayed first, deterministically (see `doc::legacy`); a malformed
//! one is skipped with a warning.

use uuid::Uuid;

use run_doc::{parse_own_changes, LegacyEvent, RunDoc};
use run_store::{Store, StoreError};

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

/// How many older snapshots to try before replaying the whole log.
const SNAPSHOT_ATTEMPTS: usize = 3;

pub async fn load(store: &dyn Store, run_id: Uuid, region: &str) -> Result<Loaded, StoreError> {
    let (mut doc, snapshot_seq, from_snapshot) = from_snapshot(store, run_id, region).await?;
    let events = store.events_after(run_id, snapshot_seq).await?;
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

async fn from_snapshot(
    store: &dyn Store,
    run_id: Uuid,
    region: &str,
) -> Result<(RunDoc, i64, bool), StoreError> {
    let mut below = None;
    for _ in 0..SNAPSHOT_ATTEMPTS {
        let Some(snapshot) = store.latest_snapshot(run_id, below).await? else {
            break;
        };
        match RunDoc::load(run_id, region, &snapshot.data) {
            Ok(mut doc) => {
                doc.observe_lamport(u64::try_from(snapshot.lamport).unwrap_or(0));
                return Ok((doc, i64::from(snapshot.event_count), true));
            }
            Err(e) => {
                log::warn!(
                    "run {run_id}: snapshot {} does not load ({e}); trying an older one",
                    snapshot.id
                );
                below = Some(snapshot.event_count);
            }
        }
    }
    Ok((RunDoc::new(run_id, region), 0, false))
}

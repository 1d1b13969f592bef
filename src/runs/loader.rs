//! Loading a run from storage: the newest snapshot, then only the events after it.
//!
//! A snapshot that fails to load (torn, corrupt, written for another run) is skipped with a
//! warning and the run is rebuilt from its whole event log instead; events are never deleted.

use uuid::Uuid;

use crate::doc::{parse_changes, RunDoc};
use crate::store::{Store, StoreError};

pub struct Loaded {
    pub doc: RunDoc,
    /// `run_seq` of the last event in the log (the next local event gets this + 1).
    pub last_seq: i64,
    /// `run_seq` covered by the snapshot the run was loaded from (0 if none).
    pub snapshot_seq: i64,
}

pub async fn load(store: &dyn Store, run_id: Uuid, region: &str) -> Result<Loaded, StoreError> {
    let mut doc = None;
    let mut snapshot_seq = 0i64;
    if let Some(snapshot) = store.latest_snapshot(run_id).await? {
        match RunDoc::load(run_id, region, &snapshot.data) {
            Ok(mut d) => {
                d.observe_lamport(u64::try_from(snapshot.lamport).unwrap_or(0));
                snapshot_seq = i64::from(snapshot.event_count);
                doc = Some(d);
            }
            Err(e) => log::warn!(
                "run {run_id}: snapshot {} does not load ({e}); replaying the whole event log",
                snapshot.id
            ),
        }
    }
    let mut doc = doc.unwrap_or_else(|| RunDoc::new(run_id, region));
    let events = store.events_after(run_id, snapshot_seq).await?;
    let mut last_seq = snapshot_seq;
    let mut changes = Vec::with_capacity(events.len());
    for event in &events {
        last_seq = last_seq.max(event.run_seq.unwrap_or(0));
        if let Some(l) = event.lamport {
            doc.observe_lamport(u64::try_from(l).unwrap_or(0));
        }
        match &event.crdt_changes {
            Some(bytes) => match parse_changes(bytes) {
                Ok(mut c) => changes.append(&mut c),
                Err(e) => log::warn!(
                    "run {run_id}: event {:?} holds bad change bytes: {e}",
                    event.run_seq
                ),
            },
            None => log::warn!(
                "run {run_id}: legacy {} event is not replayed by this version; skipped",
                event.event_type
            ),
        }
    }
    if !changes.is_empty() {
        match doc.apply_remote(changes, None) {
            Ok(outcome) => {
                if let Some(e) = outcome.error {
                    log::error!("run {run_id}: a stored change does not apply: {e}");
                }
            }
            Err(e) => log::error!("run {run_id}: stored changes do not apply: {e}"),
        }
    }
    Ok(Loaded {
        doc,
        last_seq,
        snapshot_seq,
    })
}

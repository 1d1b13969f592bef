//! Replaying the old operational-transform (OT) log into the CRDT.
//!
//! A legacy row of `collaboration_events` has no `crdt_changes`: its `event_type` is `GRAFT`,
//! `PRUNE`, `UNPRUNE`, `SET_FLAG` or `DELETE_FLAG` and its JSON `payload` carries `agent`,
//! `afterStep` (GRAFT), `stepId` (PRUNE, UNPRUNE), `key` and `value` (SET_FLAG, DELETE_FLAG),
//! with `user` and `region` (falling back to the row's `user_id` and to `legacy`).
//!
//! Every node that replays the same log must produce byte-identical Automerge changes, so that
//! regions replaying it independently merge without duplicates. So the replay uses only the
//! rows' own data: a fixed actor id derived from the run id, the row's `created_at` as the
//! change time, graft ids derived from the run id and the row's position, Lamport stamps
//! counted from the genesis, and the rows in their stored order.

use automerge::ActorId;
use chrono::NaiveDateTime;
use serde::Deserialize;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{Mutation, RunDoc};

/// Prefix of legacy actor ids: never the genesis actor, never a random incarnation's.
const LEGACY_ACTOR_PREFIX: &[u8] = b"crdt-node:legacy:";

/// One legacy row, as stored.
#[derive(Debug, Clone, Copy)]
pub struct LegacyEvent<'a> {
    pub event_type: &'a str,
    pub payload: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub created_at: NaiveDateTime,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    agent: Option<String>,
    after_step: Option<String>,
    step_id: Option<String>,
    key: Option<String>,
    #[serde(default, deserialize_with = "present")]
    value: Option<Json>,
    user: Option<String>,
    region: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Json>, D::Error> {
    Json::deserialize(d).map(Some)
}

/// The fixed actor id of a run's replayed legacy changes.
pub fn legacy_actor(run_id: Uuid) -> ActorId {
    let mut bytes = LEGACY_ACTOR_PREFIX.to_vec();
    bytes.extend_from_slice(run_id.as_bytes());
    ActorId::from(bytes)
}

/// The id of the graft replayed from the legacy row at `position`.
fn graft_id(run_id: Uuid, position: usize) -> Uuid {
    let digest = Sha256::new()
        .chain_update(LEGACY_ACTOR_PREFIX)
        .chain_update(run_id.as_bytes())
        .chain_update((position as u64).to_be_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

fn name(field: &'static str, value: Option<String>) -> Result<String, String> {
    super::rules::stored_name(field, value.as_deref()).map_err(|e| e.to_string())
}

/// The mutation a legacy row describes, and the region it was made in.
fn mutation(run_id: Uuid, position: usize, e: &LegacyEvent) -> Result<(Mutation, String), String> {
    let p: Payload = serde_json::from_str(e.payload.unwrap_or("{}"))
        .map_err(|err| format!("payload is not the legacy JSON: {err}"))?;
    let user = name("user", p.user.or(e.user_id.map(str::to_string)))
        .unwrap_or_else(|_| "legacy".to_string());
    // As change stamps carry regions (else peers would not read the stamp).
    let region = p
        .region
        .filter(|r| super::rules::is_region(r))
        .unwrap_or_else(|| "legacy".to_string());
    let m = match e.event_type {
        "GRAFT" => Mutation::Graft {
            id: graft_id(run_id, position),
            retry_safe: false,
            agent: name("agent", p.agent)?,
            after_step: name("afterStep", p.after_step)?,
            user,
        },
        "PRUNE" => Mutation::Prune {
            step_id: name("stepId", p.step_id)?,
            user,
        },
        "UNPRUNE" => Mutation::Unprune {
            step_id: name("stepId", p.step_id)?,
        },
        "SET_FLAG" => Mutation::SetFlag {
            key: name("key", p.key)?,
            value: p.value.ok_or("`value` is missing")?,
        },
        "DELETE_FLAG" => Mutation::DeleteFlag {
            key: name("key", p.key)?,
        },
        other => return Err(format!("unknown legacy event type {other:?}")),
    };
    Ok((m, region))
}

impl RunDoc {
    /// Replays legacy rows in order onto a document holding only the genesis (and its own
    /// earlier replay). Returns the rows skipped, by position, with the reason.
    pub fn replay_legacy(&mut self, run_id: Uuid, events: &[LegacyEvent]) -> Vec<(usize, String)> {
        let own_actor = self.doc.get_actor().clone();
        let own_region = self.region.clone();
        self.doc.set_actor(legacy_actor(run_id));
        let mut skipped = Vec::new();
        for (position, e) in events.iter().enumerate() {
            let result = mutation(run_id, position, e).and_then(|(m, region)| {
                self.region = region;
                let at = e.created_at.and_utc().timestamp_millis();
                self.apply(&m, at).map_err(|err| err.to_string())
            });
            if let Err(reason) = result {
                skipped.push((position, reason));
            }
        }
        self.region = own_region;
        self.doc.set_actor(own_actor);
        skipped
    }
}

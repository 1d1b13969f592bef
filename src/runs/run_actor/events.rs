//! What the event log records of a write: one row per change, with the kind of event, a JSON
//! description of a local mutation, the user, the source region and the clock.

use automerge::Change;
use chrono::NaiveDateTime;
use run_doc::{Described, Graft, Mutation, Stamp};
use run_store::NewEvent;
use serde_json::json;
use uuid::Uuid;

/// What the log records beside a change.
#[derive(Default)]
pub(crate) struct EventMeta {
    pub event_type: &'static str,
    pub payload: Option<String>,
    pub user_id: Option<String>,
    /// The description of a local mutation's one change, known without reading it back.
    pub described: Option<Described>,
}

impl EventMeta {
    /// A local mutation by `user`.
    pub fn local(mutation: &Mutation, graft: Option<&Graft>, user: Option<String>) -> Self {
        EventMeta {
            event_type: mutation.event_type(),
            payload: Some(payload(mutation)),
            described: Described::of_local(mutation, graft, user.as_deref()),
            user_id: user,
        }
    }

    /// Changes received from another replica (`user`: a foreign client's peer id).
    pub fn synced(user: Option<String>) -> Self {
        EventMeta {
            event_type: "CRDT_SYNC",
            payload: None,
            user_id: user,
            described: None,
        }
    }
}

/// The rows for `changes`, numbered from `next_seq()`, each with what it did (`describe`,
/// for the change feed). A change's own stamp names its region; unstamped ones (foreign
/// clients) take `region`. `lamport` is the run's clock after the write, so a restart resumes
/// it exactly.
pub(crate) fn rows(
    run_id: Uuid,
    changes: &[Change],
    meta: &EventMeta,
    region: &str,
    lamport: u64,
    mut next_seq: impl FnMut() -> i64,
    mut describe: impl FnMut(&Change) -> Option<Described>,
) -> Vec<NewEvent> {
    let lamport = i64::try_from(lamport).unwrap_or(i64::MAX);
    // Microseconds, as PostgreSQL keeps them, so the runs list's cursor is exact on SQLite.
    let now: NaiveDateTime = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now().naive_utc(), 6);
    changes
        .iter()
        .map(|change| {
            let described = match &meta.described {
                Some(d) if changes.len() == 1 => Some(d.clone()),
                _ => describe(change),
            };
            // The author as the change itself names them (its stamp, else the entry it wrote),
            // so every region's row names the same one; what this door knew only when the
            // change says nothing.
            let user_id = described
                .as_ref()
                .and_then(Described::author)
                .or_else(|| meta.user_id.clone());
            NewEvent {
                run_id,
                run_seq: next_seq(),
                event_type: meta.event_type.to_string(),
                payload: meta.payload.clone(),
                user_id,
                created_at: now,
                crdt_changes: change.raw_bytes().to_vec(),
                change_hash: change.hash().as_ref().to_vec(),
                source_region: Stamp::of(change).map_or_else(|| region.to_string(), |s| s.region),
                lamport,
                kind: described.as_ref().map(|d| d.kind.as_str().to_string()),
                content: described.map(|d| d.content.to_string()),
                fence: None,
            }
        })
        .collect()
}

/// The JSON `payload` of a local mutation's row.
fn payload(mutation: &Mutation) -> String {
    let value = match mutation {
        Mutation::Graft {
            id,
            agent,
            after_step,
            user,
            ..
        } => {
            json!({"id": id, "agent": agent, "afterStep": after_step, "user": user})
        }
        Mutation::Prune { step_id, user } => json!({"stepId": step_id, "user": user}),
        Mutation::Unprune { step_id } => json!({"stepId": step_id}),
        Mutation::SetFlag { key, value } => json!({"key": key, "value": value}),
        Mutation::DeleteFlag { key } => json!({"key": key}),
        Mutation::Checkpoint { label } => json!({"label": label}),
        Mutation::Revert { to } => {
            json!({"to": to.iter().map(|h| h.to_string()).collect::<Vec<_>>()})
        }
    };
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_mutations_describe_themselves() {
        let m = Mutation::Prune {
            step_id: "s1".into(),
            user: "ann".into(),
        };
        let meta = EventMeta::local(&m, None, Some("ann".into()));
        assert_eq!(meta.event_type, "PRUNE");
        let p: serde_json::Value = serde_json::from_str(meta.payload.as_deref().unwrap()).unwrap();
        assert_eq!(p, json!({"stepId": "s1", "user": "ann"}));
        let synced = EventMeta::synced(None);
        assert_eq!((synced.event_type, synced.payload), ("CRDT_SYNC", None));
    }

    #[test]
    fn rows_are_numbered_and_take_the_stamp_region() {
        let run = Uuid::new_v4();
        let mut doc = run_doc::RunDoc::new(run, "eu-west");
        let applied = doc
            .apply(
                &Mutation::SetFlag {
                    key: "k".into(),
                    value: json!(1),
                },
                0,
            )
            .unwrap();
        let change = applied.change.unwrap();
        let mut seq = 6;
        let rows = rows(
            run,
            &[change],
            &EventMeta::synced(None),
            "us-east",
            9,
            || {
                seq += 1;
                seq
            },
            |c| Some(doc.describe(c)),
        );
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].run_seq, rows[0].lamport), (7, 9));
        assert_eq!(rows[0].source_region, "eu-west", "the change's own stamp");
        assert_eq!(rows[0].event_type, "CRDT_SYNC");
        assert_eq!(rows[0].kind.as_deref(), Some("setFlag"));
        assert_eq!(rows[0].content.as_deref(), Some(r#"{"key":"k","value":1}"#));
    }
}

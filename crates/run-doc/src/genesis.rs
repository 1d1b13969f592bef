//! The deterministic genesis change of a run document.
//!
//! Two regions may create the same run independently. If each created the root objects
//! (`grafts`, `prunedSteps`, `flags`) with its own actor, a merge would hold two conflicting
//! `grafts` lists and one side's grafts would hide behind the other's. So every node builds the
//! root objects in one change with a fixed actor id derived from the run id and a fixed
//! timestamp: the genesis change is byte-identical everywhere and merges as a single change.

use automerge::{transaction::Transactable, ActorId, AutoCommit, ObjType, ROOT};
use uuid::Uuid;

pub const GRAFTS: &str = "grafts";
pub const PRUNED_STEPS: &str = "prunedSteps";
pub const FLAGS: &str = "flags";

/// Prefix of genesis actor ids, so they can never collide with a random per-incarnation actor.
const GENESIS_ACTOR_PREFIX: &[u8] = b"crdt-node:genesis:";

/// The fixed actor id of a run's genesis change.
pub fn genesis_actor(run_id: Uuid) -> ActorId {
    let mut bytes = GENESIS_ACTOR_PREFIX.to_vec();
    bytes.extend_from_slice(run_id.as_bytes());
    ActorId::from(bytes)
}

/// A document holding only the run's genesis change, with the genesis actor still set.
pub fn genesis_doc(run_id: Uuid) -> AutoCommit {
    let mut doc = AutoCommit::new().with_actor(genesis_actor(run_id));
    // These calls cannot fail on a fresh document: ROOT exists and the keys are new.
    for (key, kind) in [
        (GRAFTS, ObjType::List),
        (PRUNED_STEPS, ObjType::Map),
        (FLAGS, ObjType::Map),
    ] {
        doc.put_object(ROOT, key, kind)
            .expect("putting an object on the root of a fresh document");
    }
    doc.commit_with(automerge::transaction::CommitOptions::default().with_time(0));
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesis_is_byte_identical_for_the_same_run() {
        let run = Uuid::new_v4();
        let a = genesis_doc(run).save();
        let b = genesis_doc(run).save();
        assert_eq!(a, b);
        let other = genesis_doc(Uuid::new_v4()).save();
        assert_ne!(
            a, other,
            "different runs must have different genesis changes"
        );
    }

    #[test]
    fn genesis_has_one_change_and_the_three_roots() {
        use automerge::ReadDoc;
        let mut doc = genesis_doc(Uuid::new_v4());
        assert_eq!(doc.get_heads().len(), 1);
        assert_eq!(doc.get_changes(&[]).len(), 1);
        let keys: Vec<String> = doc.keys(ROOT).collect();
        assert_eq!(keys, vec!["flags", "grafts", "prunedSteps"]);
    }
}

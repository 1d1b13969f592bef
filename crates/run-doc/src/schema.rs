//! The run schema as applied to changes written by other Automerge clients (automerge-repo).
//!
//! Such a change is a valid CRDT change even when it breaks the run's shape (say, `grafts`
//! replaced by a string): refusing it on one door while another has it would split the
//! replicas for good. So it is stored and synced like any change, and the breach is reported
//! instead: [`check_changes`] names what a batch broke (for the log and a metric), and the
//! state's `schemaErrors` / `valid` show it to every reader until someone repairs it.
//!
//! The check looks only at the objects a change touched, so its cost follows the change, not
//! the size of the run.

use std::collections::HashSet;

use automerge::{
    legacy::{Key, ObjectId, OpType},
    AutoCommit, Change, ObjId, ObjType, Prop, ReadDoc, ROOT,
};

use super::genesis::{genesis_actor, FLAGS, GRAFTS, PRUNED_STEPS};
use super::state::{as_u64, read_graft, root_obj};
use uuid::Uuid;

/// The field of a graft or prune entry that holds its Lamport timestamp.
const LAMPORT_FIELD: &str = "lamport";

/// The highest `lamport` field a change writes, if any: a foreign client stamps its grafts
/// itself, and the node's next stamp must come after what it has seen.
pub(super) fn written_lamport(change: &Change) -> Option<u64> {
    change
        .decode()
        .operations
        .iter()
        .filter(|op| matches!(&op.key, Key::Map(k) if k == LAMPORT_FIELD))
        .filter_map(|op| match &op.action {
            OpType::Put(value) => as_u64(value),
            _ => None,
        })
        .max()
}

/// Where a touched object sits in the run document.
enum Place {
    Root,
    GraftList,
    /// Inside graft `index` (the graft map itself or something nested in it).
    Graft(ObjId, usize),
    PrunedSteps,
    /// Flags, nested prune entries, unknown root keys: any value is allowed there.
    Free,
}

fn place(doc: &AutoCommit, obj: &ObjId) -> Option<Place> {
    if *obj == ROOT {
        return Some(Place::Root);
    }
    // From the object up to the root; reversed, the path from the root down.
    let mut path: Vec<(ObjId, Prop)> = Vec::new();
    let mut child = obj.clone();
    for parent in doc.parents(obj).ok()? {
        if !parent.visible {
            return None;
        }
        path.push((child, parent.prop));
        child = parent.obj;
    }
    path.reverse();
    let top = match path.first() {
        Some((_, Prop::Map(key))) => key.as_str(),
        _ => return None,
    };
    Some(match (top, path.len()) {
        (GRAFTS, 1) => Place::GraftList,
        (GRAFTS, _) => match &path[1] {
            (graft, Prop::Seq(i)) => Place::Graft(graft.clone(), *i),
            _ => return None,
        },
        (PRUNED_STEPS, 1) => Place::PrunedSteps,
        _ => Place::Free,
    })
}

/// What `changes` (already applied to `doc`) broke of the run schema; empty if nothing.
pub(super) fn check_changes(doc: &AutoCommit, run_id: Uuid, changes: &[Change]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut roots_checked = false;
    for change in changes {
        let expanded = change.decode();
        let actor = change.actor_id().to_hex_string();
        for (i, op) in expanded.operations.iter().enumerate() {
            let obj = match &op.obj {
                ObjectId::Root => ROOT,
                ObjectId::Id(id) => match doc.import_obj(&id.to_string()) {
                    Ok(o) => o,
                    Err(_) => continue,
                },
            };
            let scalar_into = |what: &str| -> Option<String> {
                match &op.action {
                    OpType::Put(_) => Some(format!("{what} holds a scalar, not a map")),
                    OpType::Make(kind) if *kind != ObjType::Map => {
                        Some(format!("{what} holds a {kind:?}, not a map"))
                    }
                    _ => None,
                }
            };
            match place(doc, &obj) {
                Some(Place::Root) if !roots_checked => {
                    roots_checked = true;
                    problems.extend(check_roots(doc, run_id));
                }
                Some(Place::GraftList) => {
                    problems.extend(scalar_into("an element of grafts"));
                    if matches!(op.action, OpType::Make(ObjType::Map)) {
                        // A new graft, checked even if no field is ever written into it.
                        let id = format!("{}@{actor}", change.start_op().get() + i as u64);
                        if let Ok(new) = doc.import_obj(&id) {
                            if let Some(Place::Graft(graft, index)) = place(doc, &new) {
                                check_graft(doc, graft, index, &mut seen, &mut problems);
                            }
                        }
                    }
                }
                Some(Place::Graft(graft, index)) => {
                    check_graft(doc, graft, index, &mut seen, &mut problems);
                }
                Some(Place::PrunedSteps) => {
                    if let Key::Map(step) = &op.key {
                        problems.extend(scalar_into(&format!("prunedSteps.{step}")));
                    }
                }
                _ => {}
            }
        }
    }
    problems
}

fn check_graft(
    doc: &AutoCommit,
    graft: ObjId,
    index: usize,
    seen: &mut HashSet<String>,
    problems: &mut Vec<String>,
) {
    if seen.insert(graft.to_string()) && read_graft(doc, &graft).is_none() {
        problems.push(format!(
            "grafts[{index}] lacks a field or has one of the wrong type"
        ));
    }
}

/// The three root objects must be the genesis ones: another `grafts` list, even an empty one,
/// would hide every graft behind it.
fn check_roots(doc: &AutoCommit, run_id: Uuid) -> Vec<String> {
    let genesis = genesis_actor(run_id).to_hex_string();
    [
        (GRAFTS, ObjType::List, 1),
        (PRUNED_STEPS, ObjType::Map, 2),
        (FLAGS, ObjType::Map, 3),
    ]
    .into_iter()
    .filter_map(|(key, kind, counter)| match root_obj(doc, key, kind) {
        Err(e) => Some(e),
        Ok(id) if id.to_string() != format!("{counter}@{genesis}") => {
            Some(format!("{key} was replaced: the run's own {key} is hidden"))
        }
        Ok(_) => None,
    })
    .collect()
}

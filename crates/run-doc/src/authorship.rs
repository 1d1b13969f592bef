//! Who may write what in a run: the check on a user's own Automerge changes.
//!
//! The node writes grafts and pruned-step entries for a user under the token's `sub`. A user
//! who syncs Automerge changes directly (automerge-repo) writes the document itself, so the
//! same rule is checked on what those changes did: every graft and pruned-step entry they
//! create names the writer as its `user`, and no entry that existed before is altered — grafts
//! are written once and never removed, a pruned-step entry is replaced only by a new prune (its
//! own entry, under the writer's name) or removed by an unprune. Flags carry no author; the
//! three root objects are never replaced (a new list could hold any names).
//!
//! The check reads the effect of the changes (Automerge's diff between the heads before and
//! after them), not their operations: the same effect can be spelled in many ways, and only
//! the effect is what readers see.

use std::collections::HashSet;

use automerge::{AutoCommit, ChangeHash, ObjId, ObjType, Patch, PatchAction, Prop, Value, ROOT};

use super::genesis::{FLAGS, GRAFTS, PRUNED_STEPS};
use super::state::{root_obj, str_field};

/// A change's stamp names its author for every region (see `Stamp::user`): a user's own
/// changes may name that user only.
pub(super) fn check_stamps(changes: &[automerge::Change], author: &str) -> Result<(), String> {
    for change in changes {
        let Some(stamp) = super::Stamp::of(change) else {
            continue;
        };
        if let Some(named) = stamp.user.filter(|named| named != author) {
            return Err(format!(
                "a change's stamp names {named:?} as its author; yours may name only you"
            ));
        }
        // Reverts and checkpoints are made by the node; a client's would be believed by every
        // region's history, feed and webhook filters.
        if stamp.revert_to.is_some() || stamp.checkpoint.is_some() {
            return Err("a change's stamp may not call it a revert or a checkpoint".into());
        }
    }
    Ok(())
}

/// Checks what the changes between `before` and the document's heads did to the run's
/// attributed entries, made by `author`. The reason, when they did what `author` may not.
pub(super) fn check(
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    author: &str,
) -> Result<(), String> {
    let after = doc.get_heads();
    let patches = doc.diff(before, &after);
    let grafts = root_obj(doc, GRAFTS, ObjType::List).ok();
    let pruned = root_obj(doc, PRUNED_STEPS, ObjType::Map).ok();
    let mut new_grafts = HashSet::new();
    let mut new_prunes = Vec::new();
    // The entries the changes created, and what they did to the containers.
    for patch in &patches {
        if patch.obj == ROOT {
            let key = match &patch.action {
                PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => Some(key),
                PatchAction::Conflict {
                    prop: Prop::Map(key),
                } => Some(key),
                _ => None,
            };
            if let Some(key) = key.filter(|k| [GRAFTS, PRUNED_STEPS, FLAGS].contains(&k.as_str())) {
                return Err(format!("a change may not replace the run's {key}"));
            }
        } else if Some(&patch.obj) == grafts.as_ref() {
            match &patch.action {
                PatchAction::Insert { values, .. } => {
                    for (value, obj, _) in values.iter() {
                        if !matches!(value, Value::Object(ObjType::Map)) {
                            return Err("a graft must be a map".into());
                        }
                        new_grafts.insert(obj.clone());
                    }
                }
                _ => {
                    return Err(
                        "grafts are written once: a change may not remove or replace one".into(),
                    )
                }
            }
        } else if Some(&patch.obj) == pruned.as_ref() {
            match &patch.action {
                PatchAction::PutMap { key, value, .. } => match value {
                    (Value::Object(ObjType::Map), obj) => {
                        new_prunes.push((key.clone(), obj.clone()))
                    }
                    _ => {
                        return Err(format!(
                            "prunedSteps.{key} must be an entry naming its user"
                        ))
                    }
                },
                // An unprune; a conflict is reported beside the put that made it.
                PatchAction::DeleteMap { .. } | PatchAction::Conflict { .. } => {}
                _ => return Err("prunedSteps is a map of entries".into()),
            }
        }
    }
    let new_prune_objs: HashSet<&ObjId> = new_prunes.iter().map(|(_, obj)| obj).collect();
    // Anything inside an entry that existed before is an alteration.
    for patch in &patches {
        if let Some(obj) = grafts.as_ref().and_then(|list| entry_of(patch, list)) {
            if !new_grafts.contains(&obj) {
                return Err(
                    "grafts are written once: a change may not alter an existing graft".into(),
                );
            }
        }
        if let Some(obj) = pruned.as_ref().and_then(|map| entry_of(patch, map)) {
            if !new_prune_objs.contains(&obj) {
                return Err(
                    "a change may not alter an existing pruned-step entry (prune again instead)"
                        .into(),
                );
            }
        }
    }
    for obj in &new_grafts {
        let user = str_field(doc, obj, "user");
        if user.as_deref() != Some(author) {
            let id = str_field(doc, obj, "id").unwrap_or_default();
            return Err(format!(
                "graft {id:?} names user {user:?}; a change by {author:?} may only graft under \
                 its own name"
            ));
        }
    }
    for (step, obj) in &new_prunes {
        let user = str_field(doc, obj, "user");
        if user.as_deref() != Some(author) {
            return Err(format!(
                "the prune of {step:?} names user {user:?}; a change by {author:?} may only prune under its own name"
            ));
        }
    }
    Ok(())
}

/// The entry of `container` (the grafts list or the pruned-steps map) a patch lies inside, if
/// any. A patch's path runs root → container → the entry → deeper.
pub(super) fn entry_of(patch: &Patch, container: &ObjId) -> Option<ObjId> {
    match patch.path.get(1) {
        Some((parent, _)) if parent == container => match patch.path.get(2) {
            Some((entry, _)) => Some(entry.clone()),
            None => Some(patch.obj.clone()),
        },
        _ => None,
    }
}

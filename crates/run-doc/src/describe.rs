//! What one change did, in the run's own terms: the change feed's and webhooks' description.
//!
//! A change is described from its own operations (so the cost follows the change, not the
//! run) and the values it wrote, read back from the document: a graft, a prune, an unprune, a
//! flag set or deleted. Every region describes a change alike, whichever door brought it: the
//! description depends on the change alone, not on the payload a local mutation had (another
//! region never sees that) nor on what else the region holds. A change that did anything else,
//! or more than one thing (an automerge-repo client may write anything), is `other` and names
//! what it touched.

use std::collections::{BTreeSet, HashSet};

use automerge::{
    legacy::{Key, ObjectId, OpType},
    AutoCommit, Change, ChangeHash, ObjId, ObjType, ReadDoc, Value,
};
use serde_json::{json, Value as Json};

use super::genesis::{FLAGS, GRAFTS, PRUNED_STEPS};
use super::json::{read_json, read_json_at};
use super::state::{read_graft, root_obj, str_field};

/// The kinds of event a change makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Graft,
    Prune,
    Unprune,
    SetFlag,
    DeleteFlag,
    /// A row of the operational-transform system the run began with.
    Legacy,
    /// A change that brought the run back to an earlier point (`content.to`).
    Revert,
    /// A label on the heads the change builds on (`content.label`, `content.at`).
    Checkpoint,
    /// Anything the typed mutations do not describe (the run's genesis, several effects in one
    /// change, a foreign client's edit of a nested value).
    Other,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Graft,
        Kind::Prune,
        Kind::Unprune,
        Kind::SetFlag,
        Kind::DeleteFlag,
        Kind::Legacy,
        Kind::Revert,
        Kind::Checkpoint,
        Kind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Graft => "graft",
            Kind::Prune => "prune",
            Kind::Unprune => "unprune",
            Kind::SetFlag => "setFlag",
            Kind::DeleteFlag => "deleteFlag",
            Kind::Legacy => "legacy",
            Kind::Revert => "revert",
            Kind::Checkpoint => "checkpoint",
            Kind::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One change's description: its kind and content (`{"graft": {...}}`, `{"stepId", "user"}`,
/// `{"key", "value"}`, `{"touched": [...]}`).
#[derive(Debug, Clone, PartialEq)]
pub struct Described {
    pub kind: Kind,
    pub content: Json,
    /// The author the change's stamp names, if any.
    pub user: Option<String>,
}

/// The user the entry a change wrote names (a graft's, a pruned step's), from a description's
/// content.
pub fn entry_user(content: &Json) -> Option<&str> {
    content
        .get("graft")
        .unwrap_or(content)
        .get("user")
        .and_then(Json::as_str)
}

impl Described {
    /// Who made the change as the change itself says, the same in every region: its stamp's
    /// user, else the user the entry it wrote names.
    pub fn author(&self) -> Option<String> {
        self.user
            .clone()
            .or_else(|| entry_user(&self.content).map(str::to_string))
    }

    /// What the change of a local mutation did, known from the mutation (and the graft it
    /// made) without reading the change back: what [`describe`] says of that change in every
    /// region (tested), at a fraction of the cost on the write path. `None` where only the
    /// change is exact (a flag's value as stored, reverts, checkpoints).
    pub fn of_local(
        mutation: &crate::Mutation,
        graft: Option<&crate::Graft>,
        user: Option<&str>,
    ) -> Option<Described> {
        use crate::Mutation as M;
        let (kind, content) = match mutation {
            M::Graft { .. } => (Kind::Graft, json!({ "graft": graft? })),
            M::Prune { step_id, user } => (Kind::Prune, json!({ "stepId": step_id, "user": user })),
            M::Unprune { step_id } => (Kind::Unprune, json!({ "stepId": step_id })),
            M::DeleteFlag { key } => (Kind::DeleteFlag, json!({ "key": key })),
            M::SetFlag { .. } | M::Revert { .. } | M::Checkpoint { .. } => return None,
        };
        Some(Described {
            kind,
            content,
            user: user.map(str::to_string),
        })
    }
}

/// One thing a change did.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
enum Effect {
    Graft(String),
    /// A step pruned, with the entry the change made.
    Prune(String, String),
    Unprune(String),
    SetFlag(String),
    DeleteFlag(String),
    /// A place the typed mutations do not write (a path such as `flags.k`, `grafts`).
    Touched(String),
}

/// Describes `change`, which `doc` (now at `heads`) holds.
pub(super) fn describe(doc: &AutoCommit, change: &Change, heads: &[ChangeHash]) -> Described {
    let stamp = super::Stamp::of(change);
    let (mut kind, mut content) = effect(doc, change, heads);
    if let Some(to) = stamp.as_ref().and_then(|s| s.revert_to.clone()) {
        // What a revert touched, and the point it went back to.
        let field = |root: &str, name: &str| {
            json!([path(root, content[name].as_str().map(str::to_string))])
        };
        let touched = match kind {
            Kind::Other => content["touched"].take(),
            Kind::Graft => json!([GRAFTS]),
            Kind::Prune | Kind::Unprune => field(PRUNED_STEPS, "stepId"),
            Kind::SetFlag | Kind::DeleteFlag => field(FLAGS, "key"),
            _ => json!([]),
        };
        kind = Kind::Revert;
        content = json!({ "to": to, "touched": touched });
    }
    // A checkpoint is a change of no operations; a stamp saying so on anything else is not
    // believed.
    let label = stamp.as_ref().and_then(|s| s.checkpoint.clone());
    if let Some(label) = label.filter(|_| change.is_empty()) {
        let at: Vec<String> = change.deps().iter().map(|h| h.to_string()).collect();
        kind = Kind::Checkpoint;
        content = json!({ "label": label, "at": at });
    }
    Described {
        kind,
        content,
        user: stamp.and_then(|s| s.user),
    }
}

fn effect(doc: &AutoCommit, change: &Change, heads: &[ChangeHash]) -> (Kind, Json) {
    let expanded = change.decode();
    let actor = change.actor_id();
    let start = change.start_op().get();
    let op_id = |i: usize| format!("{}@{}", start + i as u64, actor.to_hex_string());
    // The root objects as (counter, actor), to compare with operations' objects directly.
    let root = |key: &str, kind: ObjType| match root_obj(doc, key, kind) {
        Ok(ObjId::Id(counter, actor, _)) => Some((counter, actor)),
        _ => None,
    };
    let grafts = root(GRAFTS, ObjType::List);
    let pruned = root(PRUNED_STEPS, ObjType::Map);
    let flags = root(FLAGS, ObjType::Map);
    let is = |root: &Option<(u64, automerge::ActorId)>, id: &automerge::legacy::OpId| {
        root.as_ref().is_some_and(|(c, a)| *c == id.0 && *a == id.1)
    };
    // Objects this change made (their counters; the actor is the change's): what happens
    // inside them belongs to whatever made them.
    let mut made: HashSet<u64> = HashSet::new();
    let mut effects: BTreeSet<Effect> = BTreeSet::new();
    for (i, op) in expanded.operations.iter().enumerate() {
        if let OpType::Make(_) = op.action {
            made.insert(start + i as u64);
        }
        let key = match &op.key {
            Key::Map(k) => Some(k.to_string()),
            Key::Seq(_) => None,
        };
        let obj = match &op.obj {
            ObjectId::Root => {
                effects.insert(Effect::Touched(key.unwrap_or_default()));
                continue;
            }
            ObjectId::Id(id) => id,
        };
        if obj.1 == *actor && made.contains(&obj.0) {
            continue;
        }
        let effect = if is(&grafts, obj) {
            match (&op.action, op.insert) {
                (OpType::Make(ObjType::Map), true) => Effect::Graft(op_id(i)),
                _ => Effect::Touched(GRAFTS.into()),
            }
        } else if is(&pruned, obj) {
            match (&op.action, key) {
                (OpType::Make(ObjType::Map), Some(step)) => Effect::Prune(step, op_id(i)),
                (OpType::Delete, Some(step)) => Effect::Unprune(step),
                (_, step) => Effect::Touched(path(PRUNED_STEPS, step)),
            }
        } else if is(&flags, obj) {
            match (&op.action, key) {
                (OpType::Delete, Some(k)) => Effect::DeleteFlag(k),
                (OpType::Put(_) | OpType::Make(_), Some(k)) => Effect::SetFlag(k),
                (_, k) => Effect::Touched(path(FLAGS, k)),
            }
        } else {
            match doc.import_obj(&obj.to_string()) {
                Ok(o) => Effect::Touched(place(doc, &o)),
                Err(_) => Effect::Touched("(unknown)".into()),
            }
        };
        effects.insert(effect);
    }
    let only = match (effects.len(), effects.first()) {
        (1, Some(effect)) => effect.clone(),
        _ => {
            let touched: BTreeSet<String> = effects.iter().map(Effect::path).collect();
            return (Kind::Other, json!({ "touched": touched }));
        }
    };
    let read = |id: &str| doc.import_obj(id).ok();
    let root_id = |r: Option<(u64, automerge::ActorId)>| {
        r.and_then(|(c, a)| doc.import_obj(&format!("{c}@{}", a.to_hex_string())).ok())
    };
    match only {
        Effect::Graft(id) => match read(&id).and_then(|obj| read_graft(doc, &obj)) {
            Some(graft) => (Kind::Graft, json!({ "graft": graft })),
            None => (Kind::Other, json!({ "touched": [GRAFTS] })),
        },
        Effect::Prune(step, entry) => {
            let user = read(&entry).and_then(|e| str_field(doc, &e, "user"));
            (Kind::Prune, json!({ "stepId": step, "user": user }))
        }
        Effect::Unprune(step) => (Kind::Unprune, json!({ "stepId": step })),
        Effect::SetFlag(key) => {
            let value =
                root_id(flags).map_or(Json::Null, |f| written_value(doc, change, heads, &f, &key));
            (Kind::SetFlag, json!({ "key": key, "value": value }))
        }
        Effect::DeleteFlag(key) => (Kind::DeleteFlag, json!({ "key": key })),
        Effect::Touched(p) => (Kind::Other, json!({ "touched": [p] })),
    }
}

impl Effect {
    fn path(&self) -> String {
        match self {
            Effect::Graft(_) => GRAFTS.into(),
            Effect::Prune(s, _) | Effect::Unprune(s) => path(PRUNED_STEPS, Some(s.clone())),
            Effect::SetFlag(k) | Effect::DeleteFlag(k) => path(FLAGS, Some(k.clone())),
            Effect::Touched(p) => p.clone(),
        }
    }
}

fn path(root: &str, key: Option<String>) -> String {
    match key {
        Some(k) => format!("{root}.{k}"),
        None => root.to_string(),
    }
}

/// Where `obj` sits, as a path of map keys from the root (list positions as `[]`).
fn place(doc: &AutoCommit, obj: &ObjId) -> String {
    let Ok(parents) = doc.parents(obj) else {
        return "(removed)".into();
    };
    let mut path: Vec<String> = parents
        .map(|p| match p.prop {
            automerge::Prop::Map(k) => k,
            automerge::Prop::Seq(_) => "[]".into(),
        })
        .collect();
    path.reverse();
    if path.is_empty() {
        "(removed)".into()
    } else {
        path.join(".")
    }
}

/// The value `change` wrote to `key` of `map`, as it was when written: the one of the key's
/// values (a concurrent write keeps several) that the change made, read as of the change (a
/// later change may have edited inside it; another region may hold that later change already,
/// or not yet).
fn written_value(
    doc: &AutoCommit,
    change: &Change,
    doc_heads: &[ChangeHash],
    map: &ObjId,
    key: &str,
) -> Json {
    let actor = change.actor_id();
    let ops = change.start_op().get()..change.start_op().get() + change.len() as u64;
    let ours = |id: &ObjId| match id {
        ObjId::Id(counter, a, _) => a == actor && ops.contains(counter),
        ObjId::Root => false,
    };
    let heads = [change.hash()];
    // Reading as of heads walks the history; when the change is all there is on top, the
    // document as it is now is the document as of the change.
    let latest = doc_heads == heads;
    let read = |value: &Value<'_>, id: &ObjId| {
        if latest {
            read_json(doc, value, id)
        } else {
            read_json_at(doc, value, id, &heads)
        }
    };
    let now = if latest {
        doc.get_all(map, key)
    } else {
        doc.get_all_at(map, key, &heads)
    };
    match now {
        Ok(values) => values
            .iter()
            .find(|(_, id)| ours(id))
            .or(values.first())
            .map_or(Json::Null, |(value, id)| read(value, id)),
        Err(_) => Json::Null,
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::ReadDoc;
    use serde_json::json;
    use uuid::Uuid;

    use super::Kind;
    use crate::{Mutation, RunDoc};

    const T0: i64 = 1_764_000_000_000;

    fn change(doc: &mut RunDoc, m: Mutation) -> automerge::Change {
        doc.apply(&m, T0).unwrap().change.expect("a change")
    }

    fn flag(key: &str, value: serde_json::Value) -> Mutation {
        Mutation::SetFlag {
            key: key.into(),
            value,
        }
    }

    #[test]
    fn each_mutation_describes_itself_alike_in_every_region() {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us");
        let mut b = RunDoc::new(run, "eu");
        let id = Uuid::new_v4();
        let changes = [
            change(
                &mut a,
                Mutation::Graft {
                    id,
                    retry_safe: true,
                    agent: "Planner".into(),
                    after_step: "s1".into(),
                    user: "ann".into(),
                },
            ),
            change(
                &mut a,
                Mutation::Prune {
                    step_id: "s2".into(),
                    user: "bo".into(),
                },
            ),
            change(
                &mut a,
                Mutation::Unprune {
                    step_id: "s2".into(),
                },
            ),
            change(&mut a, flag("k", json!({"deep": [1, {"x": "y"}]}))),
            change(&mut a, Mutation::DeleteFlag { key: "k".into() }),
        ];
        // B holds a concurrent write of the same flag before A's arrive.
        change(&mut b, flag("k", json!("b's")));
        b.apply_remote(changes.to_vec(), None).unwrap();
        let expected = [
            (Kind::Graft, None),
            (Kind::Prune, Some(json!({"stepId": "s2", "user": "bo"}))),
            (Kind::Unprune, Some(json!({"stepId": "s2"}))),
            (
                Kind::SetFlag,
                Some(json!({"key": "k", "value": {"deep": [1, {"x": "y"}]}})),
            ),
            (Kind::DeleteFlag, Some(json!({"key": "k"}))),
        ];
        for (c, (kind, content)) in changes.iter().zip(expected) {
            let (here, there) = (a.describe(c), b.describe(c));
            assert_eq!(here, there, "one description in every region");
            assert_eq!(here.kind, kind);
            if let Some(content) = content {
                assert_eq!(here.content, content);
            }
        }
        let graft = &a.describe(&changes[0]).content["graft"];
        assert_eq!(
            (
                &graft["id"],
                &graft["agent"],
                &graft["afterStep"],
                &graft["user"]
            ),
            (
                &json!(id.to_string()),
                &json!("Planner"),
                &json!("s1"),
                &json!("ann")
            )
        );
    }

    #[test]
    fn the_author_travels_in_the_stamp_and_a_user_may_name_only_themselves() {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us");
        let mut b = RunDoc::new(run, "eu");
        let c = a
            .apply_by(&flag("k", json!(1)), T0, Some("cy"))
            .unwrap()
            .change
            .unwrap();
        b.apply_remote(vec![c.clone()], None).unwrap();
        assert_eq!(b.describe(&c).user.as_deref(), Some("cy"));
        assert_eq!(a.describe(&c), b.describe(&c));
        let unsigned = change(&mut a, flag("k", json!(2)));
        assert_eq!(a.describe(&unsigned).user, None);
        assert!(crate::authorship::check_stamps(std::slice::from_ref(&c), "cy").is_ok());
        let err = crate::authorship::check_stamps(&[c], "eve").unwrap_err();
        assert!(err.contains("\"cy\""), "{err}");
    }

    #[test]
    fn a_local_mutation_is_described_from_itself_as_its_change_is_everywhere() {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us");
        let mut b = RunDoc::new(run, "eu");
        let mutations = [
            Mutation::Graft {
                id: Uuid::new_v4(),
                retry_safe: false,
                agent: "Planner".into(),
                after_step: "s1".into(),
                user: "ann".into(),
            },
            Mutation::Prune {
                step_id: "s1".into(),
                user: "bo".into(),
            },
            Mutation::Unprune {
                step_id: "s1".into(),
            },
            flag("k", json!(1)),
            Mutation::DeleteFlag { key: "k".into() },
        ];
        for m in mutations {
            let applied = a.apply_by(&m, T0, Some("cy")).unwrap();
            let change = applied.change.unwrap();
            b.apply_remote(vec![change.clone()], None).unwrap();
            let quick = crate::Described::of_local(&m, applied.graft.as_ref(), Some("cy"));
            if let Some(quick) = quick {
                assert_eq!(quick, a.describe(&change), "{m:?}");
                assert_eq!(quick, b.describe(&change), "{m:?}");
            } else {
                assert!(matches!(m, Mutation::SetFlag { .. }));
            }
        }
    }

    #[test]
    fn a_flag_written_again_later_is_described_as_first_written() {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us");
        let first = change(&mut a, flag("k", json!(1)));
        change(&mut a, flag("k", json!([2, 3])));
        assert_eq!(a.describe(&first).content, json!({"key": "k", "value": 1}));
    }

    #[test]
    fn a_foreign_change_doing_several_things_is_other_and_names_them() {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us");
        change(&mut a, flag("list", json!([1, 2])));
        let base = a.heads();
        let mut client = automerge::AutoCommit::load(&a.save()).unwrap();
        let flags = match client.get(automerge::ROOT, "flags").unwrap() {
            Some((_, id)) => id,
            None => panic!("no flags"),
        };
        let list = match client.get(&flags, "list").unwrap() {
            Some((_, id)) => id,
            None => panic!("no list"),
        };
        client.insert(&list, 0, 7).unwrap();
        client.put(&flags, "other", "x").unwrap();
        client.put(automerge::ROOT, "note", "hi").unwrap();
        client.commit();
        let changes = client.get_changes(&base);
        a.apply_remote(changes.clone(), None).unwrap();
        let d = a.describe(&changes[0]);
        assert_eq!(d.kind, Kind::Other);
        assert_eq!(
            d.content,
            json!({"touched": ["flags.list", "flags.other", "note"]})
        );
    }

    #[test]
    fn a_flag_is_described_as_written_even_when_a_later_change_in_the_same_batch_edits_it() {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us");
        let mut b = RunDoc::new(run, "eu");
        let set = change(&mut a, flag("list", json!([1, 2])));
        let mut client = automerge::AutoCommit::load(&a.save()).unwrap();
        let flags = client.get(automerge::ROOT, "flags").unwrap().unwrap().1;
        let list = client.get(&flags, "list").unwrap().unwrap().1;
        client.insert(&list, 0, 7).unwrap();
        client.commit();
        let edit = client.get_changes(&a.heads());
        let here = a.describe(&set);
        // The other region gets both in one batch, and describes them after applying both.
        let mut batch = vec![set.clone()];
        batch.extend(edit);
        b.apply_remote(batch, None).unwrap();
        assert_eq!(b.describe(&set), here);
        assert_eq!(here.content, json!({"key": "list", "value": [1, 2]}));
    }

    #[test]
    fn a_clients_stamp_may_not_call_a_change_a_revert_or_checkpoint() {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us");
        let mut client = automerge::AutoCommit::load(&a.save()).unwrap();
        let flags = client.get(automerge::ROOT, "flags").unwrap().unwrap().1;
        client.put(&flags, "k", 1).unwrap();
        let stamp = crate::Stamp {
            lamport: 1,
            region: "web".into(),
            user: Some("eve".into()),
            revert_to: None,
            checkpoint: Some("fake".into()),
        };
        client.commit_with(
            automerge::transaction::CommitOptions::default().with_message(stamp.to_message()),
        );
        let forged = client.get_changes(&a.heads());
        assert!(crate::authorship::check_stamps(&forged, "eve").is_err());
        // Were it written by someone trusted all the same, a change with operations is no
        // checkpoint.
        a.apply_remote(forged.clone(), None).unwrap();
        assert_eq!(a.describe(&forged[0]).kind, Kind::SetFlag);
    }

    #[test]
    fn the_genesis_is_other() {
        let mut a = RunDoc::new(Uuid::new_v4(), "us");
        let genesis = a.changes_since(&[]).remove(0);
        let d = a.describe(&genesis);
        assert_eq!(d.kind, Kind::Other);
        assert_eq!(
            d.content,
            json!({"touched": ["flags", "grafts", "prunedSteps"]})
        );
    }
}

//! A run's history: every change, in one causal order that every region gives alike.
//!
//! Changes are ordered by their dependencies (a change after all it builds on), and changes
//! that could come in either order by their stamp's Lamport timestamp, then their hash: the
//! order depends only on the set of changes, so every region that holds the same changes lists
//! them the same way, whatever order they arrived in. Each entry says what the change did (the
//! change feed's description, [`crate::Described`]), who made it and where (its stamp), and
//! the heads after it: the point of history to read the state at or revert to.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use automerge::{AutoCommit, ChangeHash};

use super::describe::{describe, Described};
use super::{DocError, Stamp};

/// One change of the history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub hash: ChangeHash,
    /// The heads of the run once this change and every entry before it are applied.
    pub heads: Vec<ChangeHash>,
    pub user: Option<String>,
    pub region: Option<String>,
    pub lamport: Option<u64>,
    /// The change's own time (seconds since the epoch, as its writer stamped it).
    pub time: i64,
    pub described: Described,
    /// Made by replaying a row of the operational-transform log the run began with.
    pub legacy: bool,
}

/// A page of the history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// The last entry's hash when more follow.
    pub next: Option<ChangeHash>,
    /// Changes in the whole history (the genesis not counted).
    pub total: usize,
}

struct Node {
    hash: ChangeHash,
    deps: Vec<ChangeHash>,
    lamport: u64,
}

/// A run's history in order, worked out once per heads of the document (a page, a cursor and a
/// point's clock then cost what they read, not a sort of the whole history).
pub(super) struct Order {
    heads: Vec<ChangeHash>,
    /// Every change but the genesis, in history order, with the heads after each.
    entries: Vec<(ChangeHash, Vec<ChangeHash>)>,
    position: HashMap<ChangeHash, usize>,
    /// Each change's dependencies and Lamport stamp.
    nodes: HashMap<ChangeHash, (Vec<ChangeHash>, u64)>,
}

impl Order {
    pub fn of(doc: &mut AutoCommit, genesis: ChangeHash) -> Order {
        let (entries, nodes) = ordered(doc);
        let entries: Vec<_> = entries.into_iter().filter(|(h, _)| *h != genesis).collect();
        let position = entries
            .iter()
            .enumerate()
            .map(|(i, (h, _))| (*h, i))
            .collect();
        Order {
            heads: doc.get_heads(),
            entries,
            position,
            nodes,
        }
    }

    /// Whether this is the order of a document with these heads.
    pub fn is_for(&self, heads: &[ChangeHash]) -> bool {
        self.heads == heads
    }

    /// Changes in the history (the genesis not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The highest Lamport stamp among the changes up to `heads` (a point's clock), and how
    /// many changes that is.
    pub fn up_to(&self, heads: &[ChangeHash]) -> (u64, usize) {
        let mut seen: HashSet<ChangeHash> = HashSet::new();
        let mut todo: Vec<ChangeHash> = heads.to_vec();
        let mut highest = 0;
        while let Some(h) = todo.pop() {
            if !seen.insert(h) {
                continue;
            }
            if let Some((deps, lamport)) = self.nodes.get(&h) {
                highest = highest.max(*lamport);
                todo.extend(deps.iter().filter(|d| !seen.contains(*d)));
            }
        }
        (highest, seen.len())
    }
}

type Nodes = HashMap<ChangeHash, (Vec<ChangeHash>, u64)>;

/// Every change's hash in history order, with the heads after each; and the graph.
fn ordered(doc: &mut AutoCommit) -> (Vec<(ChangeHash, Vec<ChangeHash>)>, Nodes) {
    let metas = doc.get_changes_meta(&[]);
    let nodes: HashMap<ChangeHash, Node> = metas
        .iter()
        .map(|m| {
            let lamport = m
                .message
                .as_deref()
                .and_then(Stamp::parse)
                .map_or(0, |s| s.lamport);
            (
                m.hash,
                Node {
                    hash: m.hash,
                    deps: m.deps.clone(),
                    lamport,
                },
            )
        })
        .collect();
    let mut waiting: HashMap<ChangeHash, usize> = HashMap::new();
    let mut dependents: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    for node in nodes.values() {
        let known: Vec<&ChangeHash> = node.deps.iter().filter(|d| nodes.contains_key(d)).collect();
        waiting.insert(node.hash, known.len());
        for dep in known {
            dependents.entry(*dep).or_default().push(node.hash);
        }
    }
    let mut ready: BinaryHeap<Reverse<(u64, ChangeHash)>> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(h, _)| Reverse((nodes[h].lamport, *h)))
        .collect();
    let mut heads: HashSet<ChangeHash> = HashSet::new();
    let mut out = Vec::with_capacity(nodes.len());
    while let Some(Reverse((_, hash))) = ready.pop() {
        let node = &nodes[&hash];
        for dep in &node.deps {
            heads.remove(dep);
        }
        heads.insert(hash);
        let mut now: Vec<ChangeHash> = heads.iter().copied().collect();
        now.sort();
        out.push((hash, now));
        for next in dependents.get(&hash).into_iter().flatten() {
            if let Some(n) = waiting.get_mut(next) {
                *n -= 1;
                if *n == 0 {
                    ready.push(Reverse((nodes[next].lamport, *next)));
                }
            }
        }
    }
    let graph = nodes
        .into_iter()
        .map(|(h, n)| (h, (n.deps, n.lamport)))
        .collect();
    (out, graph)
}

/// Up to `limit` entries after the change `after` (from the first without), the run's
/// genesis left out. `legacy` is the actor of replayed legacy rows.
pub(super) fn page(
    doc: &mut AutoCommit,
    history: &Order,
    legacy: &automerge::ActorId,
    after: Option<ChangeHash>,
    limit: usize,
) -> Result<HistoryPage, DocError> {
    let order = &history.entries;
    let start = match after {
        None => 0,
        Some(h) => *history.position.get(&h).ok_or(DocError::UnknownChange(h))? + 1,
    };
    let end = (start + limit).min(order.len());
    let now = doc.get_heads();
    let mut entries = Vec::with_capacity(end.saturating_sub(start));
    for (hash, heads) in &order[start..end] {
        let Some(change) = doc.get_change_by_hash(hash) else {
            continue;
        };
        let stamp = Stamp::of(&change);
        entries.push(HistoryEntry {
            hash: *hash,
            heads: heads.clone(),
            user: stamp.as_ref().and_then(|s| s.user.clone()),
            region: stamp.as_ref().map(|s| s.region.clone()),
            lamport: stamp.as_ref().map(|s| s.lamport),
            time: change.timestamp(),
            described: describe(doc, &change, &now),
            legacy: change.actor_id() == legacy,
        });
    }
    let next = (end < order.len()).then(|| order[end - 1].0);
    Ok(HistoryPage {
        entries,
        next: if end > start { next } else { None },
        total: order.len(),
    })
}

/// What changed between two points of a run's history, and who did it.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDiff {
    pub grafts_added: Vec<crate::Graft>,
    pub grafts_removed: Vec<crate::Graft>,
    pub steps_pruned: Vec<crate::PrunedStep>,
    pub steps_unpruned: Vec<Touched>,
    pub flags_set: Vec<FlagChange>,
    pub flags_changed: Vec<FlagChange>,
    pub flags_deleted: Vec<FlagChange>,
}

/// A step unpruned, and who did it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Touched {
    pub step_id: String,
    pub user: Option<String>,
}

/// A flag as it was and as it became (absent: `None`), and who changed it last.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlagChange {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<serde_json::Value>,
    pub user: Option<String>,
}

/// Who last touched each path (`flags.k`, `prunedSteps.s`, a graft's id) among the changes
/// `to` holds and `from` does not, in history order.
pub(super) fn authors(
    to: &mut AutoCommit,
    from: &mut AutoCommit,
) -> HashMap<String, Option<String>> {
    let before: HashSet<ChangeHash> = from.get_changes_meta(&[]).iter().map(|m| m.hash).collect();
    let now = to.get_heads();
    let mut who = HashMap::new();
    for (hash, _) in ordered(to).0 {
        if before.contains(&hash) {
            continue;
        }
        let Some(change) = to.get_change_by_hash(&hash) else {
            continue;
        };
        let d = describe(to, &change, &now);
        let path =
            |root: &str, field: &str| d.content[field].as_str().map(|k| format!("{root}.{k}"));
        let key = match d.kind {
            super::Kind::Graft => d.content["graft"]["id"]
                .as_str()
                .map(|id| format!("grafts.{id}")),
            super::Kind::Prune | super::Kind::Unprune => path("prunedSteps", "stepId"),
            super::Kind::SetFlag | super::Kind::DeleteFlag => path("flags", "key"),
            _ => None,
        };
        let user = d.author();
        match key {
            Some(key) => {
                who.insert(key, user);
            }
            // Several things in one change: each path it touched.
            None => {
                for p in d.content["touched"].as_array().into_iter().flatten() {
                    if let Some(p) = p.as_str() {
                        who.insert(p.to_string(), user.clone());
                    }
                }
            }
        }
    }
    who
}

/// The difference between two states, with `who` (from [`authors`]) naming the writers.
pub(super) fn diff(
    from: &crate::RunState,
    to: &crate::RunState,
    who: &HashMap<String, Option<String>>,
) -> RunDiff {
    let by = |path: String| who.get(&path).cloned().flatten();
    let ids = |s: &crate::RunState| -> HashSet<String> {
        s.grafts.iter().map(|g| g.id.clone()).collect()
    };
    let (from_ids, to_ids) = (ids(from), ids(to));
    let steps = |s: &crate::RunState| -> HashSet<String> {
        s.pruned_steps.iter().map(|p| p.step_id.clone()).collect()
    };
    let to_steps = steps(to);
    let mut d = RunDiff {
        grafts_added: to
            .grafts
            .iter()
            .filter(|g| !from_ids.contains(&g.id))
            .cloned()
            .collect(),
        grafts_removed: from
            .grafts
            .iter()
            .filter(|g| !to_ids.contains(&g.id))
            .cloned()
            .collect(),
        // Pruned since, or pruned again since (unpruned and pruned by someone in between):
        // the entry that stands now, with who made it.
        steps_pruned: to
            .pruned_steps
            .iter()
            .filter(|p| !from.pruned_steps.contains(p))
            .cloned()
            .collect(),
        steps_unpruned: from
            .pruned_steps
            .iter()
            .filter(|p| !to_steps.contains(&p.step_id))
            .map(|p| Touched {
                step_id: p.step_id.clone(),
                user: by(format!("prunedSteps.{}", p.step_id)),
            })
            .collect(),
        ..RunDiff::default()
    };
    for (key, value) in &to.flags {
        let change = FlagChange {
            key: key.clone(),
            from: from.flags.get(key).cloned(),
            to: Some(value.clone()),
            user: by(format!("flags.{key}")),
        };
        match from.flags.get(key) {
            None => d.flags_set.push(change),
            Some(old) if old != value => d.flags_changed.push(change),
            Some(_) => {}
        }
    }
    for (key, value) in &from.flags {
        if !to.flags.contains_key(key) {
            d.flags_deleted.push(FlagChange {
                key: key.clone(),
                from: Some(value.clone()),
                to: None,
                user: by(format!("flags.{key}")),
            });
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use crate::{DocError, Kind, Mutation, RunDoc};

    const T0: i64 = 1_764_000_000_000;

    fn graft(agent: &str) -> Mutation {
        Mutation::Graft {
            id: Uuid::new_v4(),
            retry_safe: true,
            agent: agent.into(),
            after_step: "s1".into(),
            user: "ann".into(),
        }
    }

    fn flag(key: &str, value: serde_json::Value) -> Mutation {
        Mutation::SetFlag {
            key: key.into(),
            value,
        }
    }

    /// Brings `from`'s changes into `into`.
    fn merge(into: &mut RunDoc, from: &mut RunDoc) {
        let have = into.heads();
        into.apply_remote(from.changes_since(&have), Some(from.lamport()))
            .unwrap();
    }

    #[test]
    fn every_region_lists_the_same_history_whatever_order_changes_arrived_in() {
        let run = Uuid::new_v4();
        let (mut us, mut eu) = (RunDoc::new(run, "us"), RunDoc::new(run, "eu"));
        us.apply_by(&graft("A"), T0, Some("ann")).unwrap();
        merge(&mut eu, &mut us);
        // Concurrent in both regions, then each learns the other's.
        us.apply_by(&flag("k", json!(1)), T0, Some("ann")).unwrap();
        us.apply_by(&graft("B"), T0, Some("ann")).unwrap();
        eu.apply_by(&graft("C"), T0, Some("eve")).unwrap();
        eu.apply_by(&flag("k", json!(2)), T0, Some("eve")).unwrap();
        let mut third = RunDoc::new(run, "ap");
        merge(&mut third, &mut eu);
        merge(&mut third, &mut us);
        merge(&mut us, &mut eu);
        merge(&mut eu, &mut us);
        let (a, b, c) = (
            us.history(None, 100).unwrap(),
            eu.history(None, 100).unwrap(),
            third.history(None, 100).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.total, 5, "the genesis is not listed");
        let kinds: Vec<Kind> = a.entries.iter().map(|e| e.described.kind).collect();
        assert_eq!(kinds.iter().filter(|k| **k == Kind::Graft).count(), 3);
        assert_eq!(a.entries[0].user.as_deref(), Some("ann"));
        // The last entry's heads are the run's.
        let mut now = us.heads();
        now.sort();
        assert_eq!(a.entries.last().unwrap().heads, now);
    }

    #[test]
    fn the_state_at_each_point_is_the_state_that_was_read_then() {
        let run = Uuid::new_v4();
        let mut doc = RunDoc::new(run, "us");
        let mut seen = Vec::new();
        for m in [
            graft("A"),
            flag("k", json!({"a": [1]})),
            Mutation::Prune {
                step_id: "s1".into(),
                user: "bo".into(),
            },
            graft("B"),
            Mutation::DeleteFlag { key: "k".into() },
            Mutation::Unprune {
                step_id: "s1".into(),
            },
        ] {
            doc.apply(&m, T0).unwrap();
            seen.push((doc.heads(), doc.state()));
        }
        let history = doc.history(None, 100).unwrap();
        for (entry, (heads, state)) in history.entries.iter().zip(&seen) {
            let mut heads = heads.clone();
            heads.sort();
            assert_eq!(entry.heads, heads);
            let then = doc.state_at(&entry.heads).unwrap();
            assert_eq!((&then.grafts, &then.flags), (&state.grafts, &state.flags));
            assert_eq!(then.pruned_steps, state.pruned_steps);
            assert_eq!(then.lamport, state.lamport);
        }
        let unknown = automerge::ChangeHash([7; 32]);
        assert!(
            matches!(doc.state_at(&[unknown]), Err(DocError::UnknownChange(h)) if h == unknown)
        );
    }

    /// Points near now are read from the graft index less what changed since; this holds
    /// them to what a fresh read at the point gives, with a graft id made twice (two regions
    /// retrying one graft), grafts a revert removed, and another region's changes merged.
    #[test]
    fn points_near_now_read_as_a_fresh_read_at_the_point_does() {
        let run = Uuid::new_v4();
        let (mut us, mut eu) = (RunDoc::new(run, "us"), RunDoc::new(run, "eu"));
        let same_id = Uuid::new_v4();
        let retried = Mutation::Graft {
            id: same_id,
            retry_safe: true,
            agent: "Twice".into(),
            after_step: "s1".into(),
            user: "ann".into(),
        };
        for i in 0..6 {
            us.apply(&graft(&format!("U{i}")), T0).unwrap();
        }
        us.apply(&retried, T0).unwrap();
        eu.apply(&retried, T0).unwrap();
        eu.apply(&graft("E"), T0).unwrap();
        merge(&mut us, &mut eu);
        let mut points = Vec::new();
        for i in 0..4 {
            us.apply(&graft(&format!("V{i}")), T0).unwrap();
            points.push(us.heads());
        }
        us.apply(
            &Mutation::Revert {
                to: points[0].clone(),
            },
            T0,
        )
        .unwrap();
        us.apply(&graft("W"), T0).unwrap();
        points.push(us.heads());
        us.state();
        for point in &points {
            let fresh = {
                let at = crate::reader::At {
                    doc: &us.doc,
                    heads: Some(point),
                };
                crate::graft_index::GraftIndex::read(at)
            };
            let then = us.state_at(point).unwrap();
            assert_eq!(then.grafts, fresh.0, "at {point:?}");
            assert_eq!(
                then.grafts
                    .iter()
                    .filter(|g| g.id == same_id.to_string())
                    .count(),
                1
            );
        }
    }

    #[test]
    fn pages_follow_each_other_and_a_cursor_must_be_of_the_run() {
        let mut doc = RunDoc::new(Uuid::new_v4(), "us");
        for i in 0..5 {
            doc.apply(&graft(&format!("A{i}")), T0).unwrap();
        }
        let all = doc.history(None, 100).unwrap();
        let (mut after, mut paged) = (None, Vec::new());
        loop {
            let page = doc.history(after, 2).unwrap();
            paged.extend(page.entries);
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(paged, all.entries);
        let other = automerge::ChangeHash([9; 32]);
        assert!(matches!(
            doc.history(Some(other), 2),
            Err(DocError::UnknownChange(_))
        ));
    }

    #[test]
    fn a_diff_names_what_changed_and_who_did_it() {
        let run = Uuid::new_v4();
        let mut doc = RunDoc::new(run, "us");
        doc.apply_by(&graft("A"), T0, Some("ann")).unwrap();
        doc.apply_by(&flag("gone", json!(0)), T0, Some("ann"))
            .unwrap();
        doc.apply_by(&flag("kept", json!(1)), T0, Some("ann"))
            .unwrap();
        let from = doc.heads();
        doc.apply_by(&graft("B"), T0, Some("bo")).unwrap();
        doc.apply_by(&flag("kept", json!(2)), T0, Some("cy"))
            .unwrap();
        doc.apply_by(&flag("new", json!("x")), T0, Some("bo"))
            .unwrap();
        doc.apply_by(
            &Mutation::DeleteFlag { key: "gone".into() },
            T0,
            Some("dee"),
        )
        .unwrap();
        let d = doc.diff(&from, None).unwrap();
        assert_eq!(d.grafts_added.len(), 1);
        assert_eq!(d.grafts_added[0].agent, "B");
        assert!(d.grafts_removed.is_empty());
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(
            j["flagsChanged"],
            json!([{"key": "kept", "from": 1, "to": 2, "user": "cy"}])
        );
        assert_eq!(
            j["flagsSet"],
            json!([{"key": "new", "to": "x", "user": "bo"}])
        );
        assert_eq!(
            j["flagsDeleted"],
            json!([{"key": "gone", "from": 0, "user": "dee"}])
        );
        // And back the other way.
        let now = doc.heads();
        let back = doc.diff(&now, Some(&from)).unwrap();
        assert_eq!(back.grafts_removed.len(), 1);
    }

    #[test]
    fn a_step_pruned_again_by_someone_else_is_in_the_diff_with_its_new_author() {
        let mut doc = RunDoc::new(Uuid::new_v4(), "us");
        let prune = |user: &str| Mutation::Prune {
            step_id: "s1".into(),
            user: user.into(),
        };
        doc.apply_by(&prune("ann"), T0, Some("ann")).unwrap();
        let from = doc.heads();
        let unprune = Mutation::Unprune {
            step_id: "s1".into(),
        };
        doc.apply_by(&unprune, T0, Some("bo")).unwrap();
        doc.apply_by(&prune("cy"), T0, Some("cy")).unwrap();
        let d = doc.diff(&from, None).unwrap();
        assert_eq!(d.steps_pruned.len(), 1, "{d:?}");
        assert_eq!(d.steps_pruned[0].user, "cy");
        assert!(d.steps_unpruned.is_empty());
        // Nothing changed, nothing listed.
        let now = doc.heads();
        assert_eq!(doc.diff(&now, None).unwrap(), super::RunDiff::default());
        // A revert to the first prune brings back ann's entry, not cy's.
        doc.apply_by(&Mutation::Revert { to: from.clone() }, T0, Some("dee"))
            .unwrap();
        assert_eq!(doc.state().pruned_steps[0].user, "ann");
        assert_eq!(
            doc.state().pruned_steps,
            doc.state_at(&from).unwrap().pruned_steps
        );
    }

    #[test]
    fn a_revert_brings_the_state_at_a_point_back_in_every_region() {
        let run = Uuid::new_v4();
        let (mut us, mut eu) = (RunDoc::new(run, "us"), RunDoc::new(run, "eu"));
        us.apply(&graft("A"), T0).unwrap();
        us.apply(&flag("kept", json!(1)), T0).unwrap();
        us.apply(
            &Mutation::Prune {
                step_id: "s1".into(),
                user: "ann".into(),
            },
            T0,
        )
        .unwrap();
        let point = us.heads();
        let then = us.state();
        us.apply(&graft("B"), T0).unwrap();
        us.apply(&flag("kept", json!(2)), T0).unwrap();
        us.apply(&flag("new", json!("x")), T0).unwrap();
        us.apply(
            &Mutation::Unprune {
                step_id: "s1".into(),
            },
            T0,
        )
        .unwrap();
        merge(&mut eu, &mut us);
        let later = us.state();
        let revert = Mutation::Revert { to: point.clone() };
        let applied = eu.apply_by(&revert, T0, Some("bo")).unwrap();
        let change = applied.change.expect("a change");
        let same = |a: &crate::RunState, b: &crate::RunState| {
            a.grafts == b.grafts && a.flags == b.flags && a.pruned_steps == b.pruned_steps
        };
        assert!(same(&eu.state(), &then), "{:?}", eu.state());
        merge(&mut us, &mut eu);
        assert!(same(&us.state(), &then), "and in the other region");
        let d = us.describe(&change);
        assert_eq!(d.kind, Kind::Revert);
        assert_eq!(d.user.as_deref(), Some("bo"));
        let to: Vec<String> = point.iter().map(|h| h.to_string()).collect();
        assert_eq!(d.content["to"], json!(to));
        assert_eq!(
            d.content["touched"],
            json!(["flags.kept", "flags.new", "grafts", "prunedSteps.s1"])
        );
        // Nothing to revert: no change. And back to the later point: graft B returns.
        assert!(us.apply(&revert, T0).unwrap().change.is_none());
        let mut later_heads = later.heads.clone();
        later_heads.sort();
        let back: Vec<automerge::ChangeHash> =
            later_heads.iter().map(|h| h.parse().unwrap()).collect();
        us.apply(&Mutation::Revert { to: back }, T0).unwrap();
        let st = us.state();
        assert_eq!(st.flags, later.flags);
        assert_eq!(
            st.grafts.iter().map(|g| &g.id).collect::<Vec<_>>(),
            later.grafts.iter().map(|g| &g.id).collect::<Vec<_>>()
        );
        // History is never rewritten: every change is still listed.
        assert_eq!(us.history(None, 100).unwrap().total, 9);
    }
}

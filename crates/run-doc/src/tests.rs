//! Unit and property tests of the run document's convergence rules.

use super::*;
use proptest::prelude::*;
use serde_json::json;

const T0: i64 = 1_764_000_000_000;

fn graft(agent: &str, step: &str, user: &str) -> Mutation {
    Mutation::Graft {
        id: Uuid::new_v4(),
        retry_safe: true,
        agent: agent.into(),
        after_step: step.into(),
        user: user.into(),
    }
}

/// Brings every change of `from` that `into` lacks into `into`.
fn merge(into: &mut RunDoc, from: &mut RunDoc) -> RemoteApplied {
    let have = into.heads();
    let changes = from.changes_since(&have);
    let lamport = from.lamport();
    into.apply_remote(changes, Some(lamport)).expect("merge")
}

#[test]
fn graft_is_stamped_and_visible() {
    let run = Uuid::new_v4();
    let mut doc = RunDoc::new(run, "us-east-1");
    let out = doc
        .apply(&graft("SecurityAgent", "Step1", "alice"), T0)
        .unwrap();
    assert!(out.change.is_some());
    assert_eq!(out.lamport, 1);
    let g = out.graft.unwrap();
    assert_eq!(
        (g.agent.as_str(), g.region.as_str(), g.lamport),
        ("SecurityAgent", "us-east-1", 1)
    );
    let state = doc.state();
    assert_eq!(state.grafts, vec![g]);
    assert_eq!(state.lamport, 1);
    assert_eq!(state.heads.len(), 1);
    assert_eq!(Stamp::of(&out.change.unwrap()).unwrap().lamport, 1);
}

#[test]
fn seed_scenario_concurrent_grafts_after_the_same_step_are_both_kept_in_one_order() {
    let run = Uuid::new_v4();
    let mut us = RunDoc::new(run, "us-east-1");
    let mut eu = RunDoc::new(run, "eu-central-1");
    // Both regions were at lamport 41 when the users acted.
    us.observe_lamport(41);
    eu.observe_lamport(41);
    us.apply(&graft("SecurityAgent", "Step1", "userA"), T0)
        .unwrap();
    eu.apply(&graft("PerformanceAgent", "Step1", "userB"), T0)
        .unwrap();
    merge(&mut us, &mut eu);
    merge(&mut eu, &mut us);
    let (a, b) = (us.state(), eu.state());
    assert_eq!(a, b);
    let summary: Vec<_> = a
        .grafts
        .iter()
        .map(|g| (g.agent.as_str(), g.lamport, g.region.as_str()))
        .collect();
    // Same lamport: the tie is broken by region.
    assert_eq!(
        summary,
        vec![
            ("PerformanceAgent", 42, "eu-central-1"),
            ("SecurityAgent", 42, "us-east-1")
        ]
    );
    assert_eq!(a.lamport, 42);
}

#[test]
fn tie_on_lamport_and_region_is_broken_by_user() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    let mut b = RunDoc::new(run, "us-east-1");
    a.apply(&graft("X", "S", "zoe"), T0).unwrap();
    b.apply(&graft("Y", "S", "adam"), T0).unwrap();
    merge(&mut a, &mut b);
    let users: Vec<_> = a.state().grafts.into_iter().map(|g| g.user).collect();
    assert_eq!(users, vec!["adam", "zoe"]);
}

#[test]
fn genesis_is_shared_so_independent_creations_merge_into_one_list() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    let mut b = RunDoc::new(run, "eu-central-1");
    a.apply(&graft("A", "S", "u"), T0).unwrap();
    b.apply(&graft("B", "S", "u"), T0).unwrap();
    merge(&mut a, &mut b);
    assert_eq!(a.state().grafts.len(), 2);
    assert!(a.state().schema_errors.is_empty());
}

#[test]
fn prune_unprune_and_concurrent_prune_wins_over_unprune() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    a.apply(
        &Mutation::Prune {
            step_id: "Step2".into(),
            user: "u".into(),
        },
        T0,
    )
    .unwrap();
    let st = a.state();
    assert_eq!(st.pruned_steps.len(), 1);
    assert_eq!(st.pruned_steps[0].step_id, "Step2");
    assert_eq!(st.pruned_steps[0].lamport, 1);

    let mut b = RunDoc::new(run, "eu-central-1");
    merge(&mut b, &mut a);
    // Concurrently: b unprunes, a prunes again.
    b.apply(
        &Mutation::Unprune {
            step_id: "Step2".into(),
        },
        T0,
    )
    .unwrap();
    a.apply(
        &Mutation::Prune {
            step_id: "Step2".into(),
            user: "v".into(),
        },
        T0,
    )
    .unwrap();
    merge(&mut a, &mut b);
    merge(&mut b, &mut a);
    assert_eq!(a.state(), b.state());
    assert_eq!(a.state().pruned_steps[0].user, "v");

    // A sequential unprune removes it.
    let out = a
        .apply(
            &Mutation::Unprune {
                step_id: "Step2".into(),
            },
            T0,
        )
        .unwrap();
    assert!(out.change.is_some());
    assert!(a.state().pruned_steps.is_empty());
}

#[test]
fn removing_what_is_absent_makes_no_change_and_keeps_the_clock() {
    let mut a = RunDoc::new(Uuid::new_v4(), "r");
    let heads = a.heads();
    let out = a
        .apply(
            &Mutation::Unprune {
                step_id: "nope".into(),
            },
            T0,
        )
        .unwrap();
    assert!(out.change.is_none());
    let out = a
        .apply(&Mutation::DeleteFlag { key: "nope".into() }, T0)
        .unwrap();
    assert!(out.change.is_none());
    assert_eq!(a.lamport(), 0);
    assert_eq!(a.heads(), heads);
}

#[test]
fn flags_hold_any_json_and_delete() {
    let mut a = RunDoc::new(Uuid::new_v4(), "r");
    let value = json!({"n": 1, "f": 1.5, "s": "x", "b": true, "z": null, "l": [1, {"k": "v"}], "big": u64::MAX});
    a.apply(
        &Mutation::SetFlag {
            key: "cfg".into(),
            value: value.clone(),
        },
        T0,
    )
    .unwrap();
    a.apply(
        &Mutation::SetFlag {
            key: "on".into(),
            value: json!(false),
        },
        T0,
    )
    .unwrap();
    let st = a.state();
    assert_eq!(st.flags.get("cfg"), Some(&value));
    assert_eq!(st.flags.get("on"), Some(&json!(false)));
    a.apply(&Mutation::DeleteFlag { key: "on".into() }, T0)
        .unwrap();
    assert!(!a.state().flags.contains_key("on"));
}

#[test]
fn conflicting_flags_pick_the_same_winner_everywhere_and_show_the_conflict() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    let mut b = RunDoc::new(run, "eu-central-1");
    a.apply(
        &Mutation::SetFlag {
            key: "mode".into(),
            value: json!("fast"),
        },
        T0,
    )
    .unwrap();
    b.apply(
        &Mutation::SetFlag {
            key: "mode".into(),
            value: json!("safe"),
        },
        T0,
    )
    .unwrap();
    merge(&mut a, &mut b);
    merge(&mut b, &mut a);
    let (sa, sb) = (a.state(), b.state());
    assert_eq!(sa, sb);
    let values = &sa.flag_conflicts["mode"];
    assert_eq!(values.len(), 2);
    assert!(values.contains(&json!("fast")) && values.contains(&json!("safe")));
    assert!(values.contains(&sa.flags["mode"]));
}

#[test]
fn applying_changes_twice_is_a_no_op() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r1");
    let mut b = RunDoc::new(run, "r2");
    a.apply(&graft("A", "S", "u"), T0).unwrap();
    let changes = a.changes_since(&[]);
    let first = b.apply_remote(changes.clone(), None).unwrap();
    assert_eq!(
        first.applied.len(),
        1,
        "genesis is already there, the graft is new"
    );
    assert_eq!(first.duplicates, 1);
    let heads = b.heads();
    let second = b.apply_remote(changes, None).unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.duplicates, 2);
    assert_eq!(b.heads(), heads);
}

#[test]
fn changes_with_missing_dependencies_are_refused_whole() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r1");
    a.apply(&graft("A", "S", "u"), T0).unwrap();
    let after_first = a.heads();
    a.apply(&graft("B", "S", "u"), T0).unwrap();
    let only_second = a.changes_since(&after_first);
    let mut b = RunDoc::new(run, "r2");
    let heads = b.heads();
    let err = b.apply_remote(only_second, None).unwrap_err();
    assert!(
        matches!(err, DocError::MissingDependencies(ref m) if m == &after_first),
        "{err}"
    );
    assert_eq!(b.heads(), heads);
    assert!(b.state().grafts.is_empty());
}

#[test]
fn remote_changes_advance_the_clock_and_local_ops_continue_from_it() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r1");
    for i in 0..5 {
        a.apply(
            &Mutation::SetFlag {
                key: "k".into(),
                value: json!(i),
            },
            T0,
        )
        .unwrap();
    }
    let mut b = RunDoc::new(run, "r2");
    merge(&mut b, &mut a);
    assert_eq!(b.lamport(), 5);
    let out = b.apply(&graft("G", "S", "u"), T0).unwrap();
    assert_eq!(out.lamport, 6);
    // The stamp in the change message advances the clock even without the hint.
    let mut c = RunDoc::new(run, "r3");
    let changes = b.changes_since(&[]);
    c.apply_remote(changes, None).unwrap();
    assert_eq!(c.lamport(), 6);
}

#[test]
fn save_and_load_round_trip_with_a_fresh_actor() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r1");
    a.apply(&graft("A", "S", "u"), T0).unwrap();
    a.apply(
        &Mutation::SetFlag {
            key: "k".into(),
            value: json!([1, 2]),
        },
        T0,
    )
    .unwrap();
    let bytes = a.save();
    let mut b = RunDoc::load(run, "r1", &bytes).unwrap();
    assert_eq!(a.state(), b.state());
    assert_eq!(b.lamport(), 2);
    // A new incarnation writes with a new actor: its change must not collide with `a`'s.
    let ca = a.apply(&graft("X", "S", "u"), T0).unwrap().change.unwrap();
    let cb = b.apply(&graft("X", "S", "u"), T0).unwrap().change.unwrap();
    assert_ne!(ca.actor_id(), cb.actor_id());
    merge(&mut a, &mut b);
    assert_eq!(a.state().grafts.len(), 3);
}

#[test]
fn load_rejects_garbage_and_other_runs() {
    let mut other = RunDoc::new(Uuid::new_v4(), "r");
    let bytes = other.save();
    assert!(matches!(
        RunDoc::load(Uuid::new_v4(), "r", &bytes),
        Err(DocError::NotThisRun { .. })
    ));
    assert!(RunDoc::load(Uuid::new_v4(), "r", b"garbage").is_err());
}

#[test]
fn changes_since_unknown_heads_returns_everything() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r");
    a.apply(&graft("A", "S", "u"), T0).unwrap();
    let unknown: ChangeHash = "00".repeat(32).parse().unwrap();
    assert_eq!(a.changes_since(&[unknown]).len(), 2);
    let heads = a.heads();
    assert!(a.changes_since(&heads).is_empty());
}

// ---- property tests ----

#[derive(Debug, Clone)]
enum Op {
    Graft(u8, u8),
    /// A graft with one of a few fixed ids: a client's retry, maybe on another replica.
    GraftId(u8, u8),
    Prune(u8),
    Unprune(u8),
    SetFlag(u8, i64),
    DeleteFlag(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, 0u8..4).prop_map(|(a, s)| Op::Graft(a, s)),
        (0u8..3, 0u8..4).prop_map(|(id, a)| Op::GraftId(id, a)),
        (0u8..4).prop_map(Op::Prune),
        (0u8..4).prop_map(Op::Unprune),
        (0u8..3, -5i64..5).prop_map(|(k, v)| Op::SetFlag(k, v)),
        (0u8..3).prop_map(Op::DeleteFlag),
    ]
}

fn to_mutation(op: &Op, user: &str) -> Mutation {
    match op {
        Op::Graft(a, s) => graft(&format!("agent{a}"), &format!("step{s}"), user),
        Op::GraftId(id, a) => Mutation::Graft {
            id: Uuid::from_u128(u128::from(*id) + 1),
            retry_safe: true,
            agent: format!("agent{a}"),
            after_step: "retried".into(),
            user: user.into(),
        },
        Op::Prune(s) => Mutation::Prune {
            step_id: format!("step{s}"),
            user: user.into(),
        },
        Op::Unprune(s) => Mutation::Unprune {
            step_id: format!("step{s}"),
        },
        Op::SetFlag(k, v) => Mutation::SetFlag {
            key: format!("k{k}"),
            value: json!(v),
        },
        Op::DeleteFlag(k) => Mutation::DeleteFlag {
            key: format!("k{k}"),
        },
    }
}

/// A step of a random schedule: replica i makes op, or replica i pulls from replica j.
#[derive(Debug, Clone)]
enum Step {
    Local(usize, Op),
    Pull(usize, usize),
}

fn schedule() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            3 => (0usize..3, op()).prop_map(|(i, o)| Step::Local(i, o)),
            1 => (0usize..3, 0usize..3).prop_map(|(i, j)| Step::Pull(i, j)),
        ],
        1..40,
    )
}

fn replicas(run: Uuid) -> Vec<RunDoc> {
    ["us-east-1", "eu-central-1", "ap-southeast-1"]
        .iter()
        .map(|r| RunDoc::new(run, r))
        .collect()
}

fn pull(docs: &mut [RunDoc], into: usize, from: usize) {
    if into == from {
        return;
    }
    let (a, b) = if into < from {
        let (l, r) = docs.split_at_mut(from);
        (&mut l[into], &mut r[0])
    } else {
        let (l, r) = docs.split_at_mut(into);
        (&mut r[0], &mut l[from])
    };
    merge(a, b);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random operations on three replicas, interleaved with random partial merges, then merged
    /// in a random order: every replica ends with identical state and heads.
    #[test]
    fn three_replicas_converge(steps in schedule(), order in Just([0usize, 1, 2]).prop_shuffle()) {
        let run = Uuid::new_v4();
        let mut docs = replicas(run);
        for step in &steps {
            match step {
                Step::Local(i, o) => { docs[*i].apply(&to_mutation(o, &format!("user{i}")), T0).unwrap(); }
                Step::Pull(i, j) => pull(&mut docs, *i, *j),
            }
            // Reads between steps keep the graft index incremental.
            let _ = docs[0].state();
        }
        // Full exchange in a random order: a ring twice reaches everyone.
        for _ in 0..2 {
            for w in 0..3 {
                pull(&mut docs, order[(w + 1) % 3], order[w]);
            }
        }
        let s0 = docs[0].state();
        for d in docs.iter_mut().skip(1) {
            prop_assert_eq!(&d.state(), &s0);
        }
        // Graft ids are unique in the state, and the index kept up to date step by step reads
        // what a rebuild from the saved document reads.
        let mut ids: Vec<&str> = s0.grafts.iter().map(|g| g.id.as_str()).collect();
        ids.sort();
        let before = ids.len();
        ids.dedup();
        prop_assert_eq!(before, ids.len());
        let mut rebuilt = RunDoc::load(run, "us-east-1", &docs[0].save()).unwrap();
        let mut fresh = rebuilt.state();
        fresh.lamport = s0.lamport;
        prop_assert_eq!(&fresh, &s0);
        let h0 = docs[0].heads();
        for d in docs.iter_mut() {
            prop_assert_eq!(d.heads(), h0.clone());
        }
    }

    /// Merging is commutative (a←b equals b←a) and idempotent (merging again changes nothing).
    #[test]
    fn merge_is_commutative_and_idempotent(
        ops_a in prop::collection::vec(op(), 0..15),
        ops_b in prop::collection::vec(op(), 0..15),
    ) {
        let run = Uuid::new_v4();
        let mut docs = replicas(run);
        for o in &ops_a { docs[0].apply(&to_mutation(o, "a"), T0).unwrap(); }
        for o in &ops_b { docs[1].apply(&to_mutation(o, "b"), T0).unwrap(); }
        // Replica 2 is a copy of b, so each side can merge the other from its own start.
        let a_changes = docs[0].changes_since(&[]);
        let b_changes = docs[1].changes_since(&[]);
        docs[2].apply_remote(b_changes.clone(), None).unwrap();
        docs[0].apply_remote(b_changes, None).unwrap(); // a ← b
        docs[2].apply_remote(a_changes, None).unwrap(); // b ← a
        let (ab, ba) = (docs[0].state(), docs[2].state());
        prop_assert_eq!(&ab, &ba);
        let again = merge_from_all(&mut docs);
        prop_assert_eq!(again, 0);
        prop_assert_eq!(docs[0].state(), ab);
    }
}

/// The id of the last item of `doc`'s grafts list, read from Automerge directly.
fn last_graft_id(doc: &mut RunDoc) -> Option<String> {
    let list = doc.root(GRAFTS, ObjType::List).ok()?;
    let len = doc.doc.length(&list);
    let (_, entry) = doc.doc.get(&list, len.checked_sub(1)?).ok()??;
    let (value, _) = doc.doc.get(&entry, "id").ok()??;
    value.as_str().map(str::to_string)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A local graft goes at the end of the grafts list whatever came before it: grafts, other
    /// mutations, merges from other replicas, a revert and a rollback. (Where the end is, is
    /// remembered between grafts, see `grafts_end`: a stale end would put a graft in the
    /// middle, or past the end, which Automerge refuses.)
    #[test]
    fn a_local_graft_lands_at_the_end_of_the_list(
        steps in schedule(),
        revert_after in 0usize..40,
        roll_back_after in 0usize..40,
    ) {
        let mut docs = replicas(Uuid::new_v4());
        let mut marks = vec![docs[0].heads()];
        for (n, step) in steps.iter().enumerate() {
            match step {
                Step::Local(i, o) => {
                    let out = docs[*i].apply(&to_mutation(o, "u"), T0).unwrap();
                    if let (Op::Graft(..), Some(g)) = (o, out.graft) {
                        prop_assert_eq!(last_graft_id(&mut docs[*i]), Some(g.id));
                    }
                }
                Step::Pull(i, j) => pull(&mut docs, *i, *j),
            }
            marks.push(docs[0].heads());
            if n == revert_after {
                let to = marks[(marks.len() - 1) / 2].clone();
                docs[0].apply(&Mutation::Revert { to }, T0).unwrap();
                marks.push(docs[0].heads());
            }
            if n == roll_back_after {
                // The heads after the point rolled back to are gone with it.
                marks.truncate((marks.len() - 1) / 3 + 1);
                let (heads, lamport) = (marks[marks.len() - 1].clone(), docs[0].lamport());
                docs[0] = docs[0].rolled_back(&heads, lamport).unwrap();
            }
        }
        // And once more on every replica, after all of the above.
        for d in docs.iter_mut() {
            let g = d.apply(&graft("last", "s", "u"), T0).unwrap().graft.unwrap();
            prop_assert_eq!(last_graft_id(d), Some(g.id));
        }
    }
}

fn merge_from_all(docs: &mut [RunDoc]) -> usize {
    let all = docs[2].changes_since(&[]);
    docs[0].apply_remote(all, None).unwrap().applied.len()
}

#[test]
fn setting_a_flag_to_its_current_value_makes_no_change() {
    let mut a = RunDoc::new(Uuid::new_v4(), "r");
    let set = Mutation::SetFlag {
        key: "k".into(),
        value: json!("v"),
    };
    assert!(a.apply(&set, T0).unwrap().change.is_some());
    let heads = a.heads();
    let again = a.apply(&set, T0).unwrap();
    assert!(again.change.is_none());
    assert_eq!((again.lamport, a.lamport()), (1, 1));
    assert_eq!(a.heads(), heads);
}

#[test]
fn a_retried_graft_with_the_same_id_grafts_once() {
    let mut a = RunDoc::new(Uuid::new_v4(), "r");
    let g = graft("A", "S", "u");
    let first = a.apply(&g, T0).unwrap();
    let again = a.apply(&g, T0).unwrap();
    assert!(again.change.is_none());
    assert_eq!(again.graft, first.graft);
    assert_eq!(a.state().grafts.len(), 1);
}

#[test]
fn foreign_documents_are_refused_and_schema_breaches_are_kept_but_reported() {
    use automerge::transaction::Transactable;
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r");
    // A change from a document that is not this run: no dependencies.
    let mut other = automerge::AutoCommit::new();
    other
        .put_object(automerge::ROOT, "grafts", automerge::ObjType::Map)
        .unwrap();
    other.commit();
    let foreign = other.get_changes(&[]);
    let err = a.apply_remote(foreign, None).unwrap_err();
    assert!(matches!(err, DocError::Refused { .. }), "{err}");
    // A change that builds on the run but rewrites a root object.
    let mut b = RunDoc::new(run, "r");
    let mut raw = automerge::AutoCommit::load(&b.save()).unwrap();
    raw.put(automerge::ROOT, "grafts", "gone").unwrap();
    raw.commit();
    let heads = a.heads();
    let takeover = raw.get_changes(&heads);
    // It is a valid change of this run: kept (every replica must hold the same changes)...
    let out = a.apply_remote(takeover.clone(), None).unwrap();
    assert_eq!(out.applied.len(), 1);
    assert_ne!(a.heads(), heads);
    // ...and reported: by the check of what it touched, and in the state.
    let problems = a.schema_violations(&takeover);
    assert_eq!(problems, vec!["grafts is not a List".to_string()]);
    let st = a.state();
    assert!(!st.valid);
    assert_eq!(st.schema_errors, vec!["grafts is not a List".to_string()]);
    // A graft now has nowhere to go: refused with the reason, nothing half-done.
    let err = a.apply(&graft("A", "S", "u"), T0).unwrap_err();
    assert!(err.to_string().contains("grafts"), "{err}");
}

#[test]
fn foreign_client_writes_are_checked_where_they_land() {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ScalarValue, ROOT};
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r");
    a.apply(&graft("A", "S", "u"), T0).unwrap();
    assert!(a.state().valid);
    let mut client = automerge::AutoCommit::load(&a.save()).unwrap();
    let base = a.heads();
    let grafts = match client.get(ROOT, "grafts").unwrap() {
        Some((_, id)) => id,
        None => panic!("no grafts"),
    };
    // A well-formed graft, stamped by the client (numbers as JavaScript writes them).
    let g = client.insert_object(&grafts, 1, ObjType::Map).unwrap();
    for (k, v) in [
        ("id", "g-1"),
        ("agent", "B"),
        ("afterStep", "S"),
        ("user", "js"),
        ("region", "web"),
    ] {
        client.put(&g, k, v).unwrap();
    }
    client.put(&g, "lamport", ScalarValue::F64(41.0)).unwrap();
    client.put(&g, "createdAt", 1_700_000_000_000i64).unwrap();
    client.commit();
    let good = client.get_changes(&base);
    a.apply_remote(good.clone(), None).unwrap();
    assert!(a.schema_violations(&good).is_empty());
    let st = a.state();
    assert!(st.valid, "{:?}", st.schema_errors);
    assert_eq!(st.grafts.len(), 2);
    assert_eq!(st.grafts[1].created_at, "2023-11-14T22:13:20.000Z");
    // The client's stamp moves the node's clock: its next graft orders after the client's.
    assert_eq!(a.lamport(), 41);
    assert_eq!(a.apply(&graft("C", "S", "u"), T0).unwrap().lamport, 42);
    // A graft without its fields, a scalar in the list and a scalar prune entry are named.
    let base = a.heads();
    let mut client = automerge::AutoCommit::load(&a.save()).unwrap();
    client.insert_object(&grafts, 0, ObjType::Map).unwrap();
    client.insert(&grafts, 0, "oops").unwrap();
    let pruned = client.get(ROOT, "prunedSteps").unwrap().unwrap().1;
    client.put(&pruned, "s9", true).unwrap();
    client.commit();
    let bad = client.get_changes(&base);
    a.apply_remote(bad.clone(), None).unwrap();
    let problems = a.schema_violations(&bad);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems.iter().any(|p| p.contains("lacks a field")),
        "{problems:?}"
    );
    assert!(problems
        .iter()
        .any(|p| p.contains("an element of grafts holds a scalar")));
    assert!(problems
        .iter()
        .any(|p| p.contains("prunedSteps.s9 holds a scalar")));
    assert!(!a.state().valid);
}

#[test]
fn deeply_nested_values_read_back_bounded() {
    let mut a = RunDoc::new(Uuid::new_v4(), "r");
    let mut v = json!(1);
    for _ in 0..200 {
        v = json!([v]);
    }
    a.apply(
        &Mutation::SetFlag {
            key: "deep".into(),
            value: v,
        },
        T0,
    )
    .unwrap();
    // Reading does not overflow the stack; below the bound the value reads as null.
    let st = a.state();
    let mut cur = &st.flags["deep"];
    let mut depth = 0;
    while let Some(inner) = cur.as_array().and_then(|a| a.first()) {
        cur = inner;
        depth += 1;
    }
    assert!(depth <= json::MAX_DEPTH + 1, "{depth}");
    assert!(cur.is_null());
}

#[test]
fn replay_applies_what_it_can_and_returns_the_rest() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r");
    a.apply(&graft("A", "S", "u"), T0).unwrap();
    let first = a.heads();
    a.apply(&graft("B", "S", "u"), T0).unwrap();
    let all = a.changes_since(&[]);
    let second = a.changes_since(&first);
    // Lose the first graft's change: the second cannot apply, the rest does.
    let kept: Vec<Change> = all
        .into_iter()
        .filter(|c| !first.contains(&c.hash()))
        .collect();
    let mut b = RunDoc::new(run, "r");
    let rejected = b.replay(kept);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].hash(), second[0].hash());
    assert!(b.state().grafts.is_empty());
}

#[test]
fn a_batch_in_any_order_applies_whole() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r1");
    for i in 0..300 {
        a.apply(
            &Mutation::SetFlag {
                key: format!("k{}", i % 7),
                value: json!(i),
            },
            T0,
        )
        .unwrap();
    }
    let mut changes = a.changes_since(&[]);
    changes.reverse();
    let mut b = RunDoc::new(run, "r2");
    let out = b.apply_remote(changes, None).unwrap();
    assert_eq!(out.applied.len(), 300);
    assert_eq!(b.state(), a.state());
}

/// Runs the sync protocol between two documents until both are quiet.
fn sync_until_quiet(a: &mut RunDoc, sa: &mut sync::State, b: &mut RunDoc, sb: &mut sync::State) {
    let mut to_b = a.sync_step(sa, None, Budget::default()).reply;
    let mut to_a = b.sync_step(sb, None, Budget::default()).reply;
    for _ in 0..20 {
        if to_a.is_none() && to_b.is_none() {
            return;
        }
        let next_a = to_b.take().and_then(|m| {
            let step = b.sync_step(sb, Some(m), Budget::default());
            assert!(step.applied.error.is_none(), "{:?}", step.applied.error);
            step.reply
        });
        let next_b = to_a.take().and_then(|m| {
            let step = a.sync_step(sa, Some(m), Budget::default());
            assert!(step.applied.error.is_none(), "{:?}", step.applied.error);
            step.reply
        });
        to_a = next_a;
        to_b = next_b;
    }
    panic!("sync did not settle");
}

#[test]
fn sync_brings_diverged_replicas_together() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    let mut b = RunDoc::new(run, "eu-central-1");
    for i in 0..20 {
        a.apply(&graft(&format!("A{i}"), "Step1", "alice"), T0)
            .unwrap();
        b.apply(&graft(&format!("B{i}"), "Step1", "bob"), T0)
            .unwrap();
    }
    let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
    sync_until_quiet(&mut a, &mut sa, &mut b, &mut sb);
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.state().grafts, b.state().grafts);
    assert_eq!(a.state().grafts.len(), 40);
}

#[test]
fn sync_changes_ahead_of_their_dependencies_are_parked_and_the_gap_is_asked_for() {
    // What a Bloom false positive does: the sender believes we hold X and sends only what
    // builds on it.
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    a.apply(&graft("Base", "Step1", "alice"), T0).unwrap();
    let mut b = RunDoc::load(run, "eu-central-1", &a.save()).unwrap();
    let base = a.heads();
    for i in 0..3 {
        a.apply(&graft(&format!("G{i}"), "Step1", "alice"), T0)
            .unwrap();
    }
    let new = a.changes_since(&base);
    let x = new[0].hash();
    let message = sync::Message {
        heads: a.heads(),
        need: vec![],
        have: vec![],
        changes: new[1..]
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect::<Vec<_>>()
            .into(),
        flags: None,
        version: sync::MessageVersion::V1,
    };
    let mut sb = sync::State::new();
    let step = b.sync_step(&mut sb, Some(message), Budget::default());
    assert!(step.applied.error.is_none());
    assert!(step.applied.applied.is_empty(), "nothing applies without X");
    let reply = step.reply.expect("a reply asking for X");
    assert!(reply.need.contains(&x), "{:?}", reply.need);

    // A answers the need with X alone; the parked changes then apply behind it.
    let mut sa = sync::State::new();
    let answer = a
        .sync_step(&mut sa, Some(reply), Budget::default())
        .reply
        .expect("an answer");
    let step = b.sync_step(&mut sb, Some(answer), Budget::default());
    assert!(step.applied.error.is_none());
    assert_eq!(step.applied.applied.len(), 3);
    assert_eq!(a.heads(), b.heads());
}

/// `n` grafts on `a`, each followed by the sync message a client would send at once, without
/// waiting for an answer; `None` when a message left its change out. Automerge leaves out a
/// change the peer's Bloom filter seems to hold (about 1% of them, by design: a later round
/// asks for it), so a test that needs every change in its message draws its documents again.
fn messages_in_a_row(a: &mut RunDoc, sa: &mut sync::State, n: usize) -> Option<Vec<sync::Message>> {
    (0..n)
        .map(|i| {
            a.apply(&graft(&format!("Row{i}"), "Step1", "alice"), T0)
                .unwrap();
            let m = a
                .sync_step(sa, None, Budget::default())
                .reply
                .expect("a message for each new change");
            (m.changes.len() == 1).then_some(m)
        })
        .collect()
}

/// The first of up to 20 draws of `make` that gives something (see [`messages_in_a_row`]).
fn drawn<T>(mut make: impl FnMut() -> Option<T>) -> T {
    (0..20)
        .find_map(|_| make())
        .expect("20 draws, each with a change taken for held by the Bloom filter")
}

#[test]
fn several_sync_messages_in_one_step_do_what_they_do_one_by_one() {
    let (mut a, mut sa, mut together, mut st, mut one_by_one, mut so, messages) = drawn(|| {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us-east-1");
        let mut sa = sync::State::new();
        // The peer first learns what the server holds, as a connected client has.
        let mut together = RunDoc::new(run, "eu-central-1");
        let mut st = sync::State::new();
        sync_until_quiet(&mut a, &mut sa, &mut together, &mut st);
        let one_by_one = RunDoc::load(run, "eu-central-1", &together.save()).unwrap();
        let so = st.clone();
        let messages = messages_in_a_row(&mut a, &mut sa, 5)?;
        Some((a, sa, together, st, one_by_one, so, messages))
    });

    let step = together.sync_step(&mut st, messages.clone(), Budget::default());
    assert!(step.applied.error.is_none(), "{:?}", step.applied.error);
    assert_eq!(step.applied.applied.len(), 5);
    let reply = step.reply.expect("one reply to the five");
    assert_eq!(reply.heads, a.heads(), "the reply acknowledges all five");

    let mut applied = 0;
    for m in messages {
        let step = one_by_one.sync_step(&mut so, Some(m), Budget::default());
        assert!(step.applied.error.is_none());
        applied += step.applied.applied.len();
    }
    assert_eq!(applied, 5);
    assert_eq!(together.heads(), one_by_one.heads());
    assert_eq!(together.state(), one_by_one.state());
    // The one reply is enough for the client: both sides settle on the same document.
    let answer = a.sync_step(&mut sa, Some(reply), Budget::default());
    assert!(answer.applied.error.is_none());
    sync_until_quiet(&mut a, &mut sa, &mut together, &mut st);
    assert_eq!(a.heads(), together.heads());
}

#[test]
fn a_refused_message_in_a_step_keeps_those_before_it_and_stops_the_rest() {
    let (mut b, mut sb, mut messages) = drawn(|| {
        let run = Uuid::new_v4();
        let mut a = RunDoc::new(run, "us-east-1");
        let mut sa = sync::State::new();
        let mut b = RunDoc::new(run, "eu-central-1");
        let mut sb = sync::State::new();
        sync_until_quiet(&mut a, &mut sa, &mut b, &mut sb);
        let messages = messages_in_a_row(&mut a, &mut sa, 3)?;
        Some((b, sb, messages))
    });
    // The middle message carries bytes that are not a change.
    messages[1].changes = vec![vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3]].into();
    let step = b.sync_step(&mut sb, messages, Budget::default());
    assert!(
        matches!(step.applied.error, Some(DocError::InvalidChanges(_))),
        "{:?}",
        step.applied.error
    );
    assert_eq!(
        step.applied.applied.len(),
        1,
        "the first message stays applied"
    );
    assert!(step.reply.is_none());
    let grafts: Vec<String> = b.state().grafts.iter().map(|g| g.agent.clone()).collect();
    assert_eq!(grafts, vec!["Row0".to_string()]);
}

#[test]
fn sync_messages_with_malformed_bloom_filters_are_refused_not_panicked_on() {
    let run = Uuid::new_v4();
    let mut b = RunDoc::new(run, "eu-central-1");
    // A `have` whose filter claims entries with zero bits per entry: Automerge would divide by
    // zero reading it. Encoded by hand: message type, heads, need, have (last_sync, bloom).
    let mut a = RunDoc::new(run, "us-east-1");
    a.apply(&graft("G", "Step1", "alice"), T0).unwrap();
    let mut sa = sync::State::new();
    let good = a
        .sync_step(&mut sa, None, Budget::default())
        .reply
        .expect("message");
    let mut bytes = good.clone().encode();
    let bloom = good.have[0].bloom.to_bytes();
    assert!(!bloom.is_empty());
    // Rewrite bits-per-entry (the filter's second LEB128 field) to 0 in place.
    let at = bytes
        .windows(bloom.len())
        .position(|w| w == &bloom[..])
        .expect("bloom bytes in the message");
    let entries_len = bloom.iter().position(|b| b & 0x80 == 0).unwrap() + 1;
    bytes[at + entries_len] = 0;
    let bad = sync::Message::decode(&bytes).expect("still decodes");
    let mut sb = sync::State::new();
    let step = b.sync_step(&mut sb, Some(bad), Budget::default());
    assert!(matches!(
        step.applied.error,
        Some(DocError::InvalidChanges(_))
    ));
}

/// Two distinct replicas of `docs`, mutably.
fn pair(docs: &mut [RunDoc], i: usize, j: usize) -> (&mut RunDoc, &mut RunDoc) {
    assert_ne!(i, j);
    if i < j {
        let (l, r) = docs.split_at_mut(j);
        (&mut l[i], &mut r[0])
    } else {
        let (l, r) = docs.split_at_mut(i);
        (&mut r[0], &mut l[j])
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// As the mesh runs it: random operations on three replicas, random pairs syncing with the
    /// sync protocol and the state each keeps per peer, links dropped at random (the state
    /// reduced to what a new link starts from), then everyone syncs: identical heads and state.
    #[test]
    fn replicas_converge_over_the_sync_protocol(
        steps in schedule(),
        drops in prop::collection::vec(any::<bool>(), 40),
    ) {
        let run = Uuid::new_v4();
        let mut docs = replicas(run);
        let mut states: Vec<Vec<sync::State>> =
            (0..3).map(|_| (0..3).map(|_| sync::State::new()).collect()).collect();
        for (n, step) in steps.iter().enumerate() {
            match step {
                Step::Local(i, o) => {
                    docs[*i].apply(&to_mutation(o, &format!("user{i}")), T0).unwrap();
                }
                Step::Pull(i, j) if i != j => {
                    let (a, b) = pair(&mut docs, *i, *j);
                    let mut sa = std::mem::take(&mut states[*i][*j]);
                    let mut sb = std::mem::take(&mut states[*j][*i]);
                    sync_until_quiet(a, &mut sa, b, &mut sb);
                    if drops[n % drops.len()] {
                        sa = sync::State::decode(&sa.encode()).unwrap();
                        sb = sync::State::decode(&sb.encode()).unwrap();
                    }
                    states[*i][*j] = sa;
                    states[*j][*i] = sb;
                }
                Step::Pull(..) => {}
            }
        }
        for (i, j) in [(0, 1), (1, 2), (0, 2), (0, 1)] {
            let (a, b) = pair(&mut docs, i, j);
            let mut sa = std::mem::take(&mut states[i][j]);
            let mut sb = std::mem::take(&mut states[j][i]);
            sync_until_quiet(a, &mut sa, b, &mut sb);
            states[i][j] = sa;
            states[j][i] = sb;
        }
        let s0 = docs[0].state();
        let h0 = docs[0].heads();
        for d in docs.iter_mut().skip(1) {
            prop_assert_eq!(&d.state(), &s0);
            prop_assert_eq!(d.heads(), h0.clone());
        }
    }
}

#[test]
fn a_sync_reply_asking_for_several_changes_lists_them_sorted() {
    // A change that builds on two concurrent ones, sent without either.
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    a.apply(&graft("Base", "Step1", "alice"), T0).unwrap();
    let mut b = RunDoc::load(run, "eu-central-1", &a.save()).unwrap();
    let mut a2 = RunDoc::load(run, "ap-southeast-1", &a.save()).unwrap();
    a.apply(&graft("X", "Step1", "alice"), T0).unwrap();
    a2.apply(&graft("Y", "Step1", "carol"), T0).unwrap();
    merge(&mut a, &mut a2);
    let top = a.apply(&graft("Z", "Step1", "alice"), T0).unwrap();
    let z = top.change.unwrap();
    assert_eq!(z.deps().len(), 2);
    let message = sync::Message {
        heads: a.heads(),
        need: vec![],
        have: vec![],
        changes: vec![z.raw_bytes().to_vec()].into(),
        flags: None,
        version: sync::MessageVersion::V1,
    };
    let step = b.sync_step(&mut sync::State::new(), Some(message), Budget::default());
    let reply = step.reply.expect("a reply");
    for dep in z.deps() {
        assert!(reply.need.contains(dep));
    }
    assert!(
        reply.need.windows(2).all(|w| w[0] < w[1]),
        "{:?}",
        reply.need
    );
    // Encoding checks the order too (in debug builds it asserts).
    assert!(sync::Message::decode(&reply.encode()).is_ok());
}

#[test]
fn a_peers_live_change_ahead_of_its_dependency_is_parked_then_applied() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    a.apply(&graft("Base", "Step1", "alice"), T0).unwrap();
    let mut b = RunDoc::load(run, "eu-central-1", &a.save()).unwrap();
    let x = a
        .apply(&graft("X", "Step1", "alice"), T0)
        .unwrap()
        .change
        .unwrap();
    let y = a
        .apply(&graft("Y", "Step1", "alice"), T0)
        .unwrap()
        .change
        .unwrap();
    // Y arrives first: held back, not refused.
    let out = b.apply_remote_parking(vec![y.clone()], Some(3)).unwrap();
    assert!(out.applied.is_empty() && out.parked == 1 && b.has_parked());
    // A sync round from b asks for X by name.
    let reply = b
        .sync_step(&mut sync::State::new(), None, Budget::default())
        .reply
        .expect("a message");
    assert!(reply.need.contains(&x.hash()), "{:?}", reply.need);
    // X arrives: both apply, in order.
    let out = b.apply_remote_parking(vec![x.clone()], None).unwrap();
    assert_eq!(
        out.applied.iter().map(|c| c.hash()).collect::<Vec<_>>(),
        vec![x.hash(), y.hash()]
    );
    assert!(!b.has_parked());
    assert_eq!(a.heads(), b.heads());
    // Over HTTP the same gap is refused whole, naming what is missing.
    let mut c = RunDoc::load(run, "ap-southeast-1", &b.save()).unwrap();
    let z = a
        .apply(&graft("Z", "Step1", "alice"), T0)
        .unwrap()
        .change
        .unwrap();
    let w = a
        .apply(&graft("W", "Step1", "alice"), T0)
        .unwrap()
        .change
        .unwrap();
    assert!(matches!(
        c.apply_remote(vec![w], None),
        Err(DocError::MissingDependencies(m)) if m == vec![z.hash()]
    ));
}

fn legacy_log() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "GRAFT",
            r#"{"agent":"SecurityAgent","afterStep":"Step1","user":"alice","region":"us-east-1"}"#,
        ),
        (
            "PRUNE",
            r#"{"stepId":"Step3","user":"bob","region":"eu-central-1"}"#,
        ),
        (
            "SET_FLAG",
            r#"{"key":"review","value":{"required":true},"user":"alice"}"#,
        ),
        ("GRAFT", r#"{"agent":""}"#),
        ("EXPLODE", r#"{}"#),
        ("SET_FLAG", r#"{"key":"noValue"}"#),
        ("UNPRUNE", r#"{"stepId":"Step3"}"#),
        ("DELETE_FLAG", r#"{"key":"review"}"#),
        ("GRAFT", "not json"),
        (
            "GRAFT",
            r#"{"agent":"PerformanceAgent","afterStep":"Step1"}"#,
        ),
    ]
}

fn replay(run: Uuid, region: &str) -> (RunDoc, Vec<(usize, String)>) {
    let at = chrono::DateTime::from_timestamp(1_700_000_000, 0)
        .unwrap()
        .naive_utc();
    let log = legacy_log();
    let events: Vec<LegacyEvent> = log
        .iter()
        .map(|(t, p)| LegacyEvent {
            event_type: t,
            payload: Some(p),
            user_id: Some("row-user"),
            created_at: at,
        })
        .collect();
    let mut doc = RunDoc::new(run, region);
    let skipped = doc.replay_legacy(run, &events);
    (doc, skipped)
}

#[test]
fn legacy_replay_is_byte_identical_on_every_node_and_skips_malformed_rows() {
    let run = Uuid::new_v4();
    let (mut a, skipped) = replay(run, "us-east-1");
    let (mut b, _) = replay(run, "eu-central-1");
    assert_eq!(
        skipped.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![3, 4, 5, 8],
        "{skipped:?}"
    );
    assert!(skipped[1].1.contains("EXPLODE"));
    // The same changes, byte for byte: merging them adds nothing.
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.changes_since(&[]), b.changes_since(&[]));
    let merged = merge(&mut a, &mut b);
    assert!(merged.applied.is_empty(), "nothing new to merge");
    let s = a.state();
    assert_eq!(
        s.grafts
            .iter()
            .map(|g| g.agent.as_str())
            .collect::<Vec<_>>(),
        ["SecurityAgent", "PerformanceAgent"]
    );
    assert_eq!(s.grafts[0].region, "us-east-1");
    assert_eq!(s.grafts[1].user, "row-user");
    assert_eq!(s.grafts[1].region, "legacy");
    assert!(s.pruned_steps.is_empty());
    assert!(s.flags.is_empty());
    // New local work goes on under the node's own actor, after the legacy stamps.
    let before = s.lamport;
    let applied = a.apply(&graft("New", "Step1", "u"), 0).unwrap();
    assert!(applied.lamport > before);
    let change = applied.change.unwrap();
    assert_ne!(change.actor_id(), &legacy_actor(run));
}

/// Found by the `snapshot_load` fuzz target: Automerge 0.12 panics reading this document. A
/// torn or hostile snapshot (or CRDT_FULL_SYNC state) must be an error, not a dead thread.
#[test]
fn a_document_that_makes_automerge_panic_is_refused() {
    let bytes =
        include_bytes!("../../../fuzz/corpus/snapshot_load/regression-automerge-load-panic");
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let loaded = RunDoc::load(Uuid::from_u128(7), "r", bytes);
    let parsed = parse_document(bytes);
    std::panic::set_hook(default_hook);
    assert!(loaded.is_err());
    assert!(parsed.is_err());
}

/// Found by the `sync_changes` fuzz target: Automerge 0.12 panics verifying this change chunk.
#[test]
fn a_change_that_makes_automerge_panic_is_refused() {
    let bytes =
        include_bytes!("../../../fuzz/corpus/sync_changes/regression-automerge-parse-panic");
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let parsed = parse_changes(bytes);
    std::panic::set_hook(default_hook);
    assert!(parsed.is_err());
}

#[test]
fn a_clients_absurd_stamp_does_not_pin_the_clock() {
    use automerge::transaction::Transactable;
    let mut a = RunDoc::new(Uuid::new_v4(), "r");
    a.apply(&graft("A", "S", "u"), T0).unwrap();
    let base = a.heads();
    let mut client = automerge::AutoCommit::load(&a.save()).unwrap();
    let flags = client.get(automerge::ROOT, "flags").unwrap().unwrap().1;
    client.put(&flags, "lamport", 1i64 << 52).unwrap();
    client.commit();
    a.apply_remote(client.get_changes(&base), None).unwrap();
    assert_eq!(a.lamport(), 1);
    assert_eq!(a.apply(&graft("B", "S", "u"), T0).unwrap().lamport, 2);
}

/// A change of `run` stamped `lamport` in its commit message, as a node's would be.
fn stamped_change(run: Uuid, lamport: u64) -> Change {
    let mut raw = AutoCommit::load(&RunDoc::new(run, "r").save()).unwrap();
    raw.set_actor(ActorId::random());
    let flags = raw.get(automerge::ROOT, FLAGS).unwrap().unwrap().1;
    raw.put(&flags, "forged", 1).unwrap();
    let stamp = Stamp {
        lamport,
        region: "evil".into(),
        user: None,
        revert_to: None,
        checkpoint: None,
    };
    raw.commit_with(CommitOptions::default().with_message(stamp.to_message()));
    raw.get_last_local_change().unwrap()
}

#[test]
fn a_stamp_far_past_the_clock_is_refused_on_every_path() {
    let run = Uuid::new_v4();
    let pin = MAX_LAMPORT;
    let mut a = RunDoc::new(run, "r");
    let err = a
        .apply_remote(vec![stamped_change(run, pin)], None)
        .unwrap_err();
    assert!(matches!(err, DocError::ClockJump(_)), "{err}");
    let err = a
        .apply_remote_parking(vec![stamped_change(run, pin)], None)
        .unwrap_err();
    assert!(matches!(err, DocError::ClockJump(_)), "{err}");
    // Over the sync protocol too.
    let mut sender = AutoCommit::load(&RunDoc::new(run, "r").save()).unwrap();
    sender
        .apply_changes([stamped_change(run, pin)])
        .expect("a raw document takes anything");
    let message = sender
        .sync()
        .generate_sync_message(&mut sync::State::new())
        .unwrap();
    let mut state = sync::State::new();
    let first = a.sync_step(&mut state, Some(message), Budget::default());
    let mut reply = first.reply.expect("a reply to the opening message");
    let mut sender_state = sync::State::new();
    let _ = sender.sync().generate_sync_message(&mut sender_state);
    sender
        .sync()
        .receive_sync_message(&mut sender_state, reply.clone())
        .unwrap();
    let mut refused = false;
    for _ in 0..4 {
        let Some(m) = sender.sync().generate_sync_message(&mut sender_state) else {
            break;
        };
        let step = a.sync_step(&mut state, Some(m), Budget::default());
        if let Some(e) = step.applied.error {
            assert!(matches!(e, DocError::ClockJump(_)), "{e}");
            refused = true;
            break;
        }
        reply = step.reply.expect("the protocol goes on");
        sender
            .sync()
            .receive_sync_message(&mut sender_state, reply.clone())
            .unwrap();
    }
    assert!(
        refused,
        "the forged change reached the sync step and was refused"
    );
    // The clock is untouched: the next local graft is stamped 1.
    assert_eq!(a.lamport(), 0);
    let g = a.apply(&graft("A", "S", "u"), T0).unwrap();
    assert_eq!(g.lamport, 1);
    // A stamp within the step is taken.
    let near = MAX_LAMPORT_STEP;
    a.apply_remote(vec![stamped_change(run, near)], None)
        .expect("within the step");
    assert_eq!(a.lamport(), near);
}

#[test]
fn a_peer_clock_ahead_of_its_changes_is_ignored_not_taken() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r");
    let mut b = RunDoc::new(run, "r2");
    let g = a.apply(&graft("A", "S", "u"), T0).unwrap();
    // A peer pages a long history: its clock is far ahead of this first page.
    let out = b
        .apply_remote_parking(vec![g.change.clone().unwrap()], Some(MAX_LAMPORT))
        .unwrap();
    assert_eq!(out.applied.len(), 1);
    assert_eq!(b.lamport(), 1, "the page's own stamp, not the far clock");
    // Over HTTP, a lamportTimestamp past the step is refused with the reason.
    let mut c = RunDoc::new(run, "r3");
    let err = c
        .apply_remote(vec![g.change.unwrap()], Some(MAX_LAMPORT))
        .unwrap_err();
    assert!(err.to_string().contains("lamportTimestamp"), "{err}");
    assert_eq!(c.lamport(), 0);
}

#[test]
fn a_graft_retried_in_another_region_shows_once_everywhere() {
    let run = Uuid::new_v4();
    let mut us = RunDoc::new(run, "us-east-1");
    let mut eu = RunDoc::new(run, "eu-central-1");
    let id = Uuid::new_v4();
    let retry = |user: &str| Mutation::Graft {
        id,
        retry_safe: true,
        agent: "Planner".into(),
        after_step: "s1".into(),
        user: user.into(),
    };
    // The first attempt timed out during a partition; the client retried on the other side.
    let first = us.apply(&retry("alice"), T0).unwrap();
    let second = eu.apply(&retry("alice"), T0 + 5).unwrap();
    assert!(first.change.is_some() && second.change.is_some());
    let _ = us.state();
    let _ = eu.state();
    merge(&mut us, &mut eu);
    merge(&mut eu, &mut us);
    let (a, b) = (us.state(), eu.state());
    assert_eq!(a, b, "every region shows the same");
    let same_id: Vec<_> = a.grafts.iter().filter(|g| g.id == id.to_string()).collect();
    assert_eq!(same_id.len(), 1, "{:?}", a.grafts);
    // The one shown is the first by (lamport, region, user): both were stamped 1, so the
    // region decides.
    assert_eq!(same_id[0].region, "eu-central-1");
    // A third retry anywhere is answered with that graft, and changes nothing.
    let again = us.apply(&retry("alice"), T0 + 9).unwrap();
    assert!(again.change.is_none());
    assert_eq!(again.graft.unwrap().region, "eu-central-1");
}

#[test]
fn the_graft_index_follows_remote_grafts_and_foreign_rewrites() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "r1");
    let mut b = RunDoc::new(run, "r2");
    for i in 0..5 {
        a.apply(&graft(&format!("A{i}"), "s", "u"), T0).unwrap();
    }
    assert_eq!(b.state().grafts.len(), 0);
    merge(&mut b, &mut a);
    assert_eq!(b.state().grafts.len(), 5, "remote grafts reach the index");
    // A foreign client deletes a graft from the list: the index rebuilds.
    let mut raw = AutoCommit::load(&b.save()).unwrap();
    let base = raw.get_heads();
    let list = raw.get(automerge::ROOT, GRAFTS).unwrap().unwrap().1;
    raw.delete(&list, 0).unwrap();
    raw.commit();
    let changes = raw.get_changes(&base);
    b.apply_remote(changes, None).unwrap();
    let state = b.state();
    assert_eq!(state.grafts.len(), 4);
    let mut rebuilt = RunDoc::load(run, "r2", &b.save()).unwrap();
    assert_eq!(rebuilt.state().grafts, state.grafts);
}

/// A size near one of the doors' limits: just under, at, just over, or anywhere up to twice.
fn near(limit: usize) -> impl Strategy<Value = usize> {
    prop_oneof![(limit.saturating_sub(3)..=limit + 3), (0..=limit * 2),]
}

/// A mutation sized around the limits the doors check (flag values and text, names).
fn sized_mutation() -> impl Strategy<Value = Mutation> {
    let array = near(rules::MAX_FLAG_VALUES).prop_map(|n| json!(vec![0; n]));
    let text = near(rules::MAX_FLAG_TEXT_BYTES).prop_map(|n| json!("x".repeat(n)));
    let object = near(rules::MAX_FLAG_VALUES / 2).prop_map(|n| {
        json!((0..n)
            .map(|i| (format!("k{i}"), json!([i, "v"])))
            .collect::<serde_json::Map<_, _>>())
    });
    let flag = prop_oneof![array, text, object].prop_map(|value| Mutation::SetFlag {
        key: "big".into(),
        value,
    });
    let graft = (near(rules::MAX_NAME), near(rules::MAX_NAME)).prop_map(|(a, u)| Mutation::Graft {
        id: Uuid::new_v4(),
        retry_safe: false,
        agent: "a".repeat(a),
        after_step: "S1".into(),
        user: "u".repeat(u),
    });
    prop_oneof![flag, graft]
}

/// What a door checks of a mutation before it reaches the document.
fn door_admits(m: &Mutation) -> bool {
    match m {
        Mutation::SetFlag { key, value } => {
            rules::name("key", Some(key)).is_ok() && rules::flag_value("value", value).is_ok()
        }
        Mutation::Graft { agent, user, .. } => {
            rules::name("agent", Some(agent)).is_ok() && rules::name("user", Some(user)).is_ok()
        }
        _ => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// What the node acknowledges it can always load again, and every other replica takes:
    /// a mutation the doors admit makes a change that a client door accepts (the strictest
    /// judge), that the log loader reads back, and that a snapshot holds.
    #[test]
    fn every_admitted_mutation_makes_a_change_every_replica_loads(
        mutations in proptest::collection::vec(sized_mutation(), 1..4)
    ) {
        let run = Uuid::new_v4();
        let mut doc = RunDoc::new(run, "us-east-1");
        let mut log = Vec::new();
        for m in mutations.iter().filter(|m| door_admits(m)) {
            let applied = doc.apply(m, T0).expect("an admitted mutation applies");
            // Setting a flag to the value it holds makes no change.
            let Some(change) = applied.change else { continue };
            let bytes = change.raw_bytes().to_vec();
            prop_assert!(parse_changes(&bytes).is_ok(), "a client door refuses it");
            log.push(bytes);
        }
        // The loader's path: the log's rows, then a fresh document.
        let mut reloaded = RunDoc::new(run, "us-east-1");
        let changes: Vec<Change> = log
            .iter()
            .flat_map(|b| parse_own_changes(b).expect("the loader reads its own log"))
            .collect();
        prop_assert!(reloaded.replay(changes).is_empty());
        prop_assert_eq!(reloaded.state(), doc.state());
        let snapshot = doc.save();
        let mut from_snapshot = RunDoc::load(run, "us-east-1", &snapshot).expect("snapshot loads");
        prop_assert_eq!(from_snapshot.state(), doc.state());
    }
}

#[test]
fn a_mutation_past_the_change_bound_is_refused_whole_by_the_document() {
    // The doors refuse this first (413); the document refuses it too, leaving nothing.
    let run = Uuid::new_v4();
    let mut doc = RunDoc::new(run, "us-east-1");
    let before = doc.heads();
    let big = Mutation::SetFlag {
        key: "big".into(),
        value: json!(vec![0; MAX_OPS_PER_CHANGE as usize + 1]),
    };
    let e = doc.apply(&big, T0).unwrap_err();
    assert!(matches!(e, DocError::TooLarge(_)), "{e}");
    assert_eq!(doc.heads(), before);
    assert_eq!(doc.lamport(), 0);
    assert!(doc.state().flags.get("big").is_none());
}

#[test]
fn the_loader_reads_back_own_changes_past_the_client_bound() {
    // Written before every door bounded flags: the log may hold such a change, and loading
    // must never drop it (nor what follows it).
    use automerge::{transaction::Transactable, ObjType, ReadDoc, ROOT};
    let run = Uuid::new_v4();
    let mut doc = RunDoc::new(run, "r1");
    let genesis = doc.save();
    let big_change = |message: Option<String>| {
        let mut old = AutoCommit::load(&genesis).unwrap();
        old.set_actor(ActorId::random());
        let flags = old.get(ROOT, "flags").unwrap().unwrap().1;
        let list = old.put_object(&flags, "big", ObjType::List).unwrap();
        let zeros = vec![automerge::ScalarValue::Int(0); MAX_OPS_PER_CHANGE as usize + 10];
        old.splice(&list, 0, 0, zeros).unwrap();
        let options = CommitOptions::default();
        old.commit_with(match message {
            Some(m) => options.with_message(m),
            None => options,
        });
        old.get_last_local_change().unwrap().raw_bytes().to_vec()
    };
    // Unstamped, a peer's change past the bound is an op bomb like any other.
    assert!(parse_peer_changes(&big_change(None)).is_err());
    let stamp = Stamp {
        lamport: 1,
        region: "r1".into(),
        user: None,
        revert_to: None,
        checkpoint: None,
    };
    let big = big_change(Some(stamp.to_message()));
    assert!(parse_changes(&big).is_err(), "a client door refuses it");
    assert!(
        parse_peer_changes(&big).is_ok(),
        "a node's stamped change is taken from a peer"
    );
    let own = parse_own_changes(&big).unwrap();
    assert!(doc.replay(own).is_empty());
    doc.apply(&graft("After", "S1", "u"), T0).unwrap();
    let saved = doc.save();
    let mut loaded = RunDoc::load(run, "r1", &saved).expect("the snapshot loads");
    assert_eq!(loaded.state().grafts.len(), 1);
    assert!(loaded.state().flags.contains_key("big"));
}

#[test]
fn stamps_chained_in_one_request_cannot_carry_the_clock_away() {
    let run = Uuid::new_v4();
    let mut honest = RunDoc::new(run, "r1");
    let mut chain = RunDoc::new(run, "r2");
    let mut changes = Vec::new();
    for i in 0..5 {
        // Each stamp just within a step of the one before it.
        chain.observe_lamport(chain.lamport() + MAX_LAMPORT_STEP - 1);
        let out = chain
            .apply(&graft(&format!("A{i}"), "S1", "m"), T0)
            .unwrap();
        changes.push(out.change.unwrap());
    }
    let e = honest.apply_remote(changes.clone(), None).unwrap_err();
    assert!(matches!(e, DocError::ClockJump(_)), "{e}");
    assert!(e.to_string().contains("one request"), "{e}");
    assert_eq!(honest.lamport(), 0, "nothing moved");
    // One of them alone is within the bound.
    honest.apply_remote(changes[..1].to_vec(), None).unwrap();
    assert_eq!(honest.lamport(), MAX_LAMPORT_STEP);
    // A peer node's history is checked stamp by stamp only: another region must never be
    // refused what its own region holds.
    let mut region = RunDoc::new(run, "r3");
    let taken = region.apply_remote_parking(changes.clone(), None).unwrap();
    assert_eq!(taken.applied.len(), 5);
}

/// A graft with a chosen id, for retries and duplicates.
fn graft_with_id(id: Uuid, agent: &str) -> Mutation {
    Mutation::Graft {
        id,
        retry_safe: true,
        agent: agent.into(),
        after_step: "s".into(),
        user: "u".into(),
    }
}

#[test]
fn a_projection_seeds_the_graft_index_of_the_loaded_document() {
    let run = Uuid::new_v4();
    let mut us = RunDoc::new(run, "us-east-1");
    let mut eu = RunDoc::new(run, "eu-central-1");
    let twice = Uuid::new_v4();
    for i in 0..20 {
        us.apply(&graft(&format!("A{i}"), "s", "ana"), T0).unwrap();
    }
    // The same id grafted in two regions during a partition: one shown, one hidden.
    us.apply(&graft_with_id(twice, "Us"), T0).unwrap();
    eu.apply(&graft_with_id(twice, "Eu"), T0).unwrap();
    merge(&mut us, &mut eu);
    us.apply(
        &Mutation::SetFlag {
            key: "k".into(),
            value: json!({"a": [1, 2]}),
        },
        T0,
    )
    .unwrap();
    us.apply(
        &Mutation::Prune {
            step_id: "s".into(),
            user: "bo".into(),
        },
        T0,
    )
    .unwrap();
    let projection = Projection::decode(&us.projection().encode()).unwrap();
    assert_eq!(**projection.state, us.state());
    assert_eq!(
        serde_json::from_str::<RunState>(projection.state.json()).unwrap(),
        us.state(),
        "the stored JSON is the state"
    );
    let twice = twice.to_string();
    assert!(projection.state.grafts.iter().any(|g| g.id == twice));

    let saved = us.save();
    let mut seeded = RunDoc::load(run, "us-east-1", &saved).unwrap();
    assert!(
        seeded.seed_index(&projection),
        "the projection matches its document"
    );
    let mut rebuilt = RunDoc::load(run, "us-east-1", &saved).unwrap();
    assert_eq!(seeded.state(), rebuilt.state());
    // The seeded index then follows local and remote changes as a built one does.
    seeded.apply(&graft("Local", "s", "ana"), T0).unwrap();
    merge(&mut rebuilt, &mut seeded);
    eu.apply(&graft("Remote", "s", "bo"), T0).unwrap();
    merge(&mut seeded, &mut eu);
    merge(&mut rebuilt, &mut eu);
    assert_eq!(seeded.state().grafts, rebuilt.state().grafts);
    assert_eq!(seeded.state().grafts.len(), 23);
}

/// A projection as stored (inflated), to alter it.
fn stored_json(p: &Projection) -> serde_json::Value {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::DeflateDecoder::new(&p.encode()[..])
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_projection_of_other_heads_or_bytes_is_not_used() {
    let run = Uuid::new_v4();
    let mut doc = RunDoc::new(run, "r1");
    doc.apply(&graft("A", "s", "u"), T0).unwrap();
    let old = doc.projection();
    doc.apply(&graft("B", "s", "u"), T0).unwrap();
    let mut loaded = RunDoc::load(run, "r1", &doc.save()).unwrap();
    assert!(!loaded.seed_index(&old), "a projection of older heads");
    assert_eq!(loaded.state().grafts.len(), 2, "the index is built instead");

    assert!(Projection::decode(b"not deflate").is_err());
    assert!(Projection::decode(&projection::deflate(b"{\"version\": 1}")).is_err());
    let mut other = stored_json(&doc.projection());
    other["version"] = json!(99);
    let bytes = projection::deflate(other.to_string().as_bytes());
    let err = Projection::decode(&bytes).unwrap_err().to_string();
    assert!(err.contains("version 99"), "{err}");
}

#[test]
fn a_projection_whose_list_does_not_match_is_not_used() {
    let run = Uuid::new_v4();
    let mut doc = RunDoc::new(run, "r1");
    for i in 0..3 {
        doc.apply(&graft(&format!("A{i}"), "s", "u"), T0).unwrap();
    }
    let mut json = stored_json(&doc.projection());
    json["list"].as_array_mut().unwrap().pop();
    let short = Projection::decode(&projection::deflate(json.to_string().as_bytes())).unwrap();
    let mut loaded = RunDoc::load(run, "r1", &doc.save()).unwrap();
    assert!(!loaded.seed_index(&short));
    assert_eq!(loaded.state().grafts.len(), 3);
}

/// A client's own edit of the run: `edit` on a raw copy of `doc`, sent as one sync message
/// written by `author`. Returns the step's error, if refused.
fn client_edit(
    doc: &mut RunDoc,
    author: Option<&str>,
    edit: impl FnOnce(&mut AutoCommit),
) -> Option<DocError> {
    let mut raw = AutoCommit::load(&doc.save()).unwrap();
    let base = raw.get_heads();
    edit(&mut raw);
    raw.commit();
    let changes: Vec<Vec<u8>> = raw
        .get_changes(&base)
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    assert!(!changes.is_empty(), "the edit made a change");
    let message = sync::Message {
        heads: raw.get_heads(),
        need: vec![],
        have: vec![],
        changes: changes.into(),
        flags: None,
        version: sync::MessageVersion::V1,
    };
    doc.sync_step_by(
        &mut sync::State::new(),
        Some(message),
        Budget::default(),
        author,
    )
    .applied
    .error
}

/// A graft map as a JS client writes it (strings as text, the lamport as an int).
fn push_graft(raw: &mut AutoCommit, id: &str, user: &str) {
    let list = raw.get(automerge::ROOT, GRAFTS).unwrap().unwrap().1;
    let len = raw.length(&list);
    let g = raw.insert_object(&list, len, ObjType::Map).unwrap();
    for (key, value) in [
        ("id", id),
        ("agent", "Agent"),
        ("afterStep", "S1"),
        ("user", user),
        ("region", "browser"),
        ("createdAt", "2026-12-06T00:00:00.000Z"),
    ] {
        let text = raw.put_object(&g, key, ObjType::Text).unwrap();
        raw.splice_text(&text, 0, 0, value).unwrap();
    }
    raw.put(&g, "lamport", 7).unwrap();
}

fn put_prune(raw: &mut AutoCommit, step: &str, user: &str) {
    let pruned = raw.get(automerge::ROOT, PRUNED_STEPS).unwrap().unwrap().1;
    let entry = raw.put_object(&pruned, step, ObjType::Map).unwrap();
    raw.put(&entry, "user", user).unwrap();
    raw.put(&entry, "region", "browser").unwrap();
    raw.put(&entry, "lamport", 3).unwrap();
}

#[test]
fn a_users_changes_may_graft_and_prune_only_under_their_own_name() {
    let run = Uuid::new_v4();
    let mut doc = RunDoc::new(run, "r1");
    doc.apply(&graft("Theirs", "S1", "bob"), T0).unwrap();
    doc.apply(
        &Mutation::Prune {
            step_id: "S9".into(),
            user: "bob".into(),
        },
        T0,
    )
    .unwrap();
    let ana = Some("ana");

    let own = client_edit(&mut doc, ana, |raw| push_graft(raw, "g-ana", "ana"));
    assert!(own.is_none(), "{own:?}");
    let own = client_edit(&mut doc, ana, |raw| put_prune(raw, "S2", "ana"));
    assert!(own.is_none(), "{own:?}");
    // An unprune and a flag carry no author.
    let unprune = client_edit(&mut doc, ana, |raw| {
        let pruned = raw.get(automerge::ROOT, PRUNED_STEPS).unwrap().unwrap().1;
        raw.delete(&pruned, "S9").unwrap();
    });
    assert!(unprune.is_none(), "{unprune:?}");
    let flag = client_edit(&mut doc, ana, |raw| {
        let flags = raw.get(automerge::ROOT, FLAGS).unwrap().unwrap().1;
        raw.put(&flags, "k", "v").unwrap();
    });
    assert!(flag.is_none(), "{flag:?}");
    let accepted = doc.state();
    assert_eq!(accepted.grafts.len(), 2);
    assert_eq!(accepted.grafts[1].user, "ana");
    assert_eq!(accepted.pruned_steps.len(), 1);

    type Edit = Box<dyn FnOnce(&mut AutoCommit)>;
    let refused: Vec<(&str, Edit)> = vec![
        (
            "another's name",
            Box::new(|raw| push_graft(raw, "g-m", "mallory")),
        ),
        (
            "an existing graft's user",
            Box::new(|raw| {
                let list = raw.get(automerge::ROOT, GRAFTS).unwrap().unwrap().1;
                let first = raw.get(&list, 0).unwrap().unwrap().1;
                raw.put(&first, "user", "mallory").unwrap();
            }),
        ),
        (
            "an existing graft's lamport",
            Box::new(|raw| {
                let list = raw.get(automerge::ROOT, GRAFTS).unwrap().unwrap().1;
                let first = raw.get(&list, 1).unwrap().unwrap().1;
                raw.put(&first, "lamport", 0).unwrap();
            }),
        ),
        (
            "a removed graft",
            Box::new(|raw| {
                let list = raw.get(automerge::ROOT, GRAFTS).unwrap().unwrap().1;
                raw.delete(&list, 0).unwrap();
            }),
        ),
        (
            "a prune under another name",
            Box::new(|raw| put_prune(raw, "S3", "bob")),
        ),
        (
            "an existing prune's region",
            Box::new(|raw| {
                let pruned = raw.get(automerge::ROOT, PRUNED_STEPS).unwrap().unwrap().1;
                let entry = raw.get(&pruned, "S2").unwrap().unwrap().1;
                raw.put(&entry, "region", "elsewhere").unwrap();
            }),
        ),
        (
            "own graft plus another's, in one message",
            Box::new(|raw| {
                push_graft(raw, "g-ok", "ana");
                raw.commit();
                push_graft(raw, "g-bad", "bob");
            }),
        ),
    ];
    for (what, edit) in refused {
        let heads = doc.heads();
        let lamport = doc.lamport();
        let err = client_edit(&mut doc, ana, edit);
        assert!(
            matches!(err, Some(DocError::NotPermitted(_))),
            "{what}: {err:?}"
        );
        assert_eq!(doc.heads(), heads, "{what}: nothing of it stays");
        assert_eq!(doc.lamport(), lamport);
        assert_eq!(doc.state(), accepted, "{what}: the state is unchanged");
    }
    // Local writes go on from where the document was.
    doc.apply(&graft("After", "S1", "ana"), T0).unwrap();
    assert_eq!(doc.state().grafts.len(), 3);
    // A service (no author) may name users.
    let service = client_edit(&mut doc, None, |raw| push_graft(raw, "g-svc", "carol"));
    assert!(service.is_none(), "{service:?}");
    assert_eq!(doc.state().grafts.len(), 4);
}

/// A client that writes before it has heard from the node sends heads only; once asked, it
/// answers with its changes and then a message without any. Taken in one step, the node must
/// still answer with its new heads, or the client never learns its changes were taken (one
/// by one, the first message's answer said so).
#[test]
fn a_step_whose_last_message_brings_nothing_still_acknowledges_the_earlier_ones() {
    let run = Uuid::new_v4();
    let mut node = RunDoc::new(run, "us-east-1");
    node.apply(&graft("Base", "Step1", "alice"), T0).unwrap();
    let mut client = RunDoc::load(run, "eu-central-1", &node.save()).unwrap();
    let (mut cs, mut ns) = (sync::State::new(), sync::State::new());
    let mut heads_only = Vec::new();
    for i in 0..5 {
        client
            .apply(&graft(&format!("B{i}"), "Step1", "bob"), T0)
            .unwrap();
        heads_only.extend(client.sync_step(&mut cs, None, Budget::default()).reply);
    }
    assert!(heads_only.iter().all(|m| m.changes.is_empty()));
    let asks = node.sync_step(&mut ns, heads_only, Budget::default()).reply;
    let asks = asks.expect("the node asks for what it lacks");
    // Two answers in a row: the changes, then (the client's state moved on) heads alone.
    let mut answers = Vec::new();
    answers.extend(
        client
            .sync_step(&mut cs, Some(asks.clone()), Budget::default())
            .reply,
    );
    answers.extend(
        client
            .sync_step(&mut cs, Some(asks), Budget::default())
            .reply,
    );
    assert_eq!(answers.len(), 2);
    assert!(!answers[0].changes.is_empty() && answers[1].changes.is_empty());
    let step = node.sync_step(&mut ns, answers, Budget::default());
    assert_eq!(step.applied.applied.len(), 5);
    let ack = step.reply.expect("the node answers with its new heads");
    client.sync_step(&mut cs, Some(ack), Budget::default());
    assert_eq!(
        cs.their_heads,
        Some(client.heads()),
        "the client knows its changes were taken"
    );
    assert_eq!(node.heads(), client.heads());
}

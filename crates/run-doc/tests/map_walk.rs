//! The vendored Automerge's map walk (vendor/README.md) against upstream's, on the same changes:
//! applying a batch steps over a key's overwritten values instead of decoding each, and must
//! leave the same document and report the same patches as the walk that visits every op.
//!
//! Several writers put, delete, increment and nest values under a few shared keys and merge
//! each other's changes now and then (so predecessors are often values another writer already
//! overwrote); an observer then takes all their changes in batches of random size, once with
//! the stepping on and once with it off. The switch is process-wide, hence one test per file.

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, Change, ObjType, ScalarValue, ROOT};
use proptest::prelude::*;

const WRITERS: usize = 3;

#[derive(Debug, Clone)]
enum Step {
    /// Writer `w` puts `value` under each of `keys` in one change.
    Put {
        w: usize,
        keys: Vec<u8>,
        value: i64,
    },
    Delete {
        w: usize,
        key: u8,
    },
    Increment {
        w: usize,
    },
    /// A nested map under a key, with one value in it.
    Nest {
        w: usize,
        key: u8,
    },
    /// Writer `to` takes everything writer `from` has.
    Merge {
        from: usize,
        to: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let w = 0..WRITERS;
    prop_oneof![
        6 => (w.clone(), prop::collection::vec(0u8..4, 1..3), any::<i64>())
            .prop_map(|(w, keys, value)| Step::Put { w, keys, value }),
        1 => (w.clone(), 0u8..4).prop_map(|(w, key)| Step::Delete { w, key }),
        1 => w.clone().prop_map(|w| Step::Increment { w }),
        1 => (w.clone(), 0u8..4).prop_map(|(w, key)| Step::Nest { w, key }),
        2 => (w.clone(), w).prop_map(|(from, to)| Step::Merge { from, to }),
    ]
}

/// The writers' changes, in an order an observer can apply them.
fn written(steps: &[Step]) -> (Vec<u8>, Vec<Change>) {
    let mut base = AutoCommit::new().with_actor(ActorId::from(vec![9; 16]));
    let flags = base
        .put_object(ROOT, "flags", ObjType::Map)
        .expect("a map at the root");
    base.put(&flags, "c", ScalarValue::counter(0))
        .expect("a counter");
    base.commit();
    let genesis = base.save();
    let mut writers: Vec<AutoCommit> = (0..WRITERS)
        .map(|i| {
            AutoCommit::load(&genesis)
                .expect("the genesis loads")
                .with_actor(ActorId::from(vec![i as u8 + 1; 16]))
        })
        .collect();
    for step in steps {
        match step {
            Step::Put { w, keys, value } => {
                for key in keys {
                    let _ = writers[*w].put(&flags, format!("k{key}"), *value);
                }
            }
            Step::Delete { w, key } => {
                let _ = writers[*w].delete(&flags, format!("k{key}"));
            }
            Step::Increment { w } => {
                let _ = writers[*w].increment(&flags, "c", 1);
            }
            Step::Nest { w, key } => {
                if let Ok(inner) = writers[*w].put_object(&flags, format!("k{key}"), ObjType::Map) {
                    let _ = writers[*w].put(&inner, "x", 1);
                }
            }
            Step::Merge { from, to } if from != to => {
                let mut source = writers[*from].clone();
                writers[*to].merge(&mut source).expect("a merge");
            }
            Step::Merge { .. } => {}
        }
        writers[step_writer(step)].commit();
    }
    let mut all = AutoCommit::load(&genesis).expect("the genesis loads");
    for w in &mut writers {
        all.merge(w).expect("a merge");
    }
    let changes = all.get_changes(&[]).into_iter().skip(1).collect();
    (genesis, changes)
}

fn step_writer(step: &Step) -> usize {
    match step {
        Step::Put { w, .. }
        | Step::Delete { w, .. }
        | Step::Increment { w }
        | Step::Nest { w, .. } => *w,
        Step::Merge { to, .. } => *to,
    }
}

/// An observer holding the genesis, reporting patches from here on.
fn observer(genesis: &[u8]) -> AutoCommit {
    let mut doc = AutoCommit::load(genesis).expect("the genesis loads");
    doc.update_diff_cursor();
    doc
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn stepping_over_hidden_ops_changes_nothing(
        steps in prop::collection::vec(step(), 1..160),
        sizes in prop::collection::vec(1usize..8, 1..64),
    ) {
        let (genesis, changes) = written(&steps);
        let mut stepping = observer(&genesis);
        let mut visiting = observer(&genesis);
        let mut rest = changes.as_slice();
        let mut sizes = sizes.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap_or(&1)).min(rest.len());
            let (batch, after) = rest.split_at(n);
            rest = after;
            automerge::set_map_walk_steps_over_hidden(true);
            stepping.apply_changes(batch.to_vec()).expect("changes apply");
            let stepped = stepping.diff_incremental();
            automerge::set_map_walk_steps_over_hidden(false);
            visiting.apply_changes(batch.to_vec()).expect("changes apply");
            let visited = visiting.diff_incremental();
            automerge::set_map_walk_steps_over_hidden(true);
            prop_assert_eq!(format!("{stepped:?}"), format!("{visited:?}"));
        }
        prop_assert_eq!(stepping.save(), visiting.save());
        prop_assert_eq!(stepping.get_heads().len(), visiting.get_heads().len());
    }
}

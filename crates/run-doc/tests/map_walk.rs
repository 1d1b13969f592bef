//! The vendored Automerge's map walk (vendor/README.md) against upstream's, on the same changes:
//! applying a batch steps over a key's overwritten values instead of decoding each, and must
//! leave the same document and report the same patches as the walk that visits every op.
//!
//! Several writers put, delete, increment and nest values under a few shared keys and merge
//! each other's changes now and then (so predecessors are often values another writer already
//! overwrote); an observer then takes all their changes in batches of random size, once with
//! the stepping on and once with it off. The switch is process-wide, hence one test per file.

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, Change, ObjType, ReadDoc, ScalarValue, ROOT};
use proptest::prelude::*;

const WRITERS: usize = 3;

/// The shared keys: byte order is not numeric order ("k10" < "k9"), one is empty, one is not
/// ASCII, one holds a counter from the start.
const KEYS: [&str; 5] = ["", "k10", "k9", "ü", "c"];

/// The switch is process-wide: the tests of this file take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    /// A counter under a key (replacing what was there; replaced in turn later, perhaps).
    Counter {
        w: usize,
        key: u8,
    },
    Increment {
        w: usize,
        key: u8,
    },
    /// A nested map under a key, with one value in it.
    Nest {
        w: usize,
        key: u8,
    },
    /// A value in the nested map every writer shares (overwritten by all of them).
    Inner {
        w: usize,
        key: u8,
        value: i64,
    },
    /// Writer `to` takes everything writer `from` has.
    Merge {
        from: usize,
        to: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let w = 0..WRITERS;
    let key = 0u8..KEYS.len() as u8;
    prop_oneof![
        6 => (w.clone(), prop::collection::vec(key.clone(), 1..3), any::<i64>())
            .prop_map(|(w, keys, value)| Step::Put { w, keys, value }),
        1 => (w.clone(), key.clone()).prop_map(|(w, key)| Step::Delete { w, key }),
        1 => (w.clone(), key.clone()).prop_map(|(w, key)| Step::Counter { w, key }),
        2 => (w.clone(), key.clone()).prop_map(|(w, key)| Step::Increment { w, key }),
        1 => (w.clone(), key.clone()).prop_map(|(w, key)| Step::Nest { w, key }),
        2 => (w.clone(), key, any::<i64>())
            .prop_map(|(w, key, value)| Step::Inner { w, key, value }),
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
    base.put_object(&flags, "inner", ObjType::Map)
        .expect("a nested map");
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
        let key = |k: &u8| KEYS[usize::from(*k)];
        match step {
            Step::Put { w, keys, value } => {
                for k in keys {
                    let _ = writers[*w].put(&flags, key(k), *value);
                }
            }
            Step::Delete { w, key: k } => {
                let _ = writers[*w].delete(&flags, key(k));
            }
            Step::Counter { w, key: k } => {
                let _ = writers[*w].put(&flags, key(k), ScalarValue::counter(5));
            }
            Step::Increment { w, key: k } => {
                let _ = writers[*w].increment(&flags, key(k), 1);
            }
            Step::Nest { w, key: k } => {
                if let Ok(inner) = writers[*w].put_object(&flags, key(k), ObjType::Map) {
                    let _ = writers[*w].put(&inner, "x", 1);
                }
            }
            Step::Inner { w, key: k, value } => {
                if let Ok(Some((_, inner))) = writers[*w].get(&flags, "inner") {
                    let _ = writers[*w].put(&inner, key(k), *value);
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
        | Step::Counter { w, .. }
        | Step::Increment { w, .. }
        | Step::Nest { w, .. }
        | Step::Inner { w, .. } => *w,
        Step::Merge { to, .. } => *to,
    }
}

/// What a reader sees of the shared maps: every value of every key, conflicts included.
fn reads(doc: &AutoCommit) -> String {
    let mut out = String::new();
    let Some((_, flags)) = doc.get(ROOT, "flags").ok().flatten() else {
        return out;
    };
    let inner = doc.get(&flags, "inner").ok().flatten().map(|(_, id)| id);
    for obj in [Some(flags), inner].into_iter().flatten() {
        for key in KEYS.iter().chain(["inner"].iter()) {
            out.push_str(&format!("{key}={:?};", doc.get_all(&obj, *key)));
        }
        out.push_str(&format!("{:?}|", doc.keys(&obj).collect::<Vec<_>>()));
    }
    out
}

/// Applies `changes` in batches of `sizes` to two observers, one stepping over hidden ops and
/// one visiting every op: after every batch, the same patches and reads, and in the end the
/// same saved bytes. A batch of size 7 first reloads both observers from their saved bytes
/// (the op set's index then built by loading, not by applying).
fn compare(genesis: &[u8], changes: &[Change], sizes: &[usize]) -> Result<(), TestCaseError> {
    let mut stepping = observer(genesis);
    let mut visiting = observer(genesis);
    let mut rest = changes;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let size = *sizes.next().unwrap_or(&1);
        if size == 7 {
            stepping = observer(&stepping.save());
            visiting = observer(&visiting.save());
        }
        let (batch, after) = rest.split_at(size.min(rest.len()));
        rest = after;
        automerge::set_map_walk_steps_over_hidden(true);
        stepping
            .apply_changes(batch.to_vec())
            .expect("changes apply");
        let stepped = stepping.diff_incremental();
        automerge::set_map_walk_steps_over_hidden(false);
        visiting
            .apply_changes(batch.to_vec())
            .expect("changes apply");
        let visited = visiting.diff_incremental();
        automerge::set_map_walk_steps_over_hidden(true);
        prop_assert_eq!(format!("{stepped:?}"), format!("{visited:?}"));
        prop_assert_eq!(reads(&stepping), reads(&visiting));
    }
    prop_assert_eq!(stepping.save(), visiting.save());
    Ok(())
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
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let (genesis, changes) = written(&steps);
        compare(&genesis, &changes, &sizes)?;
    }
}

/// A long history: one key overwritten thousands of times by one writer while the others
/// overwrite it and increment a counter from older views, so the hidden runs are long, cross
/// the op set's slabs, and some predecessors sought lie deep inside them.
#[test]
fn long_hidden_runs_change_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut steps = Vec::new();
    for round in 0..12 {
        for i in 0..250 {
            steps.push(Step::Put {
                w: 0,
                keys: vec![1],
                value: round * 1000 + i,
            });
        }
        steps.push(Step::Put {
            w: 1,
            keys: vec![1, 2],
            value: -round,
        });
        steps.push(Step::Increment { w: 2, key: 4 });
        if round % 3 == 2 {
            steps.push(Step::Merge { from: 0, to: 1 });
            steps.push(Step::Merge { from: 1, to: 2 });
            steps.push(Step::Merge { from: 2, to: 0 });
        }
    }
    let (genesis, changes) = written(&steps);
    let sizes = [1, 3, 1, 7, 2, 5, 1, 1, 4];
    compare(&genesis, &changes, &sizes).expect("the same document either way");
}

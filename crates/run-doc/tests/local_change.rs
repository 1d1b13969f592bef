//! The vendored Automerge's kept last local change (vendor/README.md, the fourth fix) against
//! the change rebuilt from the op set, as upstream answers: after every commit of a document
//! that puts, inserts, deletes, increments, nests and edits text, and merges another writer's
//! changes now and then, the change asked for by hash, as the last local one, and inside a sync
//! message must be the same bytes both ways. The switch is process-wide, hence one test per
//! file.

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{AutoCommit, ObjType, ReadDoc, ScalarValue, ROOT};
use proptest::prelude::*;

/// What a commit does: (kind, a number it uses).
fn edits() -> impl Strategy<Value = Vec<(u8, i64)>> {
    proptest::collection::vec((0u8..7, 0i64..1_000), 1..60)
}

fn edit(doc: &mut AutoCommit, kind: u8, n: i64) {
    let list = match doc.get(ROOT, "list").expect("a read") {
        Some((_, id)) => id,
        None => doc.put_object(ROOT, "list", ObjType::List).expect("a list"),
    };
    let len = doc.length(&list);
    match kind {
        0 => doc.put(ROOT, format!("k{}", n % 7), n).map(|_| ()),
        1 => doc.insert(&list, (n as usize) % (len + 1), n).map(|_| ()),
        2 if len > 0 => doc.delete(&list, (n as usize) % len),
        3 => match doc.get(ROOT, "count").expect("a read") {
            Some(_) => doc.increment(ROOT, "count", n),
            None => doc.put(ROOT, "count", ScalarValue::counter(n)).map(|_| ()),
        },
        4 => doc
            .put_object(ROOT, format!("m{}", n % 3), ObjType::Map)
            .and_then(|m| doc.put(&m, "v", n)),
        5 => {
            let text = doc.put_object(ROOT, "text", ObjType::Text).expect("a text");
            doc.splice_text(&text, 0, 0, &format!("t{n}"))
        }
        _ => doc.put(ROOT, "same", n).map(|_| ()),
    }
    .expect("an edit");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_kept_local_change_is_the_rebuilt_one(edits in edits(), merge_every in 2usize..9) {
        let mut doc = AutoCommit::new();
        let mut other = AutoCommit::new();
        let mut state = sync::State::new();
        let (mut peer, mut peer_state) = (AutoCommit::new(), sync::State::new());
        let mut others = None;
        for (i, (kind, n)) in edits.into_iter().enumerate() {
            if i % merge_every == 0 {
                // Another writer's change on top: the last local change is no longer a head.
                other.merge(&mut doc.clone()).expect("a merge");
                other.put(ROOT, "other", n).expect("a put");
                others = other.commit();
                doc.merge(&mut other).expect("a merge");
            }
            edit(&mut doc, kind, n);
            doc.commit_with(CommitOptions::default().with_message(format!("c{i}")));
            let hash = doc.get_last_local_change().expect("a local change").hash();
            let mut asked = Vec::new();
            for on in [true, false] {
                automerge::set_local_change_cache(on);
                let last = doc.get_last_local_change().expect("a local change");
                let by_hash = doc.get_change_by_hash(&hash).expect("the change");
                // Any other change asked for by its hash is not the kept one.
                let not_local = others
                    .and_then(|h| doc.get_change_by_hash(&h))
                    .map(|c| c.raw_bytes().to_vec());
                let message = doc
                    .sync()
                    .generate_sync_message(&mut state.clone())
                    .map(|m| m.encode());
                asked.push((
                    last.raw_bytes().to_vec(),
                    by_hash.raw_bytes().to_vec(),
                    message,
                    not_local,
                ));
            }
            automerge::set_local_change_cache(true);
            prop_assert_eq!(&asked[0], &asked[1]);
            prop_assert_eq!(&asked[0].0, &asked[0].1);
            // The message goes to a peer that answers, so the next one carries the next change.
            loop {
                let Some(m) = doc.sync().generate_sync_message(&mut state) else {
                    break;
                };
                peer.sync().receive_sync_message(&mut peer_state, m).expect("taken");
                let Some(reply) = peer.sync().generate_sync_message(&mut peer_state) else {
                    break;
                };
                doc.sync().receive_sync_message(&mut state, reply).expect("taken");
            }
        }
        prop_assert_eq!(peer.get_heads(), doc.get_heads());
    }
}

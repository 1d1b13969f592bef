//! Automerge's sync with messages in flight, against the vendored fix (vendor/README.md): the
//! trimming of the hashes sent to a peer now stops early, and the peers must still converge
//! whichever way writes and messages interleave. (That every acknowledged hash is forgotten
//! once the peers settle is not a property of Automerge's sync, patched or not: a peer that
//! receives nothing after its last message keeps the hashes it sent.)

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use automerge::{ReadDoc, ROOT};
use proptest::prelude::*;

mod peers;
use peers::{deliver, Peer};

impl Peer {
    fn write(&mut self, key: u8, value: i64) {
        self.doc
            .put(ROOT, format!("k{key}"), value)
            .expect("put at the root");
        self.doc.commit();
    }

    fn send(&mut self) {
        if let Some(m) = self.doc.sync().generate_sync_message(&mut self.state) {
            self.outbox.push_back(m.encode());
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write { a: bool, key: u8, value: i64 },
    Send { a: bool },
    Deliver { to_a: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<bool>(), 0u8..4, any::<i64>()).prop_map(|(a, key, value)| Step::Write {
            a,
            key,
            value
        }),
        any::<bool>().prop_map(|a| Step::Send { a }),
        any::<bool>().prop_map(|to_a| Step::Deliver { to_a }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Writes and messages interleaved at random (messages cross, several wait in flight):
    /// once both sides go on syncing until neither has anything to say, both hold the same
    /// changes and the same values.
    #[test]
    fn converges_with_messages_in_flight(steps in proptest::collection::vec(step(), 1..120)) {
        let (mut a, mut b) = (Peer::new(1), Peer::new(2));
        for s in steps {
            match s {
                Step::Write { a: true, key, value } => a.write(key, value),
                Step::Write { a: false, key, value } => b.write(key, value),
                Step::Send { a: true } => a.send(),
                Step::Send { a: false } => b.send(),
                Step::Deliver { to_a } => {
                    deliver(&mut a, &mut b, to_a, false);
                }
            }
        }
        // Quiesce: deliver everything in flight, then ask both sides whether they have more to
        // say, until neither has.
        let mut settled = false;
        for _ in 0..64 {
            while deliver(&mut a, &mut b, true, false) | deliver(&mut a, &mut b, false, false) {}
            a.send();
            b.send();
            if a.outbox.is_empty() && b.outbox.is_empty() {
                settled = true;
                break;
            }
        }
        prop_assert!(settled, "sync did not settle in 64 rounds");
        prop_assert_eq!(a.doc.get_heads(), b.doc.get_heads());
        for key in 0..4u8 {
            let k = format!("k{key}");
            let va = a.doc.get(ROOT, &k).expect("read").map(|(v, _)| v.to_string());
            let vb = b.doc.get(ROOT, &k).expect("read").map(|(v, _)| v.to_string());
            prop_assert_eq!(va, vb);
        }
    }
}

//! The vendored Automerge's choice of the changes a sync message carries (vendor/README.md)
//! against upstream's, on the same documents and sync states: one pass in change order must
//! pick exactly what upstream's sets and map of dependents pick, in the same order.
//!
//! Two peers write bursts, sync with messages crossing, waiting and lost (so a peer's Bloom
//! filter covers long stretches, and now and then claims a change it lacks); before every
//! message either sends, the message is made both ways from copies of the same state. The
//! switch is process-wide, hence one test per file.

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use proptest::prelude::*;

mod peers;
use peers::{deliver, Peer};

impl Peer {
    /// `n` changes, each a put under one of a few keys.
    fn write(&mut self, n: u8, seed: i64) {
        for i in 0..n {
            let key = format!("k{}", (seed + i64::from(i)).rem_euclid(5));
            self.doc.put(ROOT, key, seed + i64::from(i)).expect("a put");
            self.doc.commit();
        }
    }

    /// The next message made both ways from the same state: they must be the same bytes.
    /// The one-pass message is sent.
    fn send(&mut self) -> Result<(), TestCaseError> {
        let mut upstream_state = self.state.clone();
        automerge::set_sync_hashes_in_one_pass(false);
        let upstream = self
            .doc
            .sync()
            .generate_sync_message(&mut upstream_state)
            .map(|m| m.encode());
        automerge::set_sync_hashes_in_one_pass(true);
        let ours = self
            .doc
            .sync()
            .generate_sync_message(&mut self.state)
            .map(|m| m.encode());
        prop_assert_eq!(&ours, &upstream);
        prop_assert_eq!(&self.state, &upstream_state);
        if let Some(bytes) = ours {
            self.outbox.push_back(bytes);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        a: bool,
        n: u8,
        seed: i64,
    },
    Send {
        a: bool,
    },
    Deliver {
        to_a: bool,
    },
    /// The oldest message towards a peer is lost.
    Lose {
        to_a: bool,
    },
    /// A peer's document is saved and loaded again (its change graph built by loading).
    Reload {
        a: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (any::<bool>(), 1u8..40, any::<i64>()).prop_map(|(a, n, seed)| Step::Write { a, n, seed }),
        3 => any::<bool>().prop_map(|a| Step::Send { a }),
        3 => any::<bool>().prop_map(|to_a| Step::Deliver { to_a }),
        1 => any::<bool>().prop_map(|to_a| Step::Lose { to_a }),
        1 => any::<bool>().prop_map(|a| Step::Reload { a }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn one_pass_picks_what_upstream_picks(steps in prop::collection::vec(step(), 1..100)) {
        let (mut a, mut b) = (Peer::new(1), Peer::new(2));
        for s in steps {
            match s {
                Step::Write { a: true, n, seed } => a.write(n, seed),
                Step::Write { a: false, n, seed } => b.write(n, seed),
                Step::Send { a: true } => a.send()?,
                Step::Send { a: false } => b.send()?,
                Step::Deliver { to_a } => {
                    deliver(&mut a, &mut b, to_a, false);
                }
                Step::Lose { to_a } => {
                    deliver(&mut a, &mut b, to_a, true);
                }
                Step::Reload { a: which } => {
                    let peer = if which { &mut a } else { &mut b };
                    let actor = peer.doc.get_actor().clone();
                    peer.doc = AutoCommit::load(&peer.doc.save())
                        .expect("our own save")
                        .with_actor(actor);
                }
            }
        }
        // As after a reconnect: what was in flight is gone, both start afresh and sync to the
        // end.
        for peer in [&mut a, &mut b] {
            peer.state = sync::State::new();
            peer.outbox.clear();
        }
        for _ in 0..64 {
            while deliver(&mut a, &mut b, true, false) | deliver(&mut a, &mut b, false, false) {}
            a.send()?;
            b.send()?;
            if a.outbox.is_empty() && b.outbox.is_empty() {
                break;
            }
        }
        prop_assert_eq!(a.doc.get_heads(), b.doc.get_heads());
    }
}

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc};

use super::*;

/// A sync message with no changes (what a peer sends to say what it has).
fn have_message() -> sync::Message {
    let mut doc = AutoCommit::new();
    let message = doc
        .sync()
        .generate_sync_message(&mut sync::State::new())
        .expect("a first message");
    message
}

fn reply(state: Box<sync::State>, applied: usize, incarnation: u64) -> SyncStepReply {
    SyncStepReply {
        state,
        outgoing: Some(have_message()),
        applied,
        lamport: 1,
        error: None,
        bad_input: None,
        incarnation,
        stored: true,
    }
}

/// Takes a step and answers it with `make`.
fn step_with(
    d: &mut SyncDriver,
    incoming: Option<sync::Message>,
    make: impl FnOnce(Box<sync::State>) -> Result<SyncStepReply, RunError>,
    holds: bool,
) -> Vec<Action> {
    let answered = incoming.is_some();
    let req = d.step(incoming).expect("no step out");
    assert!(d.stepping());
    let sent = (*req.state).clone();
    d.stepped(Some(&sent), make(req.state), answered, holds)
}

#[test]
fn one_step_at_a_time_and_its_reply_is_sent() {
    let mut d = SyncDriver::new(PeerKind::Node, None);
    let req = d.step(None).expect("a step");
    assert!(d.step(None).is_none(), "a second step waits for the first");
    assert!(d.resync().is_none());
    let actions = d.stepped(None, Ok(reply(req.state, 0, 1)), false, false);
    assert!(
        matches!(actions.as_slice(), [Action::Send(_)]),
        "{actions:?}"
    );
    assert!(!d.stepping());
}

#[test]
fn a_reloaded_run_resyncs_from_the_shared_heads() {
    let mut d = SyncDriver::new(PeerKind::Node, None);
    step_with(&mut d, None, |s| Ok(reply(s, 0, 1)), false);
    let actions = step_with(&mut d, Some(have_message()), |s| Ok(reply(s, 0, 2)), true);
    assert_eq!(
        actions,
        vec![Action::Resync],
        "nothing sent from a lost state"
    );
    let req = d.resync().expect("a fresh round");
    assert!(req.state.needs_reset, "the peer is asked to resend");
    assert!(req.incoming.is_empty());
}

#[test]
fn refusals_are_reported_and_retried_a_few_times() {
    let mut d = SyncDriver::new(PeerKind::Node, None);
    for round in 0..=MAX_ERROR_RESYNCS {
        let actions = step_with(
            &mut d,
            Some(have_message()),
            |s| {
                let mut r = reply(s, 0, 1);
                r.error = Some("bad change".into());
                r.bad_input = Some(BadInput::Malformed);
                Ok(r)
            },
            true,
        );
        let refused = Action::Refused {
            reason: "bad change".into(),
            bad_input: Some(BadInput::Malformed),
        };
        if round < MAX_ERROR_RESYNCS {
            assert_eq!(actions, vec![refused, Action::RetryLater]);
        } else {
            assert_eq!(actions, vec![refused], "retries end");
        }
        assert!(d.state().is_some_and(|s| s.needs_reset));
    }
    d.progressed();
    assert_eq!(
        d.peer_error(),
        Some(Action::Resync),
        "progress restores retries"
    );
}

#[test]
fn an_unreachable_run_keeps_a_state_that_asks_the_peer_to_resend() {
    let mut d = SyncDriver::new(PeerKind::Node, None);
    let actions = step_with(
        &mut d,
        Some(have_message()),
        |_| Err(RunError::Unavailable("database down".into())),
        true,
    );
    assert_eq!(
        actions,
        vec![
            Action::Unreachable("storage unavailable: database down".into()),
            Action::RetryLater
        ]
    );
    assert!(d.state().is_some_and(|s| s.needs_reset));
}

#[test]
fn rounds_that_move_nothing_are_reset_then_paused() {
    let mut d = SyncDriver::new(PeerKind::Node, None);
    let mut resets = 0;
    let mut paused = false;
    for _ in 0..(MAX_IDLE_ROUNDS as usize * (MAX_STALL_RESETS as usize + 1)) {
        let actions = step_with(&mut d, Some(have_message()), |s| Ok(reply(s, 0, 1)), true);
        match actions.as_slice() {
            [Action::Send(_)] => {}
            [Action::Resync] => resets += 1,
            [Action::Paused] => paused = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(resets, MAX_STALL_RESETS);
    assert!(paused, "after its resets the sync waits for the next link");
    // A step that applies something is progress: the count starts again.
    let actions = step_with(&mut d, Some(have_message()), |s| Ok(reply(s, 1, 1)), true);
    assert!(matches!(actions.as_slice(), [Action::Send(_)]));
}

#[test]
fn a_client_asking_for_an_unwritten_run_is_offered_its_genesis() {
    let mut d = SyncDriver::new(PeerKind::Client, None);
    let unwritten = |s| {
        let mut r = reply(s, 0, 1);
        r.stored = false;
        // What the run's actor replies: the genesis.
        let mut genesis = AutoCommit::new();
        genesis.put(automerge::ROOT, "grafts", "stand-in").unwrap();
        genesis.commit();
        let change = genesis.get_changes(&[])[0].raw_bytes().to_vec();
        if let Some(out) = r.outgoing.as_mut() {
            out.changes = vec![change].into();
        }
        Ok(r)
    };
    // A client that holds nothing of the run is offered what the run is: its genesis.
    let fresh = step_with(&mut d, Some(have_message()), unwritten, false);
    match fresh.as_slice() {
        [Action::Send(m)] => assert!(!m.changes.is_empty(), "the genesis is offered"),
        other => panic!("unexpected {other:?}"),
    }
    // A client that holds a document of its own under the id is asked for it, offered nothing.
    let holds = step_with(&mut d, Some(have_message()), unwritten, true);
    match holds.as_slice() {
        [Action::Send(m)] => assert!(m.changes.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn live_changes_ahead_of_their_dependencies_ask_for_a_round() {
    let mut d = SyncDriver::new(PeerKind::Node, None);
    let parked = SyncOutcome {
        applied: 0,
        duplicates: 0,
        parked: 2,
        lamport: 3,
        heads: Vec::new(),
    };
    assert_eq!(d.changes_applied(Ok(parked.clone())), vec![Action::Resync]);
    let none_parked = SyncOutcome {
        parked: 0,
        ..parked
    };
    assert!(d.changes_applied(Ok(none_parked)).is_empty());
    let refused = d.changes_applied(Err(RunError::Stopped));
    assert!(matches!(refused[0], Action::Refused { .. }));
}

#[test]
fn a_client_reset_starts_from_nothing() {
    let mut peer = AutoCommit::new();
    peer.put(automerge::ROOT, "k", 1).unwrap();
    let mut state = sync::State::new();
    let _ = peer.sync().generate_sync_message(&mut state);
    assert!(peer.get(automerge::ROOT, "k").unwrap().is_some());
    let mut d = SyncDriver::new(PeerKind::Client, Some(Box::new(state)));
    let req = d.resync().expect("a round");
    assert!(req.state.sent_hashes.is_empty() && !req.state.needs_reset);
}

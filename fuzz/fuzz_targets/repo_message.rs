//! An automerge-repo client's binary frame: decoded as the node's `RepoSession` does, its
//! document id mapped to a run, its sync message taken through a run's sync step, and what
//! that applied checked against the run schema.
#![no_main]

use automerge::sync;
use run_wire::automerge_repo::{doc_id, wire};
use run_doc::{Budget, RunDoc};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

static QUIET: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    // As in the other targets: only a panic escaping the node's own code is a crash.
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Ok(wire::FromClient::Sync {
        document_id, data, ..
    }) = wire::decode(data)
    else {
        return;
    };
    let _ = doc_id::decode(&document_id);
    // The session catches Automerge's panics on malformed sync messages the same way.
    let Ok(message) = run_doc::decode_sync_message(&data) else {
        return;
    };
    let mut doc = RunDoc::new(Uuid::from_u128(7), "fuzz");
    let mut state = sync::State::new();
    let step = doc.sync_step(&mut state, Some(message), Budget::default());
    let _ = doc.schema_violations(&step.applied.applied);
    let _ = doc.state();
});

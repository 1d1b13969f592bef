//! A stored snapshot (`crdt_snapshots.snapshot_data`): loaded as the loader does, then read.
#![no_main]

use run_doc::RunDoc;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

static QUIET: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    // libFuzzer's hook aborts at any panic, even one the node catches (Automerge's, in
    // `load_document`); with it silenced, only a panic escaping the node's code is a crash.
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(mut doc) = RunDoc::load(Uuid::from_u128(7), "fuzz", data) {
        let _ = doc.state();
        let _ = doc.save();
    }
});

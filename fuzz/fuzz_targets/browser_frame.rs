//! A browser session's text frame: decoded, validated and, for a mutation, applied to a run.
#![no_main]

use run_wire::browser::{decode, ClientFrame};
use run_doc::RunDoc;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

static QUIET: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    // libFuzzer's hook aborts at any panic, even one the node catches (Automerge's, in
    // `load_document`); with it silenced, only a panic escaping the node's code is a crash.
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ClientFrame::Mutate { op, .. }) = decode(text) {
        if let Ok(mutation) = op.into_mutation("fuzz") {
            let mut doc = RunDoc::new(Uuid::from_u128(7), "fuzz");
            let _ = doc.apply(&mutation, 0);
            let _ = doc.state();
        }
    }
});

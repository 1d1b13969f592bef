//! A mesh peer's text frame: decoded, and its payload decoded as the session does before
//! anything reaches a run.
#![no_main]

use automerge::sync;
use run_doc::{parse_changes, parse_document, validate_sync_message};
use run_wire::mesh::{unb64, Frame};
use libfuzzer_sys::fuzz_target;

static QUIET: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    // libFuzzer's hook aborts at any panic, even one the node catches (Automerge's, in
    // `load_document`); with it silenced, only a panic escaping the node's code is a crash.
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = Frame::decode(text) else {
        return;
    };
    match frame {
        Frame::CrdtSync {
            run_id, changes, ..
        } => {
            let _ = uuid::Uuid::parse_str(&run_id);
            if let Ok(bytes) = unb64("changes", &changes) {
                let _ = parse_changes(&bytes);
            }
        }
        Frame::CrdtFullSync { state, .. } => {
            if let Ok(bytes) = unb64("state", &state) {
                let _ = parse_document(&bytes);
            }
        }
        Frame::CrdtSyncMessage { message, .. } => {
            if let Ok(bytes) = unb64("message", &message) {
                if let Ok(m) = sync::Message::decode(&bytes) {
                    let _ = validate_sync_message(&m);
                }
            }
        }
        other => {
            let _ = other.encode();
        }
    }
});

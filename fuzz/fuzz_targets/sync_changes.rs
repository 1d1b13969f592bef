//! `POST /runs/{id}/sync` and mesh `CRDT_SYNC`: change bytes from outside, parsed and applied
//! as the node does (Automerge's own panics are caught by the run actor, as here).
#![no_main]

use run_doc::{parse_changes, RunDoc};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

static QUIET: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    // libFuzzer's hook aborts on any panic; the run actor catches Automerge's panics while
    // applying (`guarded`), so only a panic outside that reaches libFuzzer, as a crash.
    QUIET.call_once(|| {
        std::panic::set_hook(Box::new(|i| {
            if std::env::var_os("FUZZ_SHOW_PANICS").is_some() {
                eprintln!("{i}\n{}", std::backtrace::Backtrace::force_capture())
            }
        }))
    });
    let Ok(changes) = parse_changes(data) else {
        return;
    };
    let mut doc = RunDoc::new(Uuid::from_u128(7), "fuzz");
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.apply_remote(changes, Some(u64::MAX)).is_ok()
    }));
    // Reading the state is not guarded in the node: a panic here is a crash.
    if matches!(applied, Ok(true)) {
        let _ = doc.state();
    }
});

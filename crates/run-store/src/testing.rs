//! What the backends' unit tests share: events, and a watch on the statements a connection
//! keeps prepared (diesel's instrumentation reports each statement it caches).

use std::sync::{Arc, Mutex};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use uuid::Uuid;

use crate::NewEvent;

/// An event with every optional column filled, or none.
pub(crate) fn event(run: Uuid, seq: i64, filled: bool) -> NewEvent {
    let some = |v: &str| filled.then(|| v.to_string());
    NewEvent {
        run_id: run,
        run_seq: seq,
        event_type: "SET_FLAG".into(),
        payload: some("{}"),
        user_id: some("u"),
        created_at: chrono::Utc::now().naive_utc(),
        crdt_changes: vec![seq as u8],
        change_hash: vec![seq as u8; 32],
        source_region: "r".into(),
        lamport: seq,
        kind: some("flag"),
        content: some("{}"),
        fence: None,
    }
}

/// The SQL of every statement a connection has put in its cache, in order, and of every query
/// it has started (on PostgreSQL a round trip each, two for a statement not yet prepared).
#[derive(Clone, Default)]
pub(crate) struct Prepared {
    cached: Arc<Mutex<Vec<String>>>,
    started: Arc<Mutex<Vec<String>>>,
}

impl Prepared {
    /// The instrumentation that fills this, for `set_instrumentation`.
    pub fn watch(&self) -> Box<dyn Instrumentation> {
        let (cached, started) = (self.cached.clone(), self.started.clone());
        Box::new(move |e: InstrumentationEvent<'_>| match e {
            InstrumentationEvent::CacheQuery { sql, .. } => {
                cached.lock().expect("lock").push(sql.to_string());
            }
            InstrumentationEvent::StartQuery { query, .. } => {
                started.lock().expect("lock").push(query.to_string());
            }
            _ => {}
        })
    }

    pub fn statements(&self) -> Vec<String> {
        self.cached.lock().expect("lock").clone()
    }

    pub fn started(&self) -> Vec<String> {
        self.started.lock().expect("lock").clone()
    }

    /// Panics unless a cached statement contains each of `wanted`.
    pub fn assert_holds(&self, wanted: &[&str]) {
        let cached = self.statements();
        for w in wanted {
            assert!(
                cached.iter().any(|sql| sql.contains(w)),
                "{w} is not kept prepared: {cached:?}"
            );
        }
    }
}

/// Polls `check` every 20 ms until it holds, panicking after `secs` seconds with `what` and
/// what `check` found last.
pub(crate) async fn within<T: std::fmt::Debug>(
    secs: u64,
    what: &str,
    mut check: impl FnMut() -> Result<(), T>,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let found = match check() {
            Ok(()) => return,
            Err(found) => found,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "after {secs} s {what}: {found:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

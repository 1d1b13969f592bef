//! The operation mix both benchmarks use, so the in-process ceiling and the HTTP figures
//! measure the same work: half grafts, a quarter flag writes, a quarter prunes.

use run_doc::Mutation;
use serde_json::json;
use uuid::Uuid;

pub fn graft(i: usize) -> Mutation {
    Mutation::Graft {
        id: Uuid::new_v4(),
        retry_safe: false,
        agent: format!("Agent{}", i % 50),
        after_step: format!("Step{}", i % 20),
        user: format!("user{}", i % 10),
    }
}

pub fn mix(i: usize) -> Mutation {
    match i % 4 {
        0 | 1 => graft(i),
        2 => Mutation::SetFlag {
            key: format!("k{}", i % 16),
            value: json!(i),
        },
        _ => Mutation::Prune {
            step_id: format!("Step{}", i % 32),
            user: "u".into(),
        },
    }
}

//! In-process ceiling of the document model: operations per second for each mutation, for the
//! mix the HTTP benchmark sends, for applying remote changes, and for save/load.
//!
//! Run: `cargo bench --bench doc_model`. Prints one line per measurement.

use std::time::Instant;

use crdt_node::doc::{Mutation, RunDoc};
use serde_json::json;
use uuid::Uuid;

const N: usize = 20_000;

fn mutation(kind: &str, i: usize) -> Mutation {
    match kind {
        "graft" => Mutation::Graft {
            id: Uuid::new_v4(),
            retry_safe: false,
            agent: format!("Agent{}", i % 50),
            after_step: format!("Step{}", i % 20),
            user: format!("user{}", i % 10),
        },
        "prune" => Mutation::Prune {
            step_id: format!("Step{}", i % 200),
            user: "u".into(),
        },
        "unprune" => Mutation::Unprune {
            step_id: format!("Step{}", i % 200),
        },
        "set flag (scalar)" => Mutation::SetFlag {
            key: format!("k{}", i % 64),
            value: json!(i),
        },
        "set flag (object)" => Mutation::SetFlag {
            key: format!("k{}", i % 64),
            value: json!({"enabled": true, "threshold": 0.5, "tags": ["a", "b"]}),
        },
        "delete flag" => Mutation::DeleteFlag {
            key: format!("k{}", i % 64),
        },
        _ => mix(i),
    }
}

/// The HTTP benchmark's mix: half grafts, a quarter flags, a quarter prunes.
pub fn mix(i: usize) -> Mutation {
    match i % 4 {
        0 | 1 => mutation("graft", i),
        2 => mutation("set flag (scalar)", i),
        _ => mutation("prune", i),
    }
}

fn time<F: FnMut(usize)>(n: usize, mut f: F) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    println!("document model, one core, {N} operations each, one change per operation");
    for kind in [
        "graft",
        "prune",
        "unprune",
        "set flag (scalar)",
        "set flag (object)",
        "delete flag",
        "mix",
    ] {
        let mut doc = RunDoc::new(Uuid::new_v4(), "us-east-1");
        // Removals need something to remove.
        if kind == "unprune" || kind == "delete flag" {
            for i in 0..N {
                let setup = if kind == "unprune" {
                    mutation("prune", i)
                } else {
                    mutation("set flag (scalar)", i)
                };
                doc.apply(&setup, 0).unwrap();
            }
        }
        let ops = time(N, |i| {
            doc.apply(&mutation(kind, i), 0).unwrap();
        });
        println!("{kind:<20} {ops:>10.0} ops/s");
    }

    // Remote changes: apply another replica's changes one sync at a time.
    let run = Uuid::new_v4();
    let mut source = RunDoc::new(run, "eu-central-1");
    let mut changes = Vec::new();
    for i in 0..N {
        let out = source.apply(&mix(i), 0).unwrap();
        changes.extend(out.change);
    }
    let mut target = RunDoc::new(run, "us-east-1");
    let mut it = changes.clone().into_iter();
    let ops = time(N, |_| {
        let c = it.next().unwrap();
        target.apply_remote(vec![c], None).unwrap();
    });
    println!("{:<20} {ops:>10.0} changes/s", "apply remote");
    let mut again = RunDoc::new(run, "us-east-1");
    let start = Instant::now();
    again.apply_remote(changes, None).unwrap();
    println!(
        "{:<20} {:>10.0} changes/s",
        "apply remote batch",
        N as f64 / start.elapsed().as_secs_f64()
    );

    let start = Instant::now();
    let bytes = source.save();
    let save = start.elapsed();
    let start = Instant::now();
    let loaded = RunDoc::load(run, "us-east-1", &bytes).unwrap();
    let load = start.elapsed();
    assert_eq!(loaded.lamport(), source.lamport());
    println!(
        "save {N} changes: {:.1} ms, {} bytes ({:.1} B/change); load: {:.1} ms",
        save.as_secs_f64() * 1e3,
        bytes.len(),
        bytes.len() as f64 / N as f64,
        load.as_secs_f64() * 1e3
    );
}

//! In-process ceiling of the document model: operations per second for each mutation, measured
//! in runs of different sizes (Automerge's cost per change grows with the document), for the
//! mix the HTTP benchmark sends, for applying remote changes, and for save/load.
//!
//! Run: `cargo bench --bench doc_model`. Prints Markdown tables.

use test_support::bench::mix;

use std::time::Instant;

use mix::{graft, mix};
use run_doc::{Mutation, RunDoc};
use serde_json::json;
use uuid::Uuid;

const TIMED: usize = 1_000;
const SIZES: [usize; 3] = [0, 1_000, 10_000];
const T: i64 = 1_764_000_000_000;

/// (setup, timed) mutations for the i-th timed operation of a kind; setup is not timed.
fn op(kind: &str, i: usize) -> (Option<Mutation>, Mutation) {
    let step = format!("bench-step-{i}");
    let key = format!("bench-key-{i}");
    match kind {
        "graft" => (None, graft(i)),
        "prune" => (
            None,
            Mutation::Prune {
                step_id: step,
                user: "u".into(),
            },
        ),
        "unprune" => (
            Some(Mutation::Prune {
                step_id: step.clone(),
                user: "u".into(),
            }),
            Mutation::Unprune { step_id: step },
        ),
        "set flag (scalar)" => (
            None,
            Mutation::SetFlag {
                key,
                value: json!(i),
            },
        ),
        "set flag (object)" => (
            None,
            Mutation::SetFlag {
                key,
                value: json!({"enabled": true, "threshold": 0.5, "tags": ["a", "b"]}),
            },
        ),
        "delete flag" => (
            Some(Mutation::SetFlag {
                key: key.clone(),
                value: json!(i),
            }),
            Mutation::DeleteFlag { key },
        ),
        _ => (None, mix(i)),
    }
}

/// A run holding `size` changes of the mix, saved.
fn prefilled(size: usize) -> (Uuid, Vec<u8>) {
    let run = Uuid::new_v4();
    let mut doc = RunDoc::new(run, "us-east-1");
    for i in 0..size {
        doc.apply(&mix(i), T).unwrap();
    }
    (run, doc.save())
}

fn main() {
    println!("### Document model, in-process, one thread\n");
    println!("Each figure: {TIMED} operations, one Automerge change each, into a run already holding N changes.\n");
    println!("| operation | N = 0 | N = 1,000 | N = 10,000 |");
    println!("|---|---:|---:|---:|");
    let base_bytes: Vec<(Uuid, Vec<u8>)> = SIZES.iter().map(|&n| prefilled(n)).collect();
    for kind in [
        "graft",
        "prune",
        "unprune",
        "set flag (scalar)",
        "set flag (object)",
        "delete flag",
        "mix",
    ] {
        let mut row = format!("| {kind} |");
        for bytes in &base_bytes {
            let mut doc = load_copy(bytes);
            let mut elapsed = 0.0;
            for i in 0..TIMED {
                let (setup, timed) = op(kind, i);
                if let Some(setup) = setup {
                    doc.apply(&setup, T).unwrap();
                }
                let start = Instant::now();
                let out = doc.apply(&timed, T).unwrap();
                elapsed += start.elapsed().as_secs_f64();
                assert!(out.change.is_some(), "{kind} must produce a change");
            }
            row.push_str(&format!(" {:.0} ops/s |", TIMED as f64 / elapsed));
        }
        println!("{row}");
    }

    println!("\n| remote changes | N = 0 | N = 1,000 | N = 10,000 |");
    println!("|---|---:|---:|---:|");
    let mut one_by_one = "| apply, one sync per change |".to_string();
    let mut batched = format!("| apply, one sync of {TIMED} |");
    for bytes in &base_bytes {
        let mut source = load_copy(bytes);
        let heads = source.heads();
        for i in 0..TIMED {
            source.apply(&mix(i + 7), T).unwrap();
        }
        let changes = source.changes_since(&heads);
        let mut target = load_copy(bytes);
        let start = Instant::now();
        for c in changes.clone() {
            target.apply_remote(vec![c], None).unwrap();
        }
        one_by_one.push_str(&format!(
            " {:.0} changes/s |",
            TIMED as f64 / start.elapsed().as_secs_f64()
        ));
        let mut target = load_copy(bytes);
        let start = Instant::now();
        target.apply_remote(changes, None).unwrap();
        batched.push_str(&format!(
            " {:.0} changes/s |",
            TIMED as f64 / start.elapsed().as_secs_f64()
        ));
    }
    println!("{one_by_one}\n{batched}");

    println!("\n| save / load | bytes | B/change | copy for a snapshot | save | load |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, bytes) in base_bytes.iter().enumerate().skip(1) {
        let mut doc = load_copy(bytes);
        // The graft index read, as on a run that has answered a read.
        let _ = doc.state();
        let start = Instant::now();
        let copy = doc.copy_for_snapshot();
        let copied = start.elapsed();
        drop(copy);
        let start = Instant::now();
        let saved = doc.save();
        let save = start.elapsed();
        let start = Instant::now();
        load_copy(&(bytes.0, saved.clone()));
        let load = start.elapsed();
        println!(
            "| {} changes | {} | {:.1} | {:.2} ms | {:.1} ms | {:.1} ms |",
            SIZES[i],
            saved.len(),
            saved.len() as f64 / SIZES[i] as f64,
            copied.as_secs_f64() * 1e3,
            save.as_secs_f64() * 1e3,
            load.as_secs_f64() * 1e3
        );
    }
}

/// A fresh copy of a saved run (a new actor id, so copies never share sequence numbers).
fn load_copy((run, bytes): &(Uuid, Vec<u8>)) -> RunDoc {
    RunDoc::load(*run, "us-east-1", bytes).expect("a saved run loads")
}

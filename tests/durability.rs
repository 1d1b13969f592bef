//! Durability and recovery against real node processes: restarts, SIGKILL under concurrent
//! writes, snapshots plus tail, snapshot retention, torn snapshots.

mod common;

use std::collections::HashSet;

use common::{db, run_url, Backend, Client, Node, TestDb};
use serde_json::{json, Value};
use uuid::Uuid;

async fn state(c: &Client, node: &Node, run: Uuid) -> Value {
    let (s, body) = c.get(&run_url(node, run, "/state")).await;
    assert_eq!(s, 200, "{body}");
    body
}

async fn flag(c: &Client, node: &Node, run: Uuid, key: &str, value: Value) -> Value {
    let (s, body) = c
        .put(
            &run_url(node, run, &format!("/flags/{key}")),
            &json!({"value": value, "user": "u"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    body
}

async fn restart_serves_identical_state_and_continues_the_clock(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[]);
    c.post(
        &run_url(&node, run, "/grafts"),
        &json!({"agent": "A", "afterStep": "S1", "user": "u"}),
    )
    .await;
    c.post(
        &run_url(&node, run, "/pruned-steps"),
        &json!({"stepId": "S2", "user": "u"}),
    )
    .await;
    flag(&c, &node, run, "k", json!({"x": [1, 2, 3]})).await;
    let before = state(&c, &node, run).await;
    node.kill();

    let node = Node::spawn(&db, &[]);
    let after = state(&c, &node, run).await;
    assert_eq!(
        before, after,
        "identical state, heads and clock after a restart"
    );
    let (_, g) = c
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "B", "afterStep": "S1", "user": "u"}),
        )
        .await;
    assert_eq!(g["lamport"], 4, "the Lamport clock continues");
    // The new incarnation writes under a new actor id: its change is stored, not deduplicated away.
    assert_eq!(db::event_rows(&db, run).await, 4);
}

/// A run of 250 events with snapshots every 100: the newest snapshot covers 200 events and
/// loading reads it plus only the 50 events after it.
async fn snapshot_plus_tail(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "100")]);
    for i in 0..250 {
        flag(&c, &node, run, &format!("k{}", i % 40), json!(i)).await;
    }
    let before = state(&c, &node, run).await;
    let positions = common::eventually(10, || {
        let db = &db;
        async move {
            let p = db::snapshot_positions(db, run).await;
            (p.first() == Some(&200)).then_some(p)
        }
    })
    .await
    .expect("a snapshot at 200 events");
    assert_eq!(positions, vec![200, 100]);
    node.kill();

    // Delete the events the snapshot covers: if loading still gives the whole state, it read
    // the snapshot and the tail, not the whole log.
    let removed = db::execute(
        &db,
        &format!(
            "DELETE FROM collaboration_events WHERE run_id = {} AND run_seq <= 200",
            db::run_literal(&db, run)
        ),
    )
    .await;
    assert_eq!(removed, 200);
    assert_eq!(db::event_rows(&db, run).await, 50);
    let node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "100")]);
    let after = state(&c, &node, run).await;
    assert_eq!(before, after);
    assert_eq!(after["lamport"], 250);
    let next = flag(&c, &node, run, "after-restart", json!(true)).await;
    assert_eq!(next["lamport"], 251);
}

async fn snapshots_keep_the_newest(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let node = Node::spawn(
        &db,
        &[("CRDT_SNAPSHOT_EVERY", "5"), ("CRDT_SNAPSHOT_KEEP", "3")],
    );
    for i in 0..40 {
        flag(&c, &node, run, "k", json!(i)).await;
    }
    let positions = common::eventually(10, || {
        let db = &db;
        async move {
            let p = db::snapshot_positions(db, run).await;
            (p.first() == Some(&40)).then_some(p)
        }
    })
    .await
    .expect("a snapshot at 40 events");
    assert_eq!(positions.len(), 3, "{positions:?}");
    assert!(positions.windows(2).all(|w| w[0] > w[1]), "{positions:?}");
}

/// A torn or corrupt newest snapshot is skipped; the run is rebuilt from its log.
async fn corrupt_snapshot_falls_back_to_the_log(backend: Backend) {
    let db = TestDb::new(backend).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "10")]);
    for i in 0..15 {
        flag(&c, &node, run, &format!("k{i}"), json!(i)).await;
    }
    let before = state(&c, &node, run).await;
    common::eventually(10, || {
        let db = &db;
        async move { (!db::snapshot_positions(db, run).await.is_empty()).then_some(()) }
    })
    .await
    .expect("a snapshot");
    node.kill();
    let torn = match backend {
        Backend::Postgres => "substring(snapshot_data from 1 for 20)",
        Backend::Sqlite => "substr(snapshot_data, 1, 20)",
    };
    db::execute(
        &db,
        &format!("UPDATE crdt_snapshots SET snapshot_data = {torn}"),
    )
    .await;
    let node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "10")]);
    assert_eq!(state(&c, &node, run).await, before);
    assert!(
        node.log_text().contains("does not load"),
        "the fallback is logged"
    );
}

/// 32 clients write to 8 runs while the node is killed with SIGKILL: after a restart, every
/// acknowledged mutation is present.
async fn acknowledged_writes_survive_sigkill(backend: Backend) {
    let db = TestDb::new(backend).await;
    let runs: Vec<Uuid> = (0..8).map(|_| Uuid::new_v4()).collect();
    let mut node = Node::spawn(&db, &[("CRDT_SNAPSHOT_EVERY", "25")]);
    let base = node.base.clone();
    let mut tasks = Vec::new();
    for client in 0..32 {
        let base = base.clone();
        let run = runs[client % runs.len()];
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut acked = Vec::new();
            for i in 0.. {
                let agent = format!("c{client}-{i}");
                let url = format!("{base}/api/crdt/runs/{run}/grafts");
                let body = json!({"agent": agent, "afterStep": "S", "user": format!("c{client}")});
                match http.post(&url).json(&body).send().await {
                    Ok(r) if r.status().as_u16() == 201 => acked.push((run, agent)),
                    _ => break, // the node is gone
                }
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    node.kill();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(
        acked.len() > 100,
        "only {} writes were acknowledged before the kill",
        acked.len()
    );

    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let mut present = HashSet::new();
    for run in &runs {
        let st = state(&c, &node, *run).await;
        for g in st["grafts"].as_array().unwrap() {
            present.insert((*run, g["agent"].as_str().unwrap().to_string()));
        }
    }
    let lost: Vec<_> = acked.iter().filter(|a| !present.contains(a)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged grafts lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}

both_backends!(
    restart_serves_identical_state_and_continues_the_clock,
    snapshot_plus_tail,
    snapshots_keep_the_newest,
    corrupt_snapshot_falls_back_to_the_log,
    acknowledged_writes_survive_sigkill,
);

#[test]
fn bad_configuration_stops_start_up_naming_the_key() {
    for (var, value, key) in [
        ("PORT", "eighty", "port"),
        ("REGION", "us east 1", "crdt.region"),
        ("CRDT_MESH_PEERS", "http://x/ws", "crdt.mesh.peers"),
        ("CRDT_SNAPSHOT_EVERY", "0", "crdt.snapshot.every-events"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crdt-node"))
            .env(
                "CRDT_CONFIG",
                concat!(env!("CARGO_MANIFEST_DIR"), "/config/application.yml"),
            )
            .env(
                "DATABASE_URL",
                "sqlite:///nonexistent-dir-never-created/x.db",
            )
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{var}={value}: {err}");
    }
}

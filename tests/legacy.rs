//! Runs kept by the old operational-transform system: legacy rows in `collaboration_events`
//! replayed into the CRDT identically by independent nodes, hybrid logs, malformed rows.

use test_support as common;
use test_support::both_backends;

use serde_json::{json, Value};
use uuid::Uuid;

use common::mesh::{converged, TestMesh};
use common::{db, eventually, metric, run_url, Backend, Client, TestDb};

/// The legacy log of one run, as the old system wrote it (one malformed row among them).
fn legacy_rows(db: &TestDb, run: Uuid) -> String {
    let id = db::run_literal(db, run);
    let rows = [
        (
            "GRAFT",
            r#"{"agent":"SecurityAgent","afterStep":"Step1","user":"alice","region":"us-east-1"}"#,
        ),
        (
            "PRUNE",
            r#"{"stepId":"Step3","user":"bob","region":"eu-central-1"}"#,
        ),
        (
            "SET_FLAG",
            r#"{"key":"review","value":{"required":true},"user":"alice","region":"us-east-1"}"#,
        ),
        ("GRAFT", r#"{"afterStep":"Step2"}"#),
        (
            "GRAFT",
            r#"{"agent":"PerformanceAgent","afterStep":"Step1","user":"bob","region":"eu-central-1"}"#,
        ),
    ];
    let values: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, (kind, payload))| {
            format!("({id}, '{kind}', '{payload}', 'legacy-writer', '2025-06-01 10:00:0{i}')")
        })
        .collect();
    format!(
        "INSERT INTO collaboration_events (run_id, event_type, payload, user_id, created_at) VALUES {}",
        values.join(", ")
    )
}

/// PostgreSQL: the table as the old system created it, which this node's migration extends.
/// SQLite (a store this node creates): its schema, into which legacy rows are imported.
async fn old_system_table(db: &TestDb) {
    match db.backend {
        Backend::Postgres => {
            let sql = "CREATE TABLE collaboration_events (id BIGSERIAL PRIMARY KEY, \
                       run_id UUID NOT NULL, event_type VARCHAR(50) NOT NULL, payload TEXT, \
                       user_id VARCHAR(255), created_at TIMESTAMP NOT NULL DEFAULT now())";
            db::execute(db, sql).await;
        }
        Backend::Sqlite => drop(common::Node::spawn(db, &[])),
    }
}

async fn changes(c: &Client, url: &str) -> Value {
    let (s, body) = c.get(url).await;
    assert_eq!(s, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_replay_one_legacy_log_identically_and_merge_without_duplicates() {
    let mesh = TestMesh::start(Backend::Sqlite, &["us-east-1", "eu-central-1"], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    // Each region's database holds the same legacy log, written before the migration.
    for m in &mesh.members {
        db::execute(&m.db, &legacy_rows(&m.db, run)).await;
    }
    let (a, b) = (mesh.node(0), mesh.node(1));
    let (_, sa) = c.get(&run_url(a, run, "/state")).await;
    let (_, sb) = c.get(&run_url(b, run, "/state")).await;
    let agents = |s: &Value| common::agents(s);
    assert_eq!(agents(&sa), ["SecurityAgent", "PerformanceAgent"], "{sa}");
    assert_eq!(sa["prunedSteps"][0]["stepId"], "Step3");
    assert_eq!(sa["flags"], json!({"review": {"required": true}}));
    assert_eq!(sa["grafts"][1]["region"], "eu-central-1");
    // Replayed apart, byte for byte the same changes.
    assert_eq!(sa["heads"], sb["heads"]);
    let ca = changes(&c, &run_url(a, run, "/changes")).await;
    let cb = changes(&c, &run_url(b, run, "/changes")).await;
    assert_eq!(ca["changes"], cb["changes"]);
    // Sync one region's whole log into the other: every change is already there.
    let (s, out) = c
        .post(
            &run_url(b, run, "/sync"),
            &json!({"changes": ca["changes"], "sourceRegion": "us-east-1"}),
        )
        .await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["applied"], 0, "{out}");
    // New work on top (hybrid from now on) reaches the other region once, on the legacy state.
    let (s, _) = c
        .post(
            &run_url(a, run, "/grafts"),
            &json!({"agent": "CostAgent", "afterStep": "Step2", "user": "carol"}),
        )
        .await;
    assert_eq!(s, 201);
    let state = converged(&c, &mesh.nodes(), run, 20).await;
    assert_eq!(
        agents(&state),
        ["SecurityAgent", "PerformanceAgent", "CostAgent"],
        "{state}"
    );
    // The malformed row was skipped and counted, on each node.
    for node in mesh.nodes() {
        let text = c.text(&node.url("/actuator/prometheus")).await;
        // Once per load (a run only read may unload and load again).
        let skipped = metric(&text, "crdt_legacy_events_skipped_total").unwrap_or(0.0);
        assert!(skipped >= 1.0, "{skipped}");
        assert!(node.log_text().contains("legacy event #3 skipped"));
    }
}

/// A run whose log is legacy rows then CRDT events loads as both, in that order, after a
/// restart; and the runs list shows legacy runs.
async fn a_hybrid_log_replays_legacy_then_crdt(backend: Backend) {
    let db = TestDb::new(backend).await;
    let run = Uuid::new_v4();
    // The old system's table and log exist before this node first starts and migrates.
    old_system_table(&db).await;
    db::execute(&db, &legacy_rows(&db, run)).await;
    let c = Client::new();
    let node = common::Node::spawn(&db, &[]);
    let (s, _) = c
        .put(
            &run_url(&node, run, "/flags/review"),
            &json!({"value": "done", "user": "carol"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = c
        .post(
            &run_url(&node, run, "/pruned-steps"),
            &json!({"stepId": "Step4", "user": "carol"}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, before) = c.get(&run_url(&node, run, "/state")).await;
    drop(node);
    let node = common::Node::spawn(&db, &[]);
    let (_, after) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(after["heads"], before["heads"]);
    assert_eq!(after["flags"], json!({"review": "done"}));
    let pruned: Vec<&str> = after["prunedSteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["stepId"].as_str().unwrap())
        .collect();
    assert_eq!(pruned, ["Step3", "Step4"]);
    assert_eq!(
        common::agents(&after),
        ["SecurityAgent", "PerformanceAgent"]
    );
    let listed = eventually(5, || async {
        let (_, list) = c.get(&node.url("/api/crdt/runs")).await;
        list["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["runId"] == json!(run))
            .then_some(())
    })
    .await;
    assert!(listed.is_some());
}

both_backends!(a_hybrid_log_replays_legacy_then_crdt);

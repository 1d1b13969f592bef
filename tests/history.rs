//! Issue 22 (history): every region lists a run's changes alike — the same entries, order and
//! authors — also after a SIGKILL and a load from snapshot plus tail; the state at any point is
//! the state that was read then; a diff names what changed and who did it.

use serde_json::{json, Value};
use test_support as common;
use uuid::Uuid;

use common::mesh::{converged, TestMesh};
use common::{run_url, Backend, Client, Node};

/// Every entry of the run's history on `node`, read a page of `page` at a time.
async fn history(c: &Client, node: &Node, run: Uuid, page: usize) -> Vec<Value> {
    let (mut entries, mut after) = (Vec::new(), None::<String>);
    loop {
        let query = match &after {
            Some(a) => format!("/history?limit={page}&after={a}"),
            None => format!("/history?limit={page}"),
        };
        let (status, body) = c.get(&run_url(node, run, &query)).await;
        assert_eq!(status, 200, "{body}");
        entries.extend(body["entries"].as_array().unwrap().iter().cloned());
        match body["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return entries,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_region_lists_the_same_history_also_after_a_restart() {
    let mut mesh = TestMesh::start_with(
        Backend::Sqlite,
        &["us-east-1", "eu-central-1"],
        &[(0, 1)],
        &[("CRDT_SNAPSHOT_EVERY", "4")],
    )
    .await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    let url = |i: usize, rest: &str| run_url(mesh.node(i), run, rest);
    c.post(
        &url(0, "/grafts"),
        &json!({"agent": "Planner", "afterStep": "s1", "user": "ann"}),
    )
    .await;
    converged(&c, &mesh.nodes(), run, 20).await;
    // Both regions write while cut apart, then heal.
    mesh.partition(&[0]);
    for i in 0..3 {
        c.post(
            &url(0, "/grafts"),
            &json!({"agent": format!("us{i}"), "afterStep": "s1", "user": "ann"}),
        )
        .await;
        c.put(
            &url(1, &format!("/flags/f{i}")),
            &json!({"value": i, "user": "eve"}),
        )
        .await;
    }
    c.post(
        &url(1, "/pruned-steps"),
        &json!({"stepId": "s1", "user": "eve"}),
    )
    .await;
    mesh.heal_all();
    mesh.wait_connected(&c, 1).await;
    converged(&c, &mesh.nodes(), run, 30).await;
    let us = history(&c, mesh.node(0), run, 3).await;
    let eu = history(&c, mesh.node(1), run, 100).await;
    assert_eq!(us.len(), 8);
    assert_eq!(us, eu, "one history, whichever region answers");
    let authors: Vec<&str> = us.iter().filter_map(|e| e["user"].as_str()).collect();
    assert_eq!(
        authors.iter().filter(|a| **a == "eve").count(),
        4,
        "{us:#?}"
    );
    assert!(us.iter().all(|e| e["legacy"] == false));
    // A crash, and a load from snapshot plus tail: the same history.
    mesh.kill(1);
    mesh.restart(1);
    mesh.wait_connected(&c, 1).await;
    assert_eq!(history(&c, mesh.node(1), run, 5).await, us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_at_a_point_is_what_was_read_then_and_a_diff_says_who() {
    let db = common::TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = Uuid::new_v4();
    let url = |rest: &str| run_url(&node, run, rest);
    let steps = [
        (
            "POST",
            "/grafts",
            json!({"agent": "A", "afterStep": "s1", "user": "ann"}),
        ),
        (
            "PUT",
            "/flags/mode",
            json!({"value": {"fast": true}, "user": "bo"}),
        ),
        (
            "POST",
            "/pruned-steps",
            json!({"stepId": "s2", "user": "cy"}),
        ),
        (
            "POST",
            "/grafts",
            json!({"agent": "B", "afterStep": "s2", "user": "dee"}),
        ),
        (
            "PUT",
            "/flags/mode",
            json!({"value": "slow", "user": "eve"}),
        ),
    ];
    let mut seen = Vec::new();
    for (method, path, body) in steps {
        let (status, answer) = match method {
            "POST" => c.post(&url(path), &body).await,
            _ => c.put(&url(path), &body).await,
        };
        assert!(status == 200 || status == 201, "{answer}");
        let heads: Vec<String> = serde_json::from_value(answer["heads"].clone()).unwrap();
        let (_, state) = c.get(&url("/state")).await;
        seen.push((heads.join(","), state));
    }
    for (heads, state) in &seen {
        let (status, then) = c.get(&url(&format!("/state?at={heads}"))).await;
        assert_eq!(status, 200, "{then}");
        for field in ["grafts", "prunedSteps", "flags", "lamport"] {
            assert_eq!(then[field], state[field], "{field} at {heads}");
        }
    }
    let (from, _) = &seen[1];
    let (status, diff) = c.get(&url(&format!("/diff?from={from}"))).await;
    assert_eq!(status, 200, "{diff}");
    assert_eq!(diff["graftsAdded"][0]["agent"], "B");
    assert_eq!(diff["graftsAdded"][0]["user"], "dee");
    assert_eq!(diff["stepsPruned"][0]["stepId"], "s2");
    assert_eq!(
        diff["flagsChanged"],
        json!([{"key": "mode", "from": {"fast": true}, "to": "slow", "user": "eve"}])
    );
    // The history's entries name the same points.
    let entries = history(&c, &node, run, 2).await;
    let points: Vec<String> = entries
        .iter()
        .map(|e| {
            serde_json::from_value::<Vec<String>>(e["heads"].clone())
                .unwrap()
                .join(",")
        })
        .collect();
    assert_eq!(
        points,
        seen.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>()
    );
    assert_eq!(entries[1]["kind"], "setFlag");
    assert_eq!(entries[1]["user"], "bo");
    // Points the run does not hold, or that are no points at all.
    let unknown = "ab".repeat(32);
    let (status, body) = c.get(&url(&format!("/state?at={unknown}"))).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("not a change of this run"));
    assert_eq!(
        c.get(&url(&format!("/history?after={unknown}"))).await.0,
        404
    );
    assert_eq!(c.get(&url("/state?at=nothex")).await.0, 400);
    assert_eq!(c.get(&url("/diff")).await.0, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_made_in_one_region_brings_every_region_back_to_that_point() {
    let mesh = TestMesh::start(Backend::Sqlite, &["us-east-1", "eu-central-1"], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    let url = |i: usize, rest: &str| run_url(mesh.node(i), run, rest);
    c.post(
        &url(0, "/grafts"),
        &json!({"agent": "A", "afterStep": "s1", "user": "ann"}),
    )
    .await;
    let (_, answer) = c
        .put(
            &url(0, "/flags/mode"),
            &json!({"value": "fast", "user": "ann"}),
        )
        .await;
    let point = answer["heads"].clone();
    let (_, then) = c.get(&url(0, "/state")).await;
    let (status, marked) = c
        .post(
            &url(0, "/checkpoints"),
            &json!({"label": "stable", "user": "ann"}),
        )
        .await;
    assert_eq!(status, 201, "{marked}");
    c.post(
        &url(1, "/grafts"),
        &json!({"agent": "B", "afterStep": "s1", "user": "eve"}),
    )
    .await;
    c.put(
        &url(1, "/flags/mode"),
        &json!({"value": "slow", "user": "eve"}),
    )
    .await;
    c.post(
        &url(1, "/pruned-steps"),
        &json!({"stepId": "s1", "user": "eve"}),
    )
    .await;
    converged(&c, &mesh.nodes(), run, 20).await;
    // The checkpoint replicated: the other region finds the point by its label.
    let listed = history(&c, mesh.node(1), run, 100).await;
    let mark = listed
        .iter()
        .find(|e| e["kind"] == "checkpoint")
        .expect("the checkpoint is in the history");
    assert_eq!(
        (mark["content"]["label"].as_str(), mark["user"].as_str()),
        (Some("stable"), Some("ann"))
    );
    let mut at: Vec<String> = serde_json::from_value(mark["content"]["at"].clone()).unwrap();
    let mut expected: Vec<String> = serde_json::from_value(point.clone()).unwrap();
    at.sort();
    expected.sort();
    assert_eq!(at, expected, "it names the heads it was made at");
    let (status, reverted) = c
        .post(
            &url(1, "/revert"),
            &json!({"to": mark["content"]["at"], "user": "bo"}),
        )
        .await;
    assert_eq!(status, 200, "{reverted}");
    assert_eq!(reverted["changed"], true);
    let now = converged(&c, &mesh.nodes(), run, 20).await;
    for field in ["grafts", "prunedSteps", "flags"] {
        assert_eq!(now[field], then[field], "{field}");
    }
    // Recorded as a revert by its author, in both regions' histories and the change feed.
    for i in 0..2 {
        let entries = history(&c, mesh.node(i), run, 100).await;
        let last = entries.last().unwrap();
        assert_eq!(
            (last["kind"].as_str(), last["user"].as_str()),
            (Some("revert"), Some("bo"))
        );
        assert_eq!(last["content"]["to"], mark["content"]["at"]);
        assert_eq!(entries.len(), 7, "history is never rewritten");
    }
    let (status, body) = c
        .post(
            &url(0, "/revert"),
            &json!({"to": ["ab".repeat(32)], "user": "bo"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
}

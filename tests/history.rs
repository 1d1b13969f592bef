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

/// A state's replicated fields: what a point of history must give back exactly.
fn fields(state: &Value) -> Value {
    json!({"grafts": state["grafts"], "prunedSteps": state["prunedSteps"], "flags": state["flags"]})
}

/// Every recorded point reads back exactly as recorded on `node`.
async fn check_points(c: &Client, node: &Node, run: Uuid, points: &[(String, Value)]) {
    for (heads, state) in points {
        let (status, then) = c
            .get(&run_url(node, run, &format!("/state?at={heads}")))
            .await;
        assert_eq!(status, 200, "{then}");
        assert_eq!(fields(&then), *state, "{} at {heads}", node.base);
    }
}

/// `diff` applied to `from`: grafts (by id), pruned steps, flags.
fn apply_diff(from: &Value, diff: &Value) -> Value {
    use std::collections::BTreeMap;
    let mut grafts: BTreeMap<String, Value> = from["grafts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["id"].as_str().unwrap().to_string(), g.clone()))
        .collect();
    for g in diff["graftsRemoved"].as_array().unwrap() {
        grafts.remove(g["id"].as_str().unwrap());
    }
    for g in diff["graftsAdded"].as_array().unwrap() {
        grafts.insert(g["id"].as_str().unwrap().to_string(), g.clone());
    }
    let mut pruned: BTreeMap<String, Value> = from["prunedSteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["stepId"].as_str().unwrap().to_string(), p.clone()))
        .collect();
    for p in diff["stepsUnpruned"].as_array().unwrap() {
        pruned.remove(p["stepId"].as_str().unwrap());
    }
    for p in diff["stepsPruned"].as_array().unwrap() {
        pruned.insert(p["stepId"].as_str().unwrap().to_string(), p.clone());
    }
    let mut flags = from["flags"].as_object().unwrap().clone();
    for f in diff["flagsDeleted"].as_array().unwrap() {
        flags.remove(f["key"].as_str().unwrap());
    }
    for f in diff["flagsSet"]
        .as_array()
        .unwrap()
        .iter()
        .chain(diff["flagsChanged"].as_array().unwrap())
    {
        flags.insert(f["key"].as_str().unwrap().to_string(), f["to"].clone());
    }
    json!({"grafts": grafts, "prunedSteps": pruned, "flags": flags})
}

/// Where two keyed states (as `apply_diff` gives) differ: part, key, one side, the other.
fn differences(a: &Value, b: &Value) -> Vec<(String, String, Value, Value)> {
    let mut out = Vec::new();
    for part in ["grafts", "prunedSteps", "flags"] {
        let (x, y) = (a[part].as_object().unwrap(), b[part].as_object().unwrap());
        for k in x.keys().chain(y.keys()) {
            if x.get(k) != y.get(k) && !out.iter().any(|(p, q, _, _)| p == part && q == k) {
                let side =
                    |m: &serde_json::Map<String, Value>| m.get(k).cloned().unwrap_or_default();
                out.push((part.to_string(), k.clone(), side(x), side(y)));
            }
        }
    }
    out
}

/// `fields` keyed as `apply_diff` keys them, to compare without the run's order.
fn keyed(state: &Value) -> Value {
    apply_diff(
        state,
        &json!({"graftsRemoved": [], "graftsAdded": [], "stepsUnpruned": [], "stepsPruned": [],
            "flagsDeleted": [], "flagsSet": [], "flagsChanged": []}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_run_across_three_regions_has_one_history_and_every_point_reads_back() {
    let mut mesh = TestMesh::start_with(
        Backend::Sqlite,
        &["us-east-1", "eu-central-1", "ap-southeast-1"],
        &[(0, 1), (0, 2), (1, 2)],
        &[("CRDT_SNAPSHOT_EVERY", "250")],
    )
    .await;
    let c = Client::new();
    mesh.wait_connected(&c, 2).await;
    let run = Uuid::new_v4();
    let mut points: Vec<(String, Value)> = Vec::new();
    let mut written = 0;
    // Three phases: all connected, ap-southeast-1 cut off (both sides write the same flags and
    // graft after the same steps), healed. Every write is acknowledged before the next batch.
    for phase in 0..3 {
        if phase == 1 {
            mesh.partition(&[2]);
        }
        if phase == 2 {
            mesh.heal_all();
            mesh.wait_connected(&c, 2).await;
        }
        for batch in 0..80 {
            let writes = (0..10).map(|k| {
                let node = mesh.node((batch + k) % 3);
                let user = ["ann", "bo", "cy"][(batch + k) % 3];
                let n = phase * 1000 + batch * 10 + k;
                let c = &c;
                async move {
                    let (status, body) = match n % 5 {
                        0 | 1 => {
                            c.post(
                                &run_url(node, run, "/grafts"),
                                &json!({"agent": format!("agent{n}"), "afterStep": format!("Step{}", n % 7), "user": user}),
                            )
                            .await
                        }
                        2 => {
                            c.put(
                                &run_url(node, run, &format!("/flags/f{}", n % 4)),
                                &json!({"value": n, "user": user}),
                            )
                            .await
                        }
                        3 => {
                            c.post(
                                &run_url(node, run, "/pruned-steps"),
                                &json!({"stepId": format!("Step{}", n % 7), "user": user}),
                            )
                            .await
                        }
                        _ => {
                            c.delete(&run_url(
                                node,
                                run,
                                &format!("/pruned-steps/Step{}?user={user}", (n + 3) % 7),
                            ))
                            .await
                        }
                    };
                    assert!(status == 200 || status == 201, "{body}");
                    // A prune of a pruned step (or the reverse) changes nothing.
                    body["changed"] == true
                }
            });
            let changed = futures_util::future::join_all(writes).await;
            written += changed.into_iter().filter(|c| *c).count();
            if batch % 20 == 19 || batch % 20 == 9 || batch % 20 == 4 {
                let node = mesh.node(batch % 3);
                let (_, state) = c.get(&run_url(node, run, "/state")).await;
                let heads: Vec<String> = serde_json::from_value(state["heads"].clone()).unwrap();
                points.push((heads.join(","), fields(&state)));
            }
        }
    }
    let now = converged(&c, &mesh.nodes(), run, 60).await;
    let histories = [
        history(&c, mesh.node(0), run, 200).await,
        history(&c, mesh.node(1), run, 200).await,
        history(&c, mesh.node(2), run, 150).await,
    ];
    assert_eq!(histories[0].len(), written, "every change listed once");
    assert_eq!(histories[0], histories[1], "one history in every region");
    assert_eq!(histories[0], histories[2], "one history in every region");
    assert_eq!(points.len(), 36);

    for i in 0..3 {
        check_points(&c, mesh.node(i), run, &points).await;
    }
    // Applying a diff to the state at its start gives the state at its end, in any region.
    for (k, w) in points.windows(6).step_by(5).enumerate() {
        let ((from, at_from), (to, at_to)) = (&w[0], &w[5]);
        let node = mesh.node(k % 3);
        let (status, diff) = c
            .get(&run_url(node, run, &format!("/diff?from={from}&to={to}")))
            .await;
        assert_eq!(status, 200, "{diff}");
        let differ = differences(&apply_diff(at_from, &diff), &keyed(at_to));
        assert!(differ.is_empty(), "diff {from} → {to}: {differ:?}\n{diff}");
    }
    // After a restart (loading a snapshot and the tail), the same points read the same.
    mesh.kill(1);
    mesh.restart(1);
    mesh.wait_connected(&c, 2).await;
    check_points(&c, mesh.node(1), run, &points).await;
    assert_eq!(history(&c, mesh.node(1), run, 200).await, histories[0]);

    // Revert in one region to a point from the partition: every region converges on it.
    let (to, recorded) = &points[18];
    let to: Vec<&str> = to.split(',').collect();
    let (status, body) = c
        .post(
            &run_url(mesh.node(2), run, "/revert"),
            &json!({"to": to, "user": "dee"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let reverted = converged(&c, &mesh.nodes(), run, 30).await;
    assert_ne!(fields(&now), *recorded);
    let differ = differences(&keyed(&reverted), &keyed(recorded));
    assert!(differ.is_empty(), "after the revert: {differ:?}");
    for i in 0..3 {
        let after = history(&c, mesh.node(i), run, 200).await;
        assert_eq!(after.len(), histories[0].len() + 1, "history grew by one");
        assert_eq!(after.last().unwrap()["kind"], "revert");
    }
}

//! The HTTP API against a real node process, on SQLite and on PostgreSQL.

use test_support as common;
use test_support::both_backends;

use automerge::ChangeHash;
use base64::Engine;
use common::{db, metric, run_url, Backend, Client, Node, TestDb};
use run_doc::{concat_changes, parse_changes, Mutation, RunDoc};
use serde_json::{json, Value};
use uuid::Uuid;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

async fn reading_a_new_run_is_empty_and_writes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[("REGION", "eu-central-1")]);
    let c = Client::new();
    let run = Uuid::new_v4();
    let (status, state) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["runId"], json!(run));
    assert_eq!(state["region"], "eu-central-1");
    assert_eq!(state["grafts"], json!([]));
    assert_eq!(state["prunedSteps"], json!([]));
    assert_eq!(state["flags"], json!({}));
    assert_eq!(state["lamport"], 0);
    assert_eq!(
        state["heads"].as_array().unwrap().len(),
        1,
        "only the genesis change"
    );
    let (status, _) = c.get(&run_url(&node, run, "/changes")).await;
    assert_eq!(status, 200);
    assert_eq!(db::event_rows(&db, run).await, 0);
}

async fn five_mutations_round_trip(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = Uuid::new_v4();

    let (s, g) = c
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "SecurityAgent", "afterStep": "Step1", "user": "alice"}),
        )
        .await;
    assert_eq!(s, 201, "{g}");
    assert_eq!(g["graft"]["agent"], "SecurityAgent");
    assert_eq!(g["graft"]["afterStep"], "Step1");
    assert_eq!(g["graft"]["region"], "us-east-1");
    assert_eq!(g["graft"]["lamport"], 1);
    assert_eq!(g["lamport"], 1);
    assert!(Uuid::parse_str(g["graft"]["id"].as_str().unwrap()).is_ok());

    let (s, p) = c
        .post(
            &run_url(&node, run, "/pruned-steps"),
            &json!({"stepId": "Step2", "user": "bob"}),
        )
        .await;
    assert_eq!((s, p["lamport"].as_u64()), (200, Some(2)), "{p}");
    let flag = json!({"threshold": 0.75, "tags": ["a", "b"], "nested": {"on": true, "n": null}});
    let (s, f) = c
        .put(
            &run_url(&node, run, "/flags/review"),
            &json!({"value": flag, "user": "carol"}),
        )
        .await;
    assert_eq!((s, f["lamport"].as_u64()), (200, Some(3)), "{f}");
    let (s, f) = c
        .put(
            &run_url(&node, run, "/flags/gone"),
            &json!({"value": null, "user": "carol"}),
        )
        .await;
    assert_eq!(s, 200, "{f}");

    let (_, state) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(state["grafts"][0], g["graft"]);
    assert_eq!(
        state["prunedSteps"],
        json!([{"stepId": "Step2", "user": "bob", "region": "us-east-1", "lamport": 2}])
    );
    assert_eq!(state["flags"], json!({"review": flag, "gone": null}));
    assert_eq!(state["lamport"], 4);
    assert_eq!(state["heads"], f["heads"]);

    let (s, u) = c
        .delete(&run_url(&node, run, "/pruned-steps/Step2?user=bob"))
        .await;
    assert_eq!((s, &u["changed"]), (200, &json!(true)), "{u}");
    let (s, d) = c.delete(&run_url(&node, run, "/flags/gone")).await;
    assert_eq!(
        (s, &d["changed"], d["lamport"].as_u64()),
        (200, &json!(true), Some(6)),
        "{d}"
    );
    // Removing what is not there changes nothing and writes nothing.
    let rows = db::event_rows(&db, run).await;
    let (s, again) = c.delete(&run_url(&node, run, "/flags/gone")).await;
    assert_eq!(
        (s, &again["changed"], again["lamport"].as_u64()),
        (200, &json!(false), Some(6))
    );
    assert_eq!(db::event_rows(&db, run).await, rows);
    assert_eq!(rows, 6, "one event per effective mutation");

    let (_, state) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(state["prunedSteps"], json!([]));
    assert_eq!(state["flags"], json!({"review": flag}));
}

/// Another region's replica of `run`: a graft at clock 42 and a flag.
fn eu_replica(run: Uuid) -> RunDoc {
    let mut eu = RunDoc::new(run, "eu-central-1");
    eu.observe_lamport(41);
    eu.apply(
        &Mutation::Graft {
            id: Uuid::new_v4(),
            retry_safe: false,
            agent: "PerformanceAgent".into(),
            after_step: "Step1".into(),
            user: "b".into(),
        },
        1_764_000_000_000,
    )
    .unwrap();
    eu.apply(
        &Mutation::SetFlag {
            key: "mode".into(),
            value: json!("eu"),
        },
        1_764_000_000_000,
    )
    .unwrap();
    eu
}

async fn sync_applies_remote_changes_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = Uuid::new_v4();
    c.post(
        &run_url(&node, run, "/grafts"),
        &json!({"agent": "SecurityAgent", "afterStep": "Step1", "user": "a"}),
    )
    .await;

    // Another region's replica, made with the library, grafts concurrently at a higher clock.
    let mut eu = eu_replica(run);
    let changes = eu.changes_since(&[]);
    let body = json!({"changes": b64(&concat_changes(&changes)), "sourceRegion": "eu-central-1", "lamportTimestamp": 43});
    let (s, out) = c.post(&run_url(&node, run, "/sync"), &body).await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["applied"], 2);
    assert_eq!(out["duplicates"], 1, "genesis is shared");
    assert_eq!(out["lamport"], 43);
    let rows = db::event_rows(&db, run).await;
    assert_eq!(rows, 3);

    // The same changes again: a no-op, no new rows.
    let (s, out) = c.post(&run_url(&node, run, "/sync"), &body).await;
    assert_eq!(
        (s, out["applied"].as_u64(), out["duplicates"].as_u64()),
        (200, Some(0), Some(3))
    );
    assert_eq!(db::event_rows(&db, run).await, rows);

    let (_, state) = c.get(&run_url(&node, run, "/state")).await;
    let agents = common::agents(&state);
    assert_eq!(
        agents,
        vec!["SecurityAgent", "PerformanceAgent"],
        "ordered by lamport 1 < 42"
    );
    assert_eq!(state["flags"]["mode"], "eu");
    // The next local mutation continues from the received clock.
    let (_, g) = c
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "X", "afterStep": "S", "user": "a"}),
        )
        .await;
    assert_eq!(g["lamport"], 44);

    // GET changes since eu's heads returns exactly what eu lacks; applying them converges.
    let heads: Vec<String> = eu.heads().iter().map(ChangeHash::to_string).collect();
    let (s, missing) = c
        .get(&run_url(
            &node,
            run,
            &format!("/changes?heads={}", heads.join(",")),
        ))
        .await;
    assert_eq!(s, 200, "{missing}");
    assert_eq!(missing["count"], 2, "the first graft and the last one");
    eu.apply_remote(parse_changes(&unb64(&missing["changes"])).unwrap(), None)
        .unwrap();
    let (_, state) = c.get(&run_url(&node, run, "/state")).await;
    let mine = serde_json::to_value(eu.state()).unwrap();
    assert_eq!(mine["grafts"], state["grafts"]);
    assert_eq!(mine["heads"], state["heads"]);
    assert_eq!(missing["heads"], state["heads"]);
}

async fn sync_with_missing_dependencies_is_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut eu = RunDoc::new(run, "eu-central-1");
    eu.apply(
        &Mutation::SetFlag {
            key: "a".into(),
            value: json!(1),
        },
        0,
    )
    .unwrap();
    let first = eu.heads();
    eu.apply(
        &Mutation::SetFlag {
            key: "b".into(),
            value: json!(2),
        },
        0,
    )
    .unwrap();
    let second_only = eu.changes_since(&first);
    let body =
        json!({"changes": b64(&concat_changes(&second_only)), "sourceRegion": "eu-central-1"});
    let (s, err) = c.post(&run_url(&node, run, "/sync"), &body).await;
    assert_eq!(s, 422, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains(&first[0].to_string()),
        "{err}"
    );
    let (_, state) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(state["flags"], json!({}));
    assert_eq!(db::event_rows(&db, run).await, 0);
}

/// Change bytes for the sync checks: well-formed, so the checks after decoding refuse them.
struct SyncFixtures {
    /// A change of this run.
    valid: String,
    /// A change of another document.
    foreign: String,
    /// A change of this run that breaks its shape (flags no longer a map).
    takeover: String,
    /// A whole document instead of changes.
    whole_doc: String,
    /// A change stamped 2^53-1, as a node's commit message would carry it.
    pinned: String,
}

impl SyncFixtures {
    fn new(run: Uuid) -> Self {
        let mut replica = RunDoc::new(run, "eu");
        let out = replica
            .apply(
                &Mutation::SetFlag {
                    key: "x".into(),
                    value: json!(1),
                },
                0,
            )
            .unwrap();
        let valid = b64(out.change.unwrap().raw_bytes());
        let foreign = {
            let mut other = automerge::AutoCommit::new();
            automerge::transaction::Transactable::put(
                &mut other,
                automerge::ROOT,
                "grafts",
                "mine",
            )
            .unwrap();
            other.commit();
            b64(&concat_changes(&other.get_changes(&[])))
        };
        let takeover = {
            let mut raw = automerge::AutoCommit::load(&RunDoc::new(run, "eu").save()).unwrap();
            let base = raw.get_heads();
            automerge::transaction::Transactable::put(&mut raw, automerge::ROOT, "flags", "gone")
                .unwrap();
            raw.commit();
            b64(&concat_changes(&raw.get_changes(&base)))
        };
        let whole_doc = b64(&replica.save());
        let pinned = {
            // A change stamped 2^53-1, as a node's commit message would carry it.
            let mut raw = automerge::AutoCommit::load(&RunDoc::new(run, "eu").save()).unwrap();
            let base = raw.get_heads();
            let flags = automerge::ReadDoc::get(&raw, automerge::ROOT, "flags")
                .unwrap()
                .unwrap()
                .1;
            automerge::transaction::Transactable::put(&mut raw, &flags, "pin", 1).unwrap();
            let stamp = run_doc::Stamp {
                lamport: run_doc::MAX_LAMPORT,
                region: "eu".into(),
                user: None,
                revert_to: None,
                checkpoint: None,
            };
            raw.commit_with(
                automerge::transaction::CommitOptions::default().with_message(stamp.to_message()),
            );
            b64(&concat_changes(&raw.get_changes(&base)))
        };
        SyncFixtures {
            valid,
            foreign,
            takeover,
            whole_doc,
            pinned,
        }
    }
}

/// Every kind of bad request, with the status it must get.
fn bad_requests(
    node: &Node,
    run: Uuid,
    bytes: &SyncFixtures,
) -> Vec<(&'static str, u16, reqwest::RequestBuilder)> {
    let graft_url = run_url(node, run, "/grafts");
    let sync_url = run_url(node, run, "/sync");
    let SyncFixtures {
        valid,
        foreign,
        whole_doc,
        pinned,
        ..
    } = bytes;
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!([deep]);
    }
    let h = reqwest::Client::new();
    let json_post = |url: &str, body: &str| {
        h.post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
    };
    vec![
        ("malformed run id", 400, h.get(node.url("/api/crdt/runs/not-a-uuid/state"))),
        ("malformed run id on write", 400, json_post(&node.url("/api/crdt/runs/123/grafts"), r#"{"agent":"A","afterStep":"S","user":"u"}"#)),
        ("malformed JSON", 400, json_post(&graft_url, r#"{"agent": "A", "#)),
        ("wrong content type", 400, h.post(&graft_url).header("content-type", "text/plain").body("agent=A")),
        ("missing field", 400, json_post(&graft_url, r#"{"agent":"A","user":"u"}"#)),
        ("empty field", 400, json_post(&graft_url, r#"{"agent":"  ","afterStep":"S","user":"u"}"#)),
        ("wrong field type", 400, json_post(&graft_url, r#"{"agent":5,"afterStep":"S","user":"u"}"#)),
        ("overlong name", 400, json_post(&graft_url, &json!({"agent": "x".repeat(500), "afterStep": "S", "user": "u"}).to_string())),
        ("flag without value", 400, h.put(run_url(node, run, "/flags/k")).header("content-type", "application/json").body(r#"{"user":"u"}"#)),
        ("bad base64", 400, json_post(&sync_url, r#"{"changes":"***","sourceRegion":"eu-central-1"}"#)),
        ("bytes that are not automerge", 400, json_post(&sync_url, &json!({"changes": b64(b"definitely not an automerge change"), "sourceRegion": "eu-central-1"}).to_string())),
        ("missing changes", 400, json_post(&sync_url, r#"{"sourceRegion":"eu-central-1"}"#)),
        ("bad source region", 400, json_post(&sync_url, &json!({"changes": valid, "sourceRegion": "eu central"}).to_string())),
        ("negative lamport", 400, json_post(&sync_url, &json!({"changes": valid, "sourceRegion": "eu", "lamportTimestamp": -1}).to_string())),
        ("lamport beyond 2^53", 400, json_post(&sync_url, &json!({"changes": valid, "sourceRegion": "eu", "lamportTimestamp": 1i64 << 60}).to_string())),
        ("lamportTimestamp far past the run's clock", 422, json_post(&sync_url, &json!({"changes": valid, "sourceRegion": "eu", "lamportTimestamp": (1i64 << 53) - 1}).to_string())),
        ("a change stamped far past the run's clock", 422, json_post(&sync_url, &json!({"changes": pinned, "sourceRegion": "eu"}).to_string())),
        ("a change of another document", 422, json_post(&sync_url, &json!({"changes": foreign, "sourceRegion": "eu"}).to_string())),
        ("a document instead of changes", 400, json_post(&sync_url, &json!({"changes": whole_doc, "sourceRegion": "eu"}).to_string())),
        ("flag nested too deep", 400, h.put(run_url(node, run, "/flags/deep")).header("content-type", "application/json").body(json!({"value": deep, "user": "u"}).to_string())),
        ("graft id that is not a UUID", 400, json_post(&graft_url, r#"{"id":"x","agent":"A","afterStep":"S","user":"u"}"#)),
        ("bad heads", 400, h.get(run_url(node, run, "/changes?heads=zz"))),
        ("an op bomb: a few KB inserting 150,000 characters", 413, json_post(&sync_url, &json!({"changes": b64(&common::op_bomb(run, 150_000)), "sourceRegion": "eu"}).to_string())),
        ("oversized body", 413, json_post(&graft_url, &json!({"agent": "A", "afterStep": "S", "user": "u", "pad": "x".repeat(70_000)}).to_string())),
        ("bad peer region", 400, json_post(&run_url(node, run, "/register-peer"), r#"{"peerRegion":""}"#)),
        ("unknown route", 404, h.get(node.url("/api/crdt/nothing-here"))),
        ("percent-encoded bytes that are not UTF-8", 400, h.put(run_url(node, run, "/flags/%ff")).header("content-type", "application/json").body(r#"{"value":1,"user":"u"}"#)),
        ("a user that is not UTF-8", 400, h.delete(run_url(node, run, "/flags/k?user=%fe"))),
        ("a browser session from another site's page", 403, h.get(node.url(&format!("/ws/runs/{run}"))).header("origin", "http://evil.example")),
        ("an automerge-repo socket from another site's page", 403, h.get(node.url("/ws/automerge")).header("origin", "http://evil.example")),
    ]
}

/// Every kind of bad input gets a 4xx with a JSON error body, and changes nothing.
async fn bad_input_is_refused_clearly(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[("CRDT_MAX_BODY_BYTES", "65536")]);
    let c = Client::new();
    let run = Uuid::new_v4();
    c.post(
        &run_url(&node, run, "/grafts"),
        &json!({"agent": "A", "afterStep": "S", "user": "u"}),
    )
    .await;
    let (_, before) = c.get(&run_url(&node, run, "/state")).await;

    let sync_url = run_url(&node, run, "/sync");
    let bytes = SyncFixtures::new(run);
    let cases = bad_requests(&node, run, &bytes);
    for (what, expected, rb) in cases {
        let (status, body) = c.send(rb).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{what}: not a JSON error: {body}"
        );
    }
    let (status, after) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(status, 200, "the node keeps serving");
    assert_eq!(before, after, "no bad request changed the run");
    assert_eq!(db::event_rows(&db, run).await, 1);
    assert_eq!(after["valid"], true, "{after}");
    // A change that breaks the run's shape is still a change of this run: stored (every
    // replica must hold the same changes), and the state says the run is invalid, and why.
    let (status, body) = c
        .post(
            &sync_url,
            &json!({"changes": bytes.takeover, "sourceRegion": "eu"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"], 1, "{body}");
    let (_, broken) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(broken["valid"], false, "{broken}");
    assert_eq!(
        broken["schemaErrors"],
        json!(["flags is not a Map"]),
        "{broken}"
    );
    assert_eq!(db::event_rows(&db, run).await, 2);
}

async fn api_token_guards_api_but_not_health_or_metrics(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[("CRDT_API_TOKEN", "s3cret")]);
    let run = Uuid::new_v4();
    let anonymous = Client::new();
    let wrong = Client::with_token("guess");
    let right = Client::with_token("s3cret");
    for c in [&anonymous, &wrong] {
        let (s, body) = c.get(&run_url(&node, run, "/state")).await;
        assert_eq!(s, 401, "{body}");
        let (s, _) = c
            .post(
                &run_url(&node, run, "/grafts"),
                &json!({"agent": "A", "afterStep": "S", "user": "u"}),
            )
            .await;
        assert_eq!(s, 401);
        let (s, _) = c.get(&node.url("/api/crdt/mesh/status")).await;
        assert_eq!(s, 401);
    }
    let (s, _) = right
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "A", "afterStep": "S", "user": "u"}),
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = anonymous.get(&node.url("/actuator/health")).await;
    assert_eq!(s, 200);
    assert!(anonymous
        .text(&node.url("/actuator/prometheus"))
        .await
        .contains("crdt_mesh_peers_connected"));
    assert_eq!(db::event_rows(&db, run).await, 1);
}

async fn health_and_mesh_status(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(
        &db,
        &[
            ("NODE_ID", "use1-a"),
            ("CRDT_MESH_PEERS", "ws://127.0.0.1:1/ws,wss://eu.example/ws"),
            ("CRDT_MESH_SECRET", "s"),
        ],
    );
    let c = Client::new();
    for path in [
        "/actuator/health",
        "/actuator/health/liveness",
        "/actuator/health/readiness",
    ] {
        let (s, body) = c.get(&node.url(path)).await;
        assert_eq!(
            (s, body["status"].as_str()),
            (200, Some("UP")),
            "{path}: {body}"
        );
    }
    let (_, ready) = c.get(&node.url("/actuator/health/readiness")).await;
    let expected = if backend == Backend::Postgres {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(ready["components"]["db"]["backend"], expected);

    let run = Uuid::new_v4();
    let (s, reg) = c
        .post(
            &run_url(&node, run, "/register-peer"),
            &json!({"peerRegion": "ap-southeast-1"}),
        )
        .await;
    assert_eq!(s, 200, "{reg}");
    assert_eq!(
        (reg["registered"].as_bool(), reg["connected"].as_bool()),
        (Some(true), Some(false))
    );
    let (s, status) = c.get(&node.url("/api/crdt/mesh/status")).await;
    assert_eq!(s, 200);
    assert_eq!(status["nodeId"], "use1-a");
    assert_eq!(status["region"], "us-east-1");
    assert_eq!(status["peers"].as_array().unwrap().len(), 2);
    assert_eq!(status["peers"][1]["url"], "wss://eu.example/ws");
    assert_eq!(status["connectedPeers"], 0);
    assert_eq!(
        status["registrations"][run.to_string()],
        json!(["ap-southeast-1"])
    );
}

async fn metrics_follow_the_runs(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(
        &db,
        &[("CRDT_SNAPSHOT_EVERY", "5"), ("CRDT_RUN_IDLE_SECS", "1")],
    );
    let c = Client::new();
    let run = Uuid::new_v4();
    for i in 0..6 {
        c.put(
            &run_url(&node, run, &format!("/flags/k{i}")),
            &json!({"value": i, "user": "u"}),
        )
        .await;
    }
    c.post(
        &run_url(&node, run, "/sync"),
        &json!({"changes": "***", "sourceRegion": "eu"}),
    )
    .await;
    let series = format!("crdt_lamport_clock{{run_id=\"{run}\"}}");
    let text = c.text(&node.url("/actuator/prometheus")).await;
    assert_eq!(metric(&text, &series), Some(6.0), "{text}");
    assert_eq!(
        metric(&text, "crdt_sync_messages_total{direction=\"in\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "crdt_sync_failures_total{reason=\"decode\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&text, "crdt_mesh_peers_connected"), Some(0.0));
    assert!(
        text.contains("crdt_node_http_requests_total"),
        "actix-web-prom's HTTP metrics"
    );
    let snap = common::eventually(10, || {
        let c = c.clone();
        let url = node.url("/actuator/prometheus");
        async move {
            metric(&c.text(&url).await, "crdt_snapshot_size_bytes_count").filter(|n| *n >= 1.0)
        }
    })
    .await;
    assert!(snap.is_some(), "a snapshot was written at 5 events");
    // An idle run is unloaded and its Lamport series removed, so cardinality stays bounded.
    let gone = common::eventually(10, || {
        let c = c.clone();
        let url = node.url("/actuator/prometheus");
        let series = series.clone();
        async move {
            let text = c.text(&url).await;
            (metric(&text, &series).is_none() && metric(&text, "crdt_runs_loaded") == Some(0.0))
                .then_some(())
        }
    })
    .await;
    assert!(gone.is_some(), "the idle run was not unloaded");
    // And it loads again on the next read, with its state.
    let (_, state) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(state["lamport"], 6);
    assert_eq!(state["flags"].as_object().unwrap().len(), 6);
}

/// Reads of runs nobody wrote do not keep them in memory for the whole idle timeout.
async fn reads_of_unwritten_runs_are_unloaded_soon(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[("CRDT_RUN_IDLE_SECS", "3600")]);
    let c = Client::new();
    let written = Uuid::new_v4();
    let (s, _) = c
        .put(
            &run_url(&node, written, "/flags/k"),
            &json!({"value": 1, "user": "u"}),
        )
        .await;
    assert_eq!(s, 200);
    for _ in 0..20 {
        let (s, _) = c.get(&run_url(&node, Uuid::new_v4(), "/state")).await;
        assert_eq!(s, 200);
    }
    let loaded = || {
        let (c, url) = (c.clone(), node.url("/actuator/prometheus"));
        async move { metric(&c.text(&url).await, "crdt_runs_loaded") }
    };
    assert_eq!(loaded().await, Some(21.0));
    let settled =
        common::eventually(15, || async { (loaded().await == Some(1.0)).then_some(()) }).await;
    assert!(settled.is_some(), "only the written run stays loaded");
}

/// `GET /api/crdt/runs`: newest activity first, a page at a time, legacy runs included.
async fn runs_list_newest_first_in_pages(backend: Backend) {
    let db = TestDb::new(backend).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let runs: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for run in &runs {
        let (s, _) = c
            .put(
                &run_url(&node, *run, "/flags/k"),
                &json!({"value": 1, "user": "u"}),
            )
            .await;
        assert_eq!(s, 200);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Writing the first run again makes it the most recent.
    let (s, _) = c
        .put(
            &run_url(&node, runs[0], "/flags/k"),
            &json!({"value": 2, "user": "u"}),
        )
        .await;
    assert_eq!(s, 200);
    let ids = |page: &Value| -> Vec<String> {
        page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["runId"].as_str().unwrap().to_string())
            .collect()
    };
    let (s, first) = c.get(&node.url("/api/crdt/runs?limit=2")).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(ids(&first), [runs[0].to_string(), runs[2].to_string()]);
    assert!(first["runs"][0]["lastActivity"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(first["runs"][0]["viewers"], 0);
    let cursor = first["nextCursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (s, second) = c
        .get(&node.url(&format!("/api/crdt/runs?limit=2&cursor={cursor}")))
        .await;
    assert_eq!(s, 200, "{second}");
    assert_eq!(ids(&second), [runs[1].to_string()]);
    assert!(second["nextCursor"].is_null());
    // A page that ends exactly at the last run says there is no more.
    let (_, all) = c.get(&node.url("/api/crdt/runs?limit=3")).await;
    assert_eq!(ids(&all).len(), 3);
    assert!(all["nextCursor"].is_null(), "{all}");
    for bad in [
        "limit=0",
        "limit=201",
        "cursor=nope",
        "cursor=12.not-a-uuid",
    ] {
        let (s, body) = c.get(&node.url(&format!("/api/crdt/runs?{bad}"))).await;
        assert_eq!(s, 400, "{bad}: {body}");
        assert!(body["message"].is_string());
    }
}

both_backends!(
    runs_list_newest_first_in_pages,
    reads_of_unwritten_runs_are_unloaded_soon,
    reading_a_new_run_is_empty_and_writes_nothing,
    five_mutations_round_trip,
    sync_applies_remote_changes_once,
    sync_with_missing_dependencies_is_refused,
    bad_input_is_refused_clearly,
    api_token_guards_api_but_not_health_or_metrics,
    health_and_mesh_status,
    metrics_follow_the_runs,
);

/// One database per pod on a shared server: with `DATABASE_CREATE_IF_MISSING`, a node creates
/// the database its URL names, then migrates it; without, it refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_postgres_database_is_created_when_asked() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    let placeholder = TestDb::new(Backend::Sqlite).await;
    let admin = common::pg_admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap();
    let name = format!("crdt_pod_{}", Uuid::new_v4().simple());
    let url = format!("{base}/{name}");
    let node = Node::spawn(
        &placeholder,
        &[
            ("DATABASE_URL", &url),
            ("DATABASE_CREATE_IF_MISSING", "true"),
        ],
    );
    let c = Client::new();
    let run = Uuid::new_v4();
    let (s, _) = c
        .put(
            &run_url(&node, run, "/flags/k"),
            &json!({"value": 1, "user": "u"}),
        )
        .await;
    assert_eq!(s, 200);
    drop(node);
    let mut conn = AsyncPgConnection::establish(&admin).await.unwrap();
    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .unwrap();
}

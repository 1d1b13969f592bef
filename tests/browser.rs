//! Browser sessions (`/ws/runs/{runId}`) against real node processes, with a real WebSocket
//! client: state on join, live updates from every door, acks, errors, the token, presence
//! across regions and slow clients.

use test_support as common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::mesh::{TestMesh, Ws};
use common::{metric, run_url, Backend, Client, Node, TestDb};

/// A browser session as a test drives it.
struct Session {
    ws: Ws,
}

fn session_url(node: &Node, run: Uuid) -> String {
    node.url(&format!("/ws/runs/{run}"))
        .replace("http://", "ws://")
}

impl Session {
    async fn open(node: &Node, run: Uuid) -> Session {
        Self::open_with(node, run, None).await
    }

    async fn open_with(node: &Node, run: Uuid, bearer: Option<&str>) -> Session {
        let mut req = session_url(node, run).into_client_request().unwrap();
        if let Some(t) = bearer {
            req.headers_mut()
                .insert("Authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        Session { ws }
    }

    /// Opens and joins as `user`; returns the session after its WELCOME.
    async fn join(node: &Node, run: Uuid, user: &str) -> Session {
        let mut s = Self::open(node, run).await;
        s.send(json!({"type": "JOIN", "user": user})).await;
        let welcome = s.expect("WELCOME").await;
        assert_eq!(welcome["user"], user);
        s
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// The next frame of any type.
    async fn next(&mut self) -> Value {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// The next frame of type `kind`, skipping others.
    async fn expect(&mut self, kind: &str) -> Value {
        loop {
            let f = self.next().await;
            if f["type"] == kind {
                return f;
            }
        }
    }

    /// The next STATE satisfying `pred`.
    async fn state_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let f = self.expect("STATE").await;
            if pred(&f["state"]) {
                return f["state"].clone();
            }
        }
    }

    /// Reads until the node closes the socket; its close code and reason.
    async fn closed(&mut self) -> (u16, String) {
        loop {
            match tokio::time::timeout(Duration::from_secs(15), self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Ok(Some(Ok(Message::Close(None)))) => return (CloseCode::Status.into(), "".into()),
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close, got {other:?}"),
            }
        }
    }
}

fn agents(state: &Value) -> Vec<String> {
    common::agents(state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_on_join_live_updates_and_acks() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[("REGION", "eu-central-1")]);
    let c = Client::new();
    let run = Uuid::new_v4();
    let (s, _) = c
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "First", "afterStep": "Step1", "user": "api"}),
        )
        .await;
    assert_eq!(s, 201);

    let mut ana = Session::open(&node, run).await;
    ana.send(json!({"type": "JOIN", "user": "ana"})).await;
    let welcome = ana.expect("WELCOME").await;
    assert_eq!(welcome["runId"], json!(run));
    assert_eq!(welcome["region"], "eu-central-1");
    let state = ana.expect("STATE").await;
    assert_eq!(agents(&state["state"]), ["First"], "{state}");
    let mut bo = Session::join(&node, run, "bo").await;
    bo.state_where(|s| agents(s) == ["First"]).await;

    // A mutation from a session: acknowledged with its op id, pushed to both sessions.
    let id = Uuid::new_v4();
    ana.send(json!({"type": "MUTATE", "opId": "op-1", "op": "GRAFT",
        "agent": "Second", "afterStep": "Step1", "id": id}))
        .await;
    let ack = ana.expect("ACK").await;
    assert_eq!(ack["opId"], "op-1");
    assert_eq!(ack["changed"], true);
    assert_eq!(ack["graft"]["id"], json!(id));
    assert_eq!(ack["graft"]["user"], "ana");
    assert!(ack["lamport"].as_u64().unwrap() >= 2);
    let two = |s: &Value| agents(s).len() == 2;
    let seen_by_bo = bo.state_where(two).await;
    assert_eq!(seen_by_bo["grafts"][1]["region"], "eu-central-1");
    // The ack means durable: the HTTP state shows it.
    let (_, http) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(agents(&http), ["First", "Second"]);

    // The other mutations, and a retried graft (same id) that changes nothing.
    for (op_id, op) in [
        ("op-2", json!({"op": "PRUNE", "stepId": "Step2"})),
        ("op-3", json!({"op": "UNPRUNE", "stepId": "Step2"})),
        (
            "op-4",
            json!({"op": "SET_FLAG", "key": "mode", "value": {"fast": true}}),
        ),
        ("op-5", json!({"op": "DELETE_FLAG", "key": "gone"})),
        (
            "op-6",
            json!({"op": "GRAFT", "agent": "Second", "afterStep": "Step1", "id": id}),
        ),
    ] {
        let mut frame = op.clone();
        frame["type"] = json!("MUTATE");
        frame["opId"] = json!(op_id);
        bo.send(frame).await;
        let ack = bo.expect("ACK").await;
        assert_eq!(ack["opId"], op_id, "{ack}");
        if op_id == "op-6" || op_id == "op-5" {
            assert_eq!(ack["changed"], false, "{op_id}: {ack}");
        }
    }
    ana.state_where(|s| s["flags"]["mode"] == json!({"fast": true}))
        .await;

    // A change through the HTTP API reaches the sessions too.
    let (s, _) = c
        .post(
            &run_url(&node, run, "/pruned-steps"),
            &json!({"stepId": "Step9", "user": "api"}),
        )
        .await;
    assert_eq!(s, 200);
    let pruned = |s: &Value| s["prunedSteps"].as_array().is_some_and(|p| p.len() == 1);
    ana.state_where(pruned).await;
    bo.state_where(pruned).await;
}

/// A client that re-sends an operation it never saw acknowledged (its connection dropped) gets
/// the first answer, and what others did since is not undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_operation_is_answered_not_applied_again() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = Uuid::new_v4();
    let prune = json!({"type": "MUTATE", "opId": "p-1", "op": "PRUNE", "stepId": "Step2"});
    let mut first = Session::join(&node, run, "ana").await;
    first.send(prune.clone()).await;
    let ack = first.expect("ACK").await;
    assert_eq!(ack["changed"], true);
    drop(first);
    // Someone else unprunes the step.
    let (s, _) = c.delete(&run_url(&node, run, "/pruned-steps/Step2")).await;
    assert_eq!(s, 200);
    let mut again = Session::join(&node, run, "ana").await;
    again.send(prune).await;
    let repeat = again.expect("ACK").await;
    assert_eq!(repeat["opId"], "p-1");
    assert_eq!(
        repeat["lamport"], ack["lamport"],
        "the first outcome: {repeat}"
    );
    let (_, state) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(state["prunedSteps"], json!([]), "the unprune stands");
    // The same op id from another user is that user's own operation.
    let mut bo = Session::join(&node, run, "bo").await;
    bo.send(json!({"type": "MUTATE", "opId": "p-1", "op": "PRUNE", "stepId": "Step2"}))
        .await;
    assert_eq!(bo.expect("ACK").await["changed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_reasons_and_the_session_stays_open() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = Uuid::new_v4();

    // A malformed run id never becomes a session.
    let (s, body) = c.get(&node.url("/ws/runs/not-a-uuid")).await;
    assert_eq!(s, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("runId"));

    let mut s = Session::open(&node, run).await;
    let mutate = json!({"type": "MUTATE", "opId": "early", "op": "PRUNE", "stepId": "S"});
    s.send(mutate).await;
    let e = s.expect("ERROR").await;
    assert_eq!(
        (e["error"].as_str(), e["opId"].as_str()),
        (Some("not_joined"), Some("early"))
    );
    s.send(json!({"type": "JOIN", "user": "  "})).await;
    let e = s.expect("ERROR").await;
    assert!(e["message"].as_str().unwrap().contains("user"), "{e}");
    s.send(json!({"type": "JOIN", "user": "ana"})).await;
    s.expect("WELCOME").await;

    for (frame, error, needle) in [
        ("not json".to_string(), "bad_frame", "not JSON"),
        (json!({"kind": "x"}).to_string(), "bad_frame", "no \"type\""),
        (json!({"type": "DANCE"}).to_string(), "bad_frame", "unknown message type"),
        (json!({"type": "MUTATE", "op": "EXPLODE"}).to_string(), "bad_frame", "malformed MUTATE"),
        (json!({"type": "MUTATE", "opId": "o1", "op": "SET_FLAG", "key": "k"}).to_string(), "invalid_field", "value"),
        (json!({"type": "MUTATE", "opId": "o2", "op": "GRAFT", "agent": "", "afterStep": "s"}).to_string(), "invalid_field", "agent"),
        (json!({"type": "MUTATE", "opId": "o3", "op": "GRAFT", "agent": "a", "afterStep": "s", "id": "x"}).to_string(), "invalid_field", "UUID"),
        (json!({"type": "MUTATE", "opId": "x".repeat(101), "op": "PRUNE", "stepId": "S"}).to_string(), "invalid_field", "opId"),
        (json!({"type": "JOIN", "user": "again"}).to_string(), "bad_frame", "already joined"),
    ] {
        s.ws.send(Message::text(frame.clone())).await.unwrap();
        let e = s.expect("ERROR").await;
        assert_eq!(e["error"], error, "{frame}: {e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{frame}: {e}");
    }
    s.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let e = s.expect("ERROR").await;
    assert!(e["message"].as_str().unwrap().contains("binary"), "{e}");

    // Still open, still working.
    s.send(json!({"type": "MUTATE", "opId": "ok", "op": "SET_FLAG", "key": "k", "value": 1}))
        .await;
    assert_eq!(s.expect("ACK").await["opId"], "ok");
    let text = c.text(&node.url("/actuator/prometheus")).await;
    assert!(metric(&text, "crdt_browser_frames_total{direction=\"in\"}").unwrap() >= 14.0);
    assert_eq!(metric(&text, "crdt_browser_sessions"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[("CRDT_API_TOKEN", "sesame")]);
    let run = Uuid::new_v4();
    for token in [None, Some("wrong")] {
        let mut s = Session::open(&node, run).await;
        s.send(json!({"type": "JOIN", "user": "eve", "token": token}))
            .await;
        let e = s.expect("ERROR").await;
        assert_eq!(e["error"], "unauthorized");
        let (code, reason) = s.closed().await;
        assert_eq!(code, 4001, "{reason}");
        assert!(reason.contains("token"));
    }
    let mut s = Session::open(&node, run).await;
    s.send(json!({"type": "JOIN", "user": "ana", "token": "sesame"}))
        .await;
    s.expect("WELCOME").await;
    s.expect("STATE").await;
    // A non-browser client may present it as a bearer header instead.
    let mut s = Session::open_with(&node, run, Some("sesame")).await;
    s.send(json!({"type": "JOIN", "user": "bot"})).await;
    s.expect("WELCOME").await;
    // A session that never joins is closed.
    let mut idle = Session::open(&node, run).await;
    let (code, reason) = idle.closed().await;
    assert_eq!(code, 4008, "{reason}");
}

/// A session over a socket with a tiny receive window, so that what the node sends it piles
/// up on the node's side as soon as the test stops reading.
async fn stuck_session(node: &Node, run: Uuid) -> Session {
    let addr: std::net::SocketAddr = node.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(session_url(node, run), stream)
        .await
        .expect("handshake");
    let mut s = Session { ws };
    s.send(json!({"type": "JOIN", "user": "stuck"})).await;
    s.expect("WELCOME").await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_session_is_closed_and_the_others_keep_up() {
    let db = TestDb::new(Backend::Sqlite).await;
    // Each STATE is about 1 MB: a session with 3 MiB queued is too far behind.
    let node = Node::spawn(&db, &[("CRDT_BROWSER_QUEUE_BYTES", "3145728")]);
    let c = Client::new();
    let run = Uuid::new_v4();
    // Four big flags (each within a flag's bound) make every STATE big; small changes then
    // make many of them.
    for i in 0..4 {
        let blob = "x".repeat(250_000);
        let (s, _) = c
            .put(
                &run_url(&node, run, &format!("/flags/blob{i}")),
                &json!({"value": blob, "user": "u"}),
            )
            .await;
        assert_eq!(s, 200);
    }
    let mut stuck = stuck_session(&node, run).await;
    let mut live = Session::join(&node, run, "live").await;
    let url = run_url(&node, run, "/flags/tick");
    let mut closed = None;
    for i in 0..120 {
        let (s, _) = c.put(&url, &json!({"value": i, "user": "u"})).await;
        assert_eq!(s, 200);
        live.state_where(|s| s["flags"]["tick"] == i).await;
        let text = c.text(&node.url("/actuator/prometheus")).await;
        closed = metric(
            &text,
            "crdt_browser_sessions_closed_total{reason=\"too_slow\"}",
        )
        .filter(|n| *n >= 1.0);
        if closed.is_some() {
            break;
        }
    }
    assert!(closed.is_some(), "the stuck session was not closed");
    let (code, reason) = stuck.closed().await;
    assert_eq!(code, 4009, "{reason}");
    assert!(reason.contains("resync"));
    // The live one is still served.
    let (s, _) = c.put(&url, &json!({"value": "last", "user": "u"})).await;
    assert_eq!(s, 200);
    live.state_where(|s| s["flags"]["tick"] == "last").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_changes_cross_regions() {
    let mesh = TestMesh::start(Backend::Sqlite, &["us-east-1", "eu-central-1"], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    let mut ana = Session::join(mesh.node(0), run, "ana").await;
    let mut bo = Session::join(mesh.node(1), run, "bo").await;
    let both = |f: &Value| {
        let users: Vec<(String, String)> = f["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["user"].as_str().unwrap().into(),
                    u["region"].as_str().unwrap().into(),
                )
            })
            .collect();
        users
            == [
                ("ana".to_string(), "us-east-1".to_string()),
                ("bo".to_string(), "eu-central-1".to_string()),
            ]
    };
    for s in [&mut ana, &mut bo] {
        loop {
            let f = s.expect("PRESENCE").await;
            if both(&f) {
                break;
            }
        }
    }
    // A graft made in one region reaches the other region's session.
    ana.send(json!({"type": "MUTATE", "opId": "g", "op": "GRAFT",
        "agent": "SecurityAgent", "afterStep": "Step1"}))
        .await;
    ana.expect("ACK").await;
    let state = bo.state_where(|s| agents(s) == ["SecurityAgent"]).await;
    assert_eq!(state["grafts"][0]["region"], "us-east-1");
    // Leaving is seen across regions.
    drop(bo);
    loop {
        let f = ana.expect("PRESENCE").await;
        if f["users"].as_array().unwrap().len() == 1 {
            assert_eq!(f["users"][0]["user"], "ana");
            break;
        }
    }
    let (_, list) = c.get(&mesh.node(1).url("/api/crdt/runs")).await;
    let entry = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["runId"] == json!(run))
        .cloned()
        .expect("the run is listed in the other region");
    assert_eq!(entry["viewers"], 1, "ana, seen from eu-central-1: {entry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_are_served_from_the_binary() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[("CRDT_API_TOKEN", "sesame")]);
    let http = reqwest::Client::new();
    // Pages need no token (they ask for it); the API behind them does.
    for (path, kind, needle) in [
        ("/", "text/html", "/assets/list.js"),
        (
            &format!("/runs/{}", Uuid::new_v4()),
            "text/html",
            "/assets/run.js",
        ),
        ("/mesh", "text/html", "/assets/mesh.js"),
        ("/assets/run.js", "text/javascript", "/ws/runs/"),
        ("/assets/app.css", "text/css", "--accent"),
    ] {
        let res = http.get(node.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let ct = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        assert!(res.text().await.unwrap().contains(needle), "{path}");
    }
    for (path, status) in [("/runs/nope", 400), ("/assets/secret.txt", 404)] {
        let res = http.get(node.url(path)).send().await.unwrap();
        assert_eq!(res.status(), status, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_says_going_away_to_every_session() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut node = Node::spawn(&db, &[]);
    let run = Uuid::new_v4();
    let mut joined = Session::join(&node, run, "ana").await;
    joined.expect("STATE").await;
    let mut unjoined = Session::open(&node, run).await;
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = node.terminate(20);
        (node, status)
    });
    for s in [&mut joined, &mut unjoined] {
        let (code, reason) = s.closed().await;
        assert_eq!(code, 1001, "{reason}");
    }
    let (_node, status) = status.await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "open sessions held the shutdown up: {:?}",
        started.elapsed()
    );
}

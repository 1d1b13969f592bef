//! The multi-region mesh, tested with real node processes on loopback, each with its own
//! database, linked through fault-injecting proxies.

use test_support as common;

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::mesh::{
    converged, holds, lone_node, raw_peer, replicated, ws_url, TestMesh, Ws, SECRET,
};
use common::{eventually, metric, run_url, Backend, Client, Node};
use run_wire::mesh as protocol;

const REGIONS: [&str; 3] = ["us-east-1", "eu-central-1", "ap-southeast-1"];
const FULL: [(usize, usize); 3] = [(0, 1), (0, 2), (1, 2)];
/// As deployed: every node dials every other, so each pair has two links.
const BOTH_WAYS: [(usize, usize); 6] = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)];

fn graft(agent: &str, user: &str) -> Value {
    json!({"agent": agent, "afterStep": "Step1", "user": user})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_two_regions_graft_at_once() {
    let mesh = TestMesh::start(Backend::Sqlite, &REGIONS, &BOTH_WAYS).await;
    let c = Client::new();
    mesh.wait_connected(&c, 2).await;
    let run = Uuid::new_v4();
    let (url_a, url_b) = (
        run_url(mesh.node(0), run, "/grafts"),
        run_url(mesh.node(1), run, "/grafts"),
    );
    let (body_a, body_b) = (
        graft("SecurityAgent", "alice"),
        graft("PerformanceAgent", "bob"),
    );
    let (a, b) = tokio::join!(c.post(&url_a, &body_a), c.post(&url_b, &body_b));
    assert_eq!((a.0, b.0), (201, 201), "{a:?} {b:?}");
    let state = converged(&c, &mesh.nodes(), run, 20).await;
    let grafts = state["grafts"].as_array().expect("grafts");
    assert_eq!(grafts.len(), 2, "{state}");
    let by_agent = |name: &str| {
        grafts
            .iter()
            .find(|g| g["agent"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {state}"))
    };
    let sec = by_agent("SecurityAgent");
    let perf = by_agent("PerformanceAgent");
    assert_eq!(sec["region"], "us-east-1");
    assert_eq!(perf["region"], "eu-central-1");
    assert_eq!(sec["afterStep"], "Step1");
    assert!(sec["lamport"].as_u64().unwrap() >= 1 && perf["lamport"].as_u64().unwrap() >= 1);
    // The grafts carry the ids and stamps their regions acknowledged.
    assert_eq!(sec["id"], a.1["graft"]["id"]);
    assert_eq!(perf["lamport"], b.1["graft"]["lamport"]);
    // Every region's clock has seen both stamps.
    let top = sec["lamport"]
        .as_u64()
        .max(perf["lamport"].as_u64())
        .unwrap();
    for n in mesh.nodes() {
        let (_, s) = c.get(&run_url(n, run, "/state")).await;
        assert!(s["lamport"].as_u64().unwrap() >= top, "{s}");
    }
    let text = c.text(&mesh.node(2).url("/actuator/prometheus")).await;
    assert!(metric(&text, "crdt_sync_messages_total{direction=\"in\"}").unwrap() >= 2.0);
    assert_eq!(metric(&text, "crdt_mesh_peers_connected"), Some(2.0));
}

/// A small deterministic generator, so a failing mix can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Acked {
    grafts: Vec<String>,
    heads: Vec<Vec<String>>,
}

/// One random mutation on `node`; returns the response when the node acknowledged it.
async fn random_op(c: &Client, node: &Node, run: Uuid, rng: &mut Rng, tag: &str) -> Option<Value> {
    let step = format!("Step{}", rng.below(4));
    let key = format!("k{}", rng.below(3));
    let (status, body) = match rng.below(6) {
        0 | 1 => {
            c.post(
                &run_url(node, run, "/grafts"),
                &json!({"agent": format!("{tag}-agent-{}", rng.below(1000)), "afterStep": step, "user": tag}),
            )
            .await
        }
        2 => {
            c.post(
                &run_url(node, run, "/pruned-steps"),
                &json!({"stepId": step, "user": tag}),
            )
            .await
        }
        3 => {
            c.delete(&run_url(node, run, &format!("/pruned-steps/{step}?user={tag}")))
                .await
        }
        4 => {
            c.put(
                &run_url(node, run, &format!("/flags/{key}")),
                &json!({"value": {"by": tag, "n": rng.below(100)}, "user": tag}),
            )
            .await
        }
        _ => c.delete(&run_url(node, run, &format!("/flags/{key}"))).await,
    };
    (200..300).contains(&status).then_some(body)
}

async fn partition_rounds(backend: Backend, rounds: u64, ops: usize) {
    let mesh = TestMesh::start(backend, &REGIONS, &FULL).await;
    let c = Client::new();
    mesh.wait_connected(&c, 2).await;
    let run = Uuid::new_v4();
    let mut acked = Acked::default();
    for seed in 1..=rounds {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x1000_0001));
        // Isolate one region from the other two, or all three from each other.
        let split = rng.below(4) as usize;
        if split < 3 {
            mesh.partition(&[split]);
        } else {
            for i in 0..3 {
                mesh.partition(&[i]);
            }
        }
        let mut seeds: Vec<Rng> = (0..3).map(|i| Rng(rng.next() ^ (i + 1))).collect();
        let writes = (0..3).map(|i| {
            let c = c.clone();
            let node = mesh.node(i);
            let mut r = Rng(seeds[i].next());
            async move {
                let mut out = Vec::new();
                for _ in 0..ops {
                    if let Some(body) = random_op(&c, node, run, &mut r, REGIONS[i]).await {
                        out.push(body);
                    }
                }
                out
            }
        });
        let results = futures_util::future::join_all(writes).await;
        for body in results.into_iter().flatten() {
            if let Some(id) = body["graft"]["id"].as_str() {
                acked.grafts.push(id.to_string());
            }
            if body["changed"] == true {
                let heads = body["heads"].as_array().unwrap();
                acked.heads.push(
                    heads
                        .iter()
                        .map(|h| h.as_str().unwrap().to_string())
                        .collect(),
                );
            }
        }
        mesh.heal_all();
        let state = converged(&c, &mesh.nodes(), run, 40).await;
        let present: BTreeSet<&str> = state["grafts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g["id"].as_str())
            .collect();
        for id in &acked.grafts {
            assert!(
                present.contains(id.as_str()),
                "seed {seed}: graft {id} lost"
            );
        }
    }
    // Every acknowledged change, whatever it did, is in every region's document.
    for heads in &acked.heads {
        for (i, n) in mesh.nodes().into_iter().enumerate() {
            assert!(holds(&c, n, run, heads).await, "node {i} lacks {heads:?}");
        }
    }
    assert!(
        acked.heads.len() as u64 >= rounds * 3,
        "too few writes landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_heal_to_identical_state_sqlite() {
    partition_rounds(Backend::Sqlite, 8, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_heal_to_identical_state_postgres() {
    partition_rounds(Backend::Postgres, 5, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_keeps_what_it_acknowledged() {
    let mut mesh = TestMesh::start(Backend::Sqlite, &REGIONS[..2], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    let url = run_url(mesh.node(1), run, "/grafts");
    let writer = {
        let http = reqwest::Client::new();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..400 {
                // A request the kill cuts off was never acknowledged.
                let Ok(response) = http
                    .post(&url)
                    .json(&graft(&format!("agent-{i}"), "crash"))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                else {
                    break;
                };
                if response.status() != 201 {
                    break;
                }
                let Ok(body) = response.json::<Value>().await else {
                    break;
                };
                acked.push(body["graft"]["id"].as_str().unwrap().to_string());
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    mesh.kill(1);
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty(), "no write landed before the kill");
    mesh.restart(1);
    mesh.wait_connected(&c, 1).await;
    let state = converged(&c, &mesh.nodes(), run, 30).await;
    let present: BTreeSet<&str> = state["grafts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["id"].as_str())
        .collect();
    for id in &acked {
        assert!(
            present.contains(id.as_str()),
            "acknowledged graft {id} lost"
        );
    }
}

/// Mutations sized around the doors' limits: what one region acknowledges, the other takes
/// over the mesh and loads again after SIGKILL; what is refused (413) reaches no region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_at_the_limits_replicate_and_load_in_every_region() {
    let mut mesh = TestMesh::start(Backend::Sqlite, &REGIONS[..2], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    let limit = run_doc::rules::MAX_FLAG_VALUES;
    let text = run_doc::rules::MAX_FLAG_TEXT_BYTES;
    let cases = [
        ("values-under", json!(vec![1; limit - 1]), 200),
        ("values-over", json!(vec![1; limit + 1]), 413),
        ("text-at", json!("t".repeat(text)), 200),
        ("text-over", json!("t".repeat(text + 1)), 413),
        ("far-over", json!(vec![0; 150_000]), 413),
    ];
    for (key, value, expected) in cases {
        let url = run_url(mesh.node(0), run, &format!("/flags/{key}"));
        let (s, body) = c.put(&url, &json!({"value": value, "user": "u"})).await;
        assert_eq!(s, expected, "{key}: {body}");
    }
    let (s, _) = c
        .post(&run_url(mesh.node(0), run, "/grafts"), &graft("After", "u"))
        .await;
    assert_eq!(s, 201);
    let before = converged(&c, &mesh.nodes(), run, 30).await;
    let keys: BTreeSet<&str> = before["flags"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["text-at", "values-under"]));
    mesh.kill(1);
    mesh.restart(1);
    let (s, after) = c.get(&run_url(mesh.node(1), run, "/state")).await;
    assert_eq!(s, 200);
    assert_eq!(
        replicated(&after),
        replicated(&before),
        "region 2 loads what it took"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_converges_without_a_direct_link() {
    // A dials B, C dials B: A and C never meet.
    let mesh = TestMesh::start(Backend::Sqlite, &REGIONS, &[(0, 1), (2, 1)]).await;
    let c = Client::new();
    let ok = eventually(30, || async {
        let (_, b) = c.get(&mesh.node(1).url("/api/crdt/mesh/status")).await;
        (b["connectedPeers"] == 2).then_some(())
    })
    .await;
    assert!(ok.is_some(), "{}", mesh.node(1).log_text());
    let run = Uuid::new_v4();
    let (s1, _) = c
        .post(&run_url(mesh.node(0), run, "/grafts"), &graft("FromA", "a"))
        .await;
    let (s2, _) = c
        .post(&run_url(mesh.node(2), run, "/grafts"), &graft("FromC", "c"))
        .await;
    assert_eq!((s1, s2), (201, 201));
    let state = converged(&c, &mesh.nodes(), run, 20).await;
    assert_eq!(state["grafts"].as_array().unwrap().len(), 2, "{state}");
    let (_, a) = c.get(&mesh.node(0).url("/api/crdt/mesh/status")).await;
    assert_eq!(a["connectedPeers"], 1, "{a}");

    // One more change from A: B forwards it to C once, and nobody sends it back.
    let out = |i: usize| {
        let c = c.clone();
        let url = mesh.node(i).url("/actuator/prometheus");
        async move {
            metric(
                &c.text(&url).await,
                "crdt_sync_messages_total{direction=\"out\"}",
            )
            .unwrap_or(-1.0)
        }
    };
    let before = [out(0).await, out(1).await, out(2).await];
    let (s, _) = c
        .post(&run_url(mesh.node(0), run, "/grafts"), &graft("Third", "a"))
        .await;
    assert_eq!(s, 201);
    let state = converged(&c, &mesh.nodes(), run, 20).await;
    assert_eq!(state["grafts"].as_array().unwrap().len(), 3, "{state}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = [out(0).await, out(1).await, out(2).await];
    let sent: Vec<f64> = (0..3).map(|i| after[i] - before[i]).collect();
    assert_eq!(sent, vec![1.0, 1.0, 0.0], "frames sent by A, B, C");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_claimed_by_two_nodes_is_reported() {
    let mesh = TestMesh::start(Backend::Sqlite, &["us-east-1", "us-east-1"], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    for (i, m) in mesh.members.iter().enumerate() {
        let (_, s) = c.get(&m.node.url("/api/crdt/mesh/status")).await;
        let conflicts = &s["regionConflicts"];
        assert_eq!(conflicts[0]["region"], "us-east-1", "node {i}: {s}");
        let ids: BTreeSet<&str> = conflicts[0]["nodeIds"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            ids,
            BTreeSet::from([
                mesh.members[0].node_id.as_str(),
                mesh.members[1].node_id.as_str()
            ])
        );
        assert!(
            m.node.log_text().contains("claimed by more than one node"),
            "node {i} did not warn"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_link_is_dropped_and_reconnected() {
    let mesh = TestMesh::start(Backend::Sqlite, &REGIONS[..2], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    mesh.links[0].proxy.blackhole();
    // Silence, not a closed socket: only the heartbeat can notice.
    mesh.wait_connected(&c, 0).await;
    // And the dead link's sockets are closed, not left to TCP's own timeouts.
    let closed = eventually(10, || async {
        (mesh.links[0].proxy.open_connections() == 0).then_some(())
    })
    .await;
    assert!(closed.is_some(), "the dead link's connection stayed open");
    let text = c.text(&mesh.node(0).url("/actuator/prometheus")).await;
    assert_eq!(metric(&text, "crdt_mesh_peers_connected"), Some(0.0));
    let run = Uuid::new_v4();
    let (s, _) = c
        .post(
            &run_url(mesh.node(0), run, "/grafts"),
            &graft("WhileDown", "a"),
        )
        .await;
    assert_eq!(s, 201);
    mesh.heal_all();
    mesh.wait_connected(&c, 1).await;
    let state = converged(&c, &mesh.nodes(), run, 20).await;
    assert_eq!(state["grafts"][0]["agent"], "WhileDown");
    let (_, status) = c.get(&mesh.node(0).url("/api/crdt/mesh/status")).await;
    let link = &status["peers"][0];
    assert_eq!(link["url"], mesh.links[0].proxy.url());
    assert_eq!(link["connected"], true);
    assert_eq!(link["nodeId"], mesh.members[1].node_id);
    assert_eq!(link["region"], "eu-central-1");
    assert!(link["reconnects"].as_u64().unwrap() >= 1, "{status}");
    assert!(link["lastSeen"].is_string() && link["messagesIn"].as_u64().unwrap() > 0);
    let rtt = eventually(10, || async {
        let (_, s) = c.get(&mesh.node(0).url("/api/crdt/mesh/status")).await;
        s["peers"][0]["rttMs"].as_f64()
    })
    .await;
    assert!(
        rtt.is_some_and(|ms| ms > 0.0),
        "no round-trip time measured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_peer_syncs_the_run_to_that_region() {
    let mesh = TestMesh::start(Backend::Sqlite, &REGIONS[..2], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    c.post(&run_url(mesh.node(0), run, "/grafts"), &graft("G", "a"))
        .await;
    let (s, body) = c
        .post(
            &run_url(mesh.node(0), run, "/register-peer"),
            &json!({"peerRegion": "eu-central-1"}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["connected"], true);
    assert_eq!(body["syncing"], 1);
    let (_, status) = c.get(&mesh.node(0).url("/api/crdt/mesh/status")).await;
    assert_eq!(
        status["registrations"][run.to_string()],
        json!(["eu-central-1"])
    );
    converged(&c, &mesh.nodes(), run, 20).await;
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
            Message::Close(c) => {
                return json!({"closed": c.map(|c| (u16::from(c.code), c.reason.to_string()))})
            }
            _ => continue,
        }
    }
}

/// A raw client that speaks the handshake with `secret`; returns the socket after it.
async fn handshake(node: &Node, secret: &str) -> (Ws, Value) {
    let mut ws = raw_peer(node, secret, "raw-test", "test-1").await;
    // The node's own AUTH comes first; then either the catch-up starts or the link closes.
    let mut reply = next_json(&mut ws).await;
    while reply["type"] == "AUTH" {
        reply = next_json(&mut ws).await;
    }
    (ws, reply)
}

/// Opens a link to `node` and says HELLO only: the node must answer nothing that proves it.
async fn assert_no_proof_to_a_bare_hello(node: &Node) {
    let url = ws_url(node);
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "HELLO");
    ws.send(Message::text(
        json!({"type": "HELLO", "nodeId": "relay", "region": "r-1", "protocolVersion": 1, "nonce": protocol::nonce()})
            .to_string(),
    ))
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
        assert!(
            !matches!(msg, Message::Text(_)),
            "the node answered a bare HELLO: {msg:?}"
        );
    }
}

/// Sends one bad frame after another over an authenticated link; the reasons of the `ERROR`s.
async fn errors_for_bad_frames(node: &Node) -> Vec<String> {
    let (mut ws, _first) = handshake(node, SECRET).await;
    let mut errors = Vec::new();
    for bad in [
        "this is not JSON".to_string(),
        json!({"type": "CRDT_TELEPORT"}).to_string(),
        json!({"type": "CRDT_SYNC", "runId": "../../etc/passwd", "sourceRegion": "x", "changes": "AAAA", "timestamp": 1}).to_string(),
        json!({"type": "CRDT_SYNC", "runId": Uuid::new_v4(), "sourceRegion": "x", "changes": "%%%", "timestamp": 1}).to_string(),
        json!({"type": "CRDT_SYNC", "runId": Uuid::new_v4(), "sourceRegion": "x", "changes": "aGVsbG8gd29ybGQ=", "timestamp": 1}).to_string(),
        json!({"type": "CRDT_FULL_SYNC", "runId": Uuid::new_v4(), "sourceRegion": "x", "state": "aGVsbG8=", "timestamp": 1}).to_string(),
    ] {
        ws.send(Message::text(bad)).await.unwrap();
        loop {
            let f = next_json(&mut ws).await;
            assert!(f.get("closed").is_none(), "link closed: {f}");
            if f["type"] == "ERROR" {
                errors.push(f["reason"].as_str().unwrap().to_string());
                break;
            }
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_and_bad_frames_are_refused_and_counted() {
    let mesh = TestMesh::start(Backend::Sqlite, &REGIONS[..2], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let target = mesh.node(1);

    // A node with the wrong secret is closed with a reason and never counts as a peer.
    let (intruder, _intruder_db) = lone_node(
        "ap-southeast-1",
        "intruder",
        &[ws_url(target)],
        &[("CRDT_MESH_SECRET", "not-the-secret")],
    )
    .await;
    assert_refused_for_the_secret(&c, &intruder).await;
    let (_, s) = c.get(&target.url("/api/crdt/mesh/status")).await;
    assert_eq!(s["connectedPeers"], 1, "{s}");

    // A node that accepted a link proves nothing before the dialler has: no AUTH comes back to
    // a HELLO alone, so a relay cannot borrow its proof to pose as it elsewhere.
    assert_no_proof_to_a_bare_hello(target).await;

    // The raw handshake with a wrong proof: closed with the auth code.
    let (_, reply) = handshake(target, "wrong").await;
    assert_eq!(reply["closed"][0], run_wire::close::UNAUTHORIZED, "{reply}");

    // With the right secret, bad frames are answered with a reason; the link stays up.
    let errors = errors_for_bad_frames(target).await;
    assert!(errors[0].contains("not JSON"), "{errors:?}");
    assert!(errors[1].contains("unknown message type"), "{errors:?}");
    assert!(errors[2].contains("not a run id"), "{errors:?}");
    assert!(errors[3].contains("base64"), "{errors:?}");
    assert!(errors[4].contains("Automerge"), "{errors:?}");
    assert!(errors[5].contains("Automerge document"), "{errors:?}");
    let text = c.text(&target.url("/actuator/prometheus")).await;
    assert!(metric(&text, "crdt_sync_failures_total{reason=\"decode\"}").unwrap() >= 5.0);
    assert!(metric(&text, "crdt_sync_failures_total{reason=\"bad_run_id\"}").unwrap() >= 1.0);
    assert!(metric(&text, "crdt_sync_failures_total{reason=\"auth\"}").unwrap() >= 1.0);

    // The real link still carries changes both ways.
    let run = Uuid::new_v4();
    c.post(
        &run_url(mesh.node(0), run, "/grafts"),
        &graft("StillWorks", "a"),
    )
    .await;
    c.post(
        &run_url(mesh.node(1), run, "/grafts"),
        &graft("BothWays", "b"),
    )
    .await;
    let state = converged(&c, &mesh.nodes(), run, 20).await;
    assert_eq!(state["grafts"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_peers_connect_through_tls_and_verify_the_certificate() {
    let c = Client::new();
    let (b, _db_b) = lone_node("eu-central-1", "tls-b", &[], &[]).await;
    let front = common::tls::TlsFront::start(&b.base).await;

    // Trusting the front's certificate: the link comes up over TLS.
    let ca = front.ca_file.display().to_string();
    let (a, _db_a) = lone_node(
        "us-east-1",
        "tls-a",
        &[front.url()],
        &[("SSL_CERT_FILE", &ca)],
    )
    .await;
    let up = eventually(20, || async {
        let (_, s) = c.get(&a.url("/api/crdt/mesh/status")).await;
        (s["connectedPeers"] == 1).then_some(s)
    })
    .await;
    assert!(up.is_some(), "{}", a.log_text());
    let run = Uuid::new_v4();
    c.post(&run_url(&a, run, "/grafts"), &graft("OverTls", "a"))
        .await;
    let state = converged(&c, &[&a, &b], run, 20).await;
    assert_eq!(state["grafts"][0]["agent"], "OverTls");

    // Not trusting it: the certificate is refused and the link never comes up.
    let (x, _db_x) = lone_node("ap-southeast-1", "tls-x", &[front.url()], &[]).await;
    let refused = eventually(20, || async {
        let (_, s) = c.get(&x.url("/api/crdt/mesh/status")).await;
        s["peers"][0]["lastError"].as_str().map(String::from)
    })
    .await;
    let (_, s) = c.get(&x.url("/api/crdt/mesh/status")).await;
    assert_eq!(s["connectedPeers"], 0, "{s}");
    assert!(
        refused.is_some_and(|e| e.to_lowercase().contains("cert")),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_larger_than_a_frame_is_sent_in_pieces() {
    let limit = "65536";
    let mesh = TestMesh::start_with(
        Backend::Sqlite,
        &REGIONS[..2],
        &[(0, 1)],
        &[
            ("CRDT_MESH_MAX_FRAME_BYTES", limit),
            ("CRDT_MAX_BODY_BYTES", "32768"),
        ],
    )
    .await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    // `shared` exists on both sides before the split; `alone` only on one side after it.
    let (shared, alone) = (Uuid::new_v4(), Uuid::new_v4());
    c.post(
        &run_url(mesh.node(0), shared, "/grafts"),
        &graft("Seed", "a"),
    )
    .await;
    converged(&c, &mesh.nodes(), shared, 20).await;
    mesh.partition(&[0]);
    mesh.wait_connected(&c, 0).await;
    // Random agent names compress poorly: each run grows well past one 64 KiB frame.
    for run in [shared, alone] {
        for _ in 0..500 {
            let agent: String = (0..6)
                .map(|_| Uuid::new_v4().simple().to_string())
                .collect();
            let (s, b) = c
                .post(
                    &run_url(mesh.node(0), run, "/grafts"),
                    &graft(&agent, "big"),
                )
                .await;
            assert_eq!(s, 201, "{b}");
        }
    }
    mesh.heal_all();
    for (run, n) in [(shared, 501), (alone, 500)] {
        let state = converged(&c, &mesh.nodes(), run, 30).await;
        assert_eq!(state["grafts"].as_array().unwrap().len(), n);
    }
    let log = mesh.node(0).log_text();
    assert!(log.contains("saves to"), "the whole-run path was not taken");
    assert!(
        log.contains("a sync message of"),
        "the sync path was not split"
    );
    let text = c.text(&mesh.node(0).url("/actuator/prometheus")).await;
    assert_eq!(
        metric(&text, "crdt_sync_failures_total{reason=\"too_large\"}"),
        None,
        "nothing was dropped for size"
    );
}

/// The log line of a node's latest catch-up, once it has had more than one.
async fn later_catchup(node: &Node) -> String {
    eventually(10, || async {
        let log = node.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("catch-up with"))
            .collect();
        (lines.len() >= 2).then(|| lines[lines.len() - 1].to_string())
    })
    .await
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_syncs_only_the_runs_that_changed() {
    let mut mesh = TestMesh::start(Backend::Sqlite, &REGIONS[..2], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let runs: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for run in &runs {
        c.post(
            &run_url(mesh.node(0), *run, "/grafts"),
            &graft("Before", "a"),
        )
        .await;
    }
    for run in &runs {
        converged(&c, &mesh.nodes(), *run, 20).await;
    }
    mesh.partition(&[0]);
    mesh.wait_connected(&c, 0).await;
    let (s, _) = c
        .post(
            &run_url(mesh.node(1), runs[3], "/grafts"),
            &graft("During", "b"),
        )
        .await;
    assert_eq!(s, 201);
    mesh.heal_all();
    mesh.wait_connected(&c, 1).await;
    let state = converged(&c, &mesh.nodes(), runs[3], 20).await;
    assert_eq!(state["grafts"].as_array().unwrap().len(), 2);
    // Both ends compared heads digests: only the run written during the partition was synced.
    for i in 0..2 {
        let line = later_catchup(mesh.node(i)).await;
        assert!(
            line.contains("1 shared runs syncing, 0 sent whole, 19 already in sync"),
            "node {i}: {line}"
        );
    }

    // A restarted node knows no digests: its first catch-up visits every run, but the runs it
    // loads only for that are unloaded again soon after, and their digests stay known.
    mesh.restart(1);
    mesh.wait_connected(&c, 1).await;
    for run in &runs {
        converged(&c, &mesh.nodes(), *run, 20).await;
    }
    let loaded = eventually(20, || async {
        let text = c.text(&mesh.node(1).url("/actuator/prometheus")).await;
        (metric(&text, "crdt_runs_loaded") == Some(0.0)).then_some(())
    })
    .await;
    assert!(loaded.is_some(), "runs loaded for catch-up stayed loaded");
    mesh.partition(&[0]);
    mesh.wait_connected(&c, 0).await;
    mesh.heal_all();
    mesh.wait_connected(&c, 1).await;
    let line = later_catchup(mesh.node(1)).await;
    assert!(
        line.contains("0 shared runs syncing, 0 sent whole, 20 already in sync"),
        "after restart: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_bounded() {
    // A peer timeout long enough that no idle socket times out while the test fills the places.
    let (node, _db) = lone_node(
        "us-east-1",
        "busy",
        &[],
        &[
            ("CRDT_MESH_PEER_TIMEOUT_MS", "30000"),
            ("CRDT_PRE_AUTH_TIMEOUT_MS", "30000"),
        ],
    )
    .await;
    let url = ws_url(&node);
    // 64 sockets that never say who they are, from 8 networks (each within its share),
    // fill every handshake place…
    let mut idle = Vec::new();
    for net in 10..18 {
        let (open, refused) = common::flood(&format!("127.0.{net}.1"), &url, 8).await;
        assert_eq!(refused, 0);
        idle.extend(open);
    }
    // …so the next one takes the place of the oldest, which is closed (1013), and the HTTP
    // API keeps answering.
    let _newcomer = common::ws_from("127.0.30.1", &url)
        .await
        .expect("a newcomer is let in");
    let evicted = tokio::time::timeout(Duration::from_secs(5), closing(&mut idle[0])).await;
    assert_eq!(
        evicted.ok().flatten(),
        Some(run_wire::close::TRY_AGAIN_LATER),
        "the oldest is evicted"
    );
    let c = Client::new();
    let (s, _) = c.get(&node.url("/actuator/health")).await;
    assert_eq!(s, 200);
    // Places free up as those sockets go.
    drop(idle);
    let ok = eventually(10, || async {
        tokio_tungstenite::connect_async(url.as_str())
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    assert!(ok.is_some(), "handshake places were not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_closes_its_links_and_exits_promptly() {
    // Linked directly (no proxy), both ways, as deployed.
    let c = Client::new();
    let (mut b, _db_b) = lone_node("eu-central-1", "stop-b", &[], &[]).await;
    let (a, _db_a) = lone_node("us-east-1", "stop-a", &[ws_url(&b)], &[]).await;
    let up = eventually(20, || async {
        let (_, s) = c.get(&a.url("/api/crdt/mesh/status")).await;
        (s["connectedPeers"] == 1).then_some(())
    })
    .await;
    assert!(up.is_some());
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = b.terminate(15);
        (status, b)
    })
    .await
    .unwrap();
    let exited = status
        .0
        .expect("the node did not exit within 15 s of SIGTERM");
    assert!(exited.success(), "{exited:?}");
    // Well inside actix's 30 s wait for open connections: the links were closed first.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The peer heard why (before its redials find nobody there).
    let heard = eventually(10, || async {
        a.log_text()
            .contains("closed by peer (1001: node shutting down)")
            .then_some(())
    })
    .await;
    assert!(heard.is_some(), "{}", a.log_text());
}

/// Rotating the mesh secret: a node that proves with the new secret and still accepts the old
/// one links with a node that proves with the old one and already accepts the new one; a node
/// that knows only the new secret is refused by one that knows only the old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_secret_rotates_without_refusing_links() {
    let c = Client::new();
    let (old_side, _old_db) = lone_node(
        "us-east-1",
        "old-side",
        &[],
        &[
            ("CRDT_MESH_SECRET", "old"),
            ("CRDT_MESH_ACCEPT_SECRET", "new"),
        ],
    )
    .await;
    let (new_side, _new_db) = lone_node(
        "eu-central-1",
        "new-side",
        &[ws_url(&old_side)],
        &[
            ("CRDT_MESH_SECRET", "new"),
            ("CRDT_MESH_ACCEPT_SECRET", "old"),
        ],
    )
    .await;
    let linked = eventually(20, || async {
        let (_, s) = c.get(&new_side.url("/api/crdt/mesh/status")).await;
        (s["connectedPeers"] == 1).then_some(())
    })
    .await;
    assert!(linked.is_some(), "{}", new_side.log_text());
    let (only_old, _only_old_db) = lone_node(
        "ap-southeast-1",
        "only-old",
        &[],
        &[("CRDT_MESH_SECRET", "old")],
    )
    .await;
    let (only_new, _only_new_db) = lone_node(
        "sa-east-1",
        "only-new",
        &[ws_url(&only_old)],
        &[("CRDT_MESH_SECRET", "new")],
    )
    .await;
    assert_refused_for_the_secret(&c, &only_new).await;
}

/// Waits until `node`'s first configured peer has refused it for not knowing the secret.
async fn assert_refused_for_the_secret(c: &Client, node: &Node) {
    let refused = eventually(20, || async {
        let (_, s) = c.get(&node.url("/api/crdt/mesh/status")).await;
        s["peers"][0]["lastError"]
            .as_str()
            .filter(|e| e.contains("authentication failed"))
            .map(String::from)
    })
    .await;
    assert!(refused.is_some(), "{}", node.log_text());
}

/// Issue 12: an authenticated peer's bytes are bounded too. A whole-document sync holding a
/// chunk Automerge's loader allocates gigabytes for, and a change of a few KB inserting
/// 150,000 characters, are refused with an ERROR naming why; the node stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_loader_and_op_bombs_are_refused_with_the_reason() {
    let (node, _db) = lone_node("eu-central-1", "bombed", &[], &[]).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let (s, _) = c
        .post(
            &run_url(&node, run, "/grafts"),
            &json!({"agent": "A", "afterStep": "S", "user": "u"}),
        )
        .await;
    assert_eq!(s, 201);
    let (_, before) = c.get(&run_url(&node, run, "/state")).await;
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    let frames = [
        (
            json!({"type": "CRDT_FULL_SYNC", "runId": run, "sourceRegion": "test-1", "state": b64(&common::loader_bomb()), "timestamp": 1}),
            "not accepted",
        ),
        (
            json!({"type": "CRDT_SYNC", "runId": run, "sourceRegion": "test-1", "changes": b64(&common::op_bomb(run, 150_000)), "timestamp": 1}),
            "operations",
        ),
    ];
    // Built before the link opens: a silent link is closed within 1.5 s.
    let (mut ws, _) = handshake(&node, SECRET).await;
    for (frame, reason) in frames {
        ws.send(Message::text(frame.to_string())).await.unwrap();
        let error = loop {
            let f = next_json(&mut ws).await;
            if f["type"] == "ERROR" {
                break f;
            }
        };
        let got = error["reason"].as_str().unwrap_or_default();
        assert!(got.contains(reason), "{frame}: {error}");
    }
    let (status, after) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(status, 200, "the node keeps serving");
    assert_eq!(before["heads"], after["heads"], "nothing was applied");
    let peak = common::peak_rss_mib(node.pid());
    assert!(peak < 400, "peak RSS {peak} MiB");
}

/// Issue 12: a client whose graft timed out during a partition retries it, with the same id, in
/// the other region. After the heal both regions show one graft with that id (the same one),
/// and a further retry anywhere is answered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graft_retried_across_a_partition_is_shown_once_in_every_region() {
    let mesh = TestMesh::start(Backend::Sqlite, &REGIONS[..2], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    c.post(
        &run_url(mesh.node(0), run, "/grafts"),
        &graft("Before", "a"),
    )
    .await;
    converged(&c, &mesh.nodes(), run, 20).await;
    mesh.partition(&[0]);
    mesh.wait_connected(&c, 0).await;
    let id = Uuid::new_v4();
    let body = json!({"id": id, "agent": "Retried", "afterStep": "Step1", "user": "client"});
    for i in 0..2 {
        let (s, g) = c.post(&run_url(mesh.node(i), run, "/grafts"), &body).await;
        assert_eq!(s, 201, "{g}");
    }
    mesh.heal_all();
    mesh.wait_connected(&c, 1).await;
    let state = converged(&c, &mesh.nodes(), run, 20).await;
    let with_id: Vec<&Value> = state["grafts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["id"] == json!(id))
        .collect();
    assert_eq!(with_id.len(), 1, "{state}");
    let shown = with_id[0].clone();
    for i in 0..2 {
        let (s, g) = c.post(&run_url(mesh.node(i), run, "/grafts"), &body).await;
        assert!(s == 200 || s == 201, "{s} {g}");
        assert_eq!(g["graft"], shown, "node {i}: {g}");
        assert_eq!(g["changed"], false, "node {i}: {g}");
    }
    let (_, after) = c.get(&run_url(mesh.node(1), run, "/state")).await;
    assert_eq!(after["grafts"].as_array().unwrap().len(), 2, "{after}");
}

/// A socket opened from another loopback address (`common::flood`).
type Flooder = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// 64 sockets from 127.0.0.2 to automerge-repo's door: it upgrades a refused client and
/// closes it with 1013 and the reason (its JS client throws on a failed upgrade); the address's
/// share stays open, and is returned.
async fn flood_automerge_door(door: &str) -> Vec<Flooder> {
    let (upgraded, _) = common::flood("127.0.0.2", door, 64).await;
    let firsts = futures_util::future::join_all(upgraded.into_iter().map(|mut s| async move {
        let first = tokio::time::timeout(Duration::from_millis(500), s.next()).await;
        (s, first)
    }))
    .await;
    let mut open = Vec::new();
    for (s, first) in firsts {
        match first {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                assert_eq!(u16::from(f.code), 1013, "{f:?}");
                assert!(f.reason.contains("address"), "{f:?}");
            }
            Err(_) => open.push(s),
            other => panic!("unexpected: {other:?}"),
        }
    }
    assert_eq!(open.len(), 8, "automerge-repo: the address's share");
    open
}

/// Resolves once the socket is closed (whatever it says before).
/// Waits for the node to close `s`; the close code, if it sent one.
async fn closing(s: &mut Flooder) -> Option<u16> {
    loop {
        match s.next().await {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Issue 12: a host that opens unproven sockets on every door (a mesh link before AUTH, a
/// browser session before JOIN, an automerge-repo connection before `join`) gets only its
/// share of each (8 here), and they are closed after the pre-auth timeout; meanwhile a real
/// peer node, a browser client and an automerge-repo client from another address get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unproven_sockets_keeps_no_real_peer_or_client_out() {
    let limits = [
        ("CRDT_PRE_AUTH_PER_ADDRESS", "8"),
        ("CRDT_PRE_AUTH_TIMEOUT_MS", "2000"),
    ];
    let (target, _db) = lone_node("eu-central-1", "flooded", &[], &limits).await;
    let c = Client::new();
    let run = Uuid::new_v4();
    let ws = |path: &str| target.url(path).replace("http://", "ws://");
    let doors = [
        ws("/ws"),
        ws(&format!("/ws/runs/{run}")),
        ws("/ws/automerge"),
    ];
    // 64 sockets per door from 127.0.0.2, as the attack did.
    let mut held = Vec::new();
    for door in &doors[..2] {
        let (open, refused) = common::flood("127.0.0.2", door, 64).await;
        assert_eq!(open.len(), 8, "{door}: the address's share");
        assert_eq!(refused, 56, "{door}");
        held.push(open);
    }
    held.push(flood_automerge_door(&doors[2]).await);

    // A real peer, dialling from 127.0.0.1, links up while the flood holds its places.
    let (_peer, _peer_db) = lone_node("us-east-1", "real-peer", &[ws("/ws")], &[]).await;
    let up = eventually(10, || async {
        let (_, s) = c.get(&target.url("/api/crdt/mesh/status")).await;
        (s["connectedPeers"] == 1).then_some(())
    })
    .await;
    assert!(up.is_some(), "the real peer got in");

    // A real browser client joins.
    let (mut browser, _) = tokio_tungstenite::connect_async(&doors[1]).await.unwrap();
    browser
        .send(Message::text(
            json!({"type": "JOIN", "user": "ana"}).to_string(),
        ))
        .await
        .unwrap();
    let welcome = loop {
        let f = next_json(&mut browser).await;
        if f["type"] == "WELCOME" || f.get("closed").is_some() {
            break f;
        }
    };
    assert_eq!(welcome["type"], "WELCOME", "{welcome}");

    // A real automerge-repo client joins (answered with `peer`).
    let _repo = common::repo::Peer::joined(&target, "real").await;

    // The flood's sockets are closed once their time to prove themselves is up.
    for (door, sockets) in doors.iter().zip(held.iter_mut()) {
        for s in sockets.iter_mut() {
            let closed = tokio::time::timeout(Duration::from_secs(10), closing(s)).await;
            assert!(
                closed.is_ok(),
                "{door}: an unproven socket outlived its timeout"
            );
        }
    }
    // And their places are free again.
    let (open, _) = common::flood("127.0.0.2", &doors[1], 8).await;
    assert_eq!(open.len(), 8);
}

/// Keeps `per_address` unproven sockets open to `url` from each of `addresses`, each reopened
/// as soon as the node closes it, until `stop` is set.
fn reopening_flood(
    url: String,
    addresses: std::ops::Range<u8>,
    per_address: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<usize>> {
    let mut tasks = Vec::new();
    for host in addresses {
        for _ in 0..per_address {
            let (url, stop) = (url.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut opened = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match common::ws_from(&format!("127.0.0.{host}"), &url).await {
                        Ok(mut ws) => {
                            opened += 1;
                            let _ = tokio::time::timeout(Duration::from_secs(1), closing(&mut ws))
                                .await;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                opened
            }));
        }
    }
    tasks
}

/// Issue 18: 59 addresses × 16 reopening sockets kept a real peer out of the mesh for 90 s
/// and a browser client out for 30 s. Now a peer proves itself on the upgrade (it never
/// waits among the unproven), a client with a token on the upgrade likewise, and a full pool
/// evicts its oldest socket for a newcomer. A burst of 201 sockets from one address (one
/// service's clients behind one NAT) gets in at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_addresses_keeps_no_peer_or_client_out_and_a_burst_gets_in() {
    let token = "flood-test-token";
    let (target, _db) =
        lone_node("eu-central-1", "flooded", &[], &[("CRDT_API_TOKEN", token)]).await;
    let run = Uuid::new_v4();
    let ws = |path: &str| target.url(path).replace("http://", "ws://");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = reopening_flood(ws("/ws"), 10..40, 4, stop.clone());
    flood.extend(reopening_flood(
        ws(&format!("/ws/runs/{run}")),
        40..70,
        4,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A real peer links up at once.
    let started = std::time::Instant::now();
    let (_peer, _peer_db) = lone_node("us-east-1", "real-peer", &[ws("/ws")], &[]).await;
    let c = Client::with_token(token);
    let up = eventually(15, || async {
        let (_, s) = c.get(&target.url("/api/crdt/mesh/status")).await;
        (s["connectedPeers"] == 1).then_some(())
    })
    .await;
    assert!(up.is_some(), "the real peer got in");
    let peer_took = started.elapsed();

    // A client with its token on the upgrade joins the flooded browser door.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws(
            &format!("/ws/runs/{run}"),
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut browser, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    browser
        .send(Message::text(
            json!({"type": "JOIN", "user": "ana"}).to_string(),
        ))
        .await
        .unwrap();
    let welcome = loop {
        let f = next_json(&mut browser).await;
        if f["type"] == "WELCOME" || f.get("closed").is_some() {
            break f;
        }
    };
    assert_eq!(welcome["type"], "WELCOME", "{welcome}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut flood_sockets = 0;
    for task in flood {
        flood_sockets += task.await.unwrap_or(0);
    }
    assert!(
        peer_took < Duration::from_secs(10),
        "the peer took {peer_took:?}"
    );

    // A burst: 201 automerge-repo sockets from one address, each joining at once.
    let started = std::time::Instant::now();
    let joins = (0..201).map(|i| {
        let target = &target;
        async move {
            // All from 127.0.0.1: one address.
            let query = format!("?token={token}");
            let mut peer = common::repo::Peer::connect(target, &query, &format!("burst-{i}")).await;
            peer.join(&["1"]).await;
            let answer = peer.next().await;
            (common::repo::field(&answer, "type") == Some(common::repo::text("peer")))
                .then_some(peer)
        }
    });
    let joined: Vec<_> = futures_util::future::join_all(joins).await;
    let ok = joined.iter().filter(|p| p.is_some()).count();
    assert_eq!(ok, 201, "every socket of the burst got in at once");
    println!(
        "flood: {flood_sockets} sockets opened; the peer linked in {peer_took:?}; \
         a 201-socket burst joined in {:?}",
        started.elapsed()
    );
}

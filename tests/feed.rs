//! Issue 21: the change feed over real node processes. A run's stream replays, follows and
//! resumes by cursor across a SIGKILL; each region's node-wide stream, followed by a consumer
//! that drops and resumes at random through mixed writers (HTTP in both regions, a browser
//! session, an automerge-repo client), a SIGKILL and a mesh cut, carries exactly its node's
//! log, each change once, the other region's included; identity as on every door; bad
//! cursors refused with the reason.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc, ROOT};
use futures_util::SinkExt;
use serde_json::{json, Value};
use test_support as common;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::mesh::{converged, TestMesh};
use common::repo::{doc_id, Peer};
use common::sse::{Frame, Sse};
use common::{db, run_url, Backend, Client, Node, TestDb};

const WAIT: Duration = Duration::from_secs(10);

fn graft(agent: &str) -> Value {
    json!({"agent": agent, "afterStep": "s1", "user": "ann"})
}

fn events_url(node: &Node, run: Uuid) -> String {
    run_url(node, run, "/events")
}

/// The event's (kind, change hash).
fn kind_and_hash(f: &Frame) -> (String, String) {
    let j = f.json().expect("JSON data");
    (
        j["kind"].as_str().unwrap_or_default().to_string(),
        j["changeHash"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stream_replays_then_follows_and_resumes_after_a_kill() {
    let db = TestDb::new(Backend::Sqlite).await;
    let env = [("CRDT_FEED_HEARTBEAT_MS", "300")];
    let mut node = Node::spawn(&db, &env);
    let c = Client::new();
    let (run, other) = (Uuid::new_v4(), Uuid::new_v4());
    for i in 0..5 {
        assert_eq!(
            c.post(&run_url(&node, run, "/grafts"), &graft(&format!("A{i}")))
                .await
                .0,
            201
        );
    }
    c.post(&run_url(&node, other, "/grafts"), &graft("elsewhere"))
        .await;
    // From the beginning: the five grafts, in order, nothing of the other run.
    let mut stream = Sse::open(&format!("{}?after=0", events_url(&node, run)), None, None)
        .await
        .expect("opens");
    let mut replayed = Vec::new();
    for _ in 0..5 {
        replayed.push(stream.next_event(WAIT).await.expect("a replayed event"));
    }
    let ids: Vec<i64> = replayed.iter().filter_map(Frame::id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let first = replayed[0].json().unwrap();
    assert_eq!(first["kind"], "graft");
    assert_eq!(first["runId"], run.to_string());
    assert_eq!(first["content"]["graft"]["agent"], "A0");
    assert_eq!(
        (first["user"].as_str(), first["region"].as_str()),
        (Some("ann"), Some("us-east-1"))
    );
    assert_eq!(first["id"].as_i64(), Some(ids[0]));
    // Then live, each kind of mutation, and heartbeats while idle.
    let url = |rest: &str| run_url(&node, run, rest);
    c.post(
        &url("/pruned-steps"),
        &json!({"stepId": "s1", "user": "bo"}),
    )
    .await;
    c.put(
        &url("/flags/mode"),
        &json!({"value": {"deep": [1, 2]}, "user": "cy"}),
    )
    .await;
    c.delete(&url("/flags/mode")).await;
    c.delete(&url("/pruned-steps/s1")).await;
    let live: Vec<Value> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(
                stream
                    .next_event(WAIT)
                    .await
                    .expect("a live event")
                    .json()
                    .unwrap(),
            );
        }
        v
    };
    let kinds: Vec<&str> = live.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["prune", "setFlag", "deleteFlag", "unprune"]);
    assert_eq!(live[0]["content"], json!({"stepId": "s1", "user": "bo"}));
    assert_eq!(
        live[1]["content"],
        json!({"key": "mode", "value": {"deep": [1, 2]}})
    );
    assert_eq!(
        live[1]["user"], "cy",
        "the writer, as the token or request named them"
    );
    let mut heartbeat = false;
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while !heartbeat && tokio::time::Instant::now() < until {
        if let Some(f) = stream.next(Duration::from_secs(1)).await {
            assert!(
                matches!(f, Frame::Comment(_)),
                "nothing else happened: {f:?}"
            );
            heartbeat = matches!(f, Frame::Comment(ref c) if c == "keep-alive");
        }
    }
    assert!(heartbeat, "an idle stream carries heartbeats");
    let last = live[3]["id"].as_i64().unwrap();
    drop(stream);
    // Missed while away, then the node is killed and started again: the cursor still holds.
    for i in 5..7 {
        c.post(&url("/grafts"), &graft(&format!("A{i}"))).await;
    }
    node.kill();
    let node = Node::spawn(&db, &env);
    let mut resumed = Sse::open(&events_url(&node, run), Some(last), None)
        .await
        .expect("resumes");
    let missed = resumed.drain(Duration::from_secs(2)).await;
    let agents: Vec<Value> = missed
        .iter()
        .map(|f| f.json().unwrap()["content"]["graft"]["agent"].clone())
        .collect();
    assert_eq!(
        agents,
        [json!("A5"), json!("A6")],
        "exactly what followed the cursor"
    );
    // Without a cursor a stream starts live.
    let mut fresh = Sse::open(&events_url(&node, run), None, None)
        .await
        .unwrap();
    c.post(&run_url(&node, run, "/grafts"), &graft("A7")).await;
    let next = fresh.next_event(WAIT).await.expect("live");
    assert_eq!(next.json().unwrap()["content"]["graft"]["agent"], "A7");
    assert!(fresh.next_event(Duration::from_millis(700)).await.is_none());
    // The same event reaches the cursor-resumed stream too, once.
    let tail = resumed.drain(Duration::from_secs(1)).await;
    assert_eq!(tail.len(), 1);
    assert_eq!(kind_and_hash(&tail[0]), kind_and_hash(&next));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cursors_are_refused_with_the_reason() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let (run, other) = (Uuid::new_v4(), Uuid::new_v4());
    c.post(&run_url(&node, run, "/grafts"), &graft("A")).await;
    c.post(&run_url(&node, other, "/grafts"), &graft("B")).await;
    let others = Sse::open(&format!("{}?after=0", events_url(&node, other)), None, None)
        .await
        .unwrap()
        .drain(Duration::from_millis(500))
        .await;
    let foreign = others[0].id().unwrap();
    for (query, header, expect) in [
        ("?after=abc", None, "not a cursor"),
        ("?after=-1", None, "not a cursor"),
        ("", Some("x1"), "not a cursor"),
        ("?after=999999", None, "not an event"),
    ] {
        let mut rb = reqwest::Client::new().get(format!("{}{query}", events_url(&node, run)));
        if let Some(h) = header {
            rb = rb.header("Last-Event-ID", h);
        }
        let response = rb.send().await.unwrap();
        assert_eq!(response.status(), 400, "{query} {header:?}");
        let body: Value = response.json().await.unwrap();
        assert!(body["message"].as_str().unwrap().contains(expect), "{body}");
    }
    // Any cursor of this log is a position, also on another run's stream (a stream closed
    // after passing over another run's event is told to resume there).
    let mut s = Sse::open(
        &format!("{}?after={foreign}", events_url(&node, run)),
        None,
        None,
    )
    .await
    .expect("a position in the log");
    assert!(s.drain(Duration::from_millis(300)).await.is_empty());
    // The node-wide stream takes any of its cursors, and filters by `runs`.
    let url = node.url(&format!("/api/crdt/events?runs={other}"));
    let mut s = Sse::open(&url, Some(0), None).await.unwrap();
    let got = s.drain(Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json().unwrap()["runId"], other.to_string());
    let (status, _) = Sse::open(&node.url("/api/crdt/events?runs=nope"), None, None)
        .await
        .err()
        .unwrap();
    assert_eq!(status, 400);
}

const SECRET: &str = "feed-user-secret";
const SERVICE: &str = "feed-service";

fn token(sub: &str, runs: Value, role: &str) -> String {
    common::jwt::user_token(SECRET, sub, runs, role, 600)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_answer_to_identity_as_every_door_does() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(
        &db,
        &[
            ("CRDT_API_TOKEN", SERVICE),
            ("CRDT_JWT_HS256_SECRET", SECRET),
            ("CRDT_FEED_MAX_STREAMS_PER_USER", "5"),
            ("CRDT_FEED_HEARTBEAT_MS", "200"),
        ],
    );
    let service = Client::with_token(SERVICE);
    let (mine, theirs) = (Uuid::new_v4(), Uuid::new_v4());
    service
        .post(&run_url(&node, mine, "/grafts"), &graft("Mine"))
        .await;
    service
        .post(&run_url(&node, theirs, "/grafts"), &graft("Theirs"))
        .await;
    let reader = token("vic", json!([mine.to_string()]), "read");
    // No token: 401. Another run's token: 403. A read token streams its run.
    assert_eq!(
        Sse::open(&events_url(&node, mine), Some(0), None)
            .await
            .err()
            .unwrap()
            .0,
        401
    );
    let (status, body) = Sse::open(&events_url(&node, theirs), Some(0), Some(&reader))
        .await
        .err()
        .unwrap();
    assert_eq!(status, 403, "{body}");
    let mut s = Sse::open(&events_url(&node, mine), Some(0), Some(&reader))
        .await
        .unwrap();
    assert_eq!(s.drain(Duration::from_millis(500)).await.len(), 1);
    // The node-wide stream of a user token carries its runs only; naming another is 403.
    let all = node.url("/api/crdt/events");
    let mut s = Sse::open(&all, Some(0), Some(&reader)).await.unwrap();
    let got = s.drain(Duration::from_millis(700)).await;
    let runs: BTreeSet<String> = got
        .iter()
        .map(|f| f.json().unwrap()["runId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(runs, BTreeSet::from([mine.to_string()]));
    let named = format!("{all}?runs={theirs}");
    assert_eq!(
        Sse::open(&named, Some(0), Some(&reader))
            .await
            .err()
            .unwrap()
            .0,
        403
    );
    // One user holds a bounded number of streams (5 here; two of vic's are still open above);
    // a closed one gives its place back.
    let url = events_url(&node, mine);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            Sse::open(&url, None, Some(&reader))
                .await
                .expect("within the user's share"),
        );
    }
    let (status, body) = Sse::open(&url, None, Some(&reader)).await.err().unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body["message"].as_str().unwrap().contains("vic"), "{body}");
    drop(held.pop());
    let again = common::eventually(5, || async {
        Sse::open(&url, None, Some(&reader)).await.ok()
    })
    .await;
    assert!(again.is_some(), "the place came back");
    // The service credential sees every run; webhooks are for it alone.
    let mut s = Sse::open(&all, Some(0), Some(SERVICE)).await.unwrap();
    assert_eq!(s.drain(Duration::from_millis(700)).await.len(), 2);
    let (status, _) = Client::with_token(&reader)
        .post(
            &node.url("/api/crdt/webhooks"),
            &json!({"url": "http://127.0.0.1:9/x"}),
        )
        .await;
    assert_eq!(status, 403);
}

/// Follows `base()`'s node-wide stream, dropping the connection every few events and resuming
/// from its cursor, until `stop`; what it received, in order.
async fn follow(
    base: Arc<Mutex<String>>,
    stop: Arc<tokio::sync::Notify>,
    seed: u64,
) -> Vec<(Uuid, String)> {
    let mut rng = seed;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % 12 + 1
    };
    let (mut got, mut cursor) = (Vec::new(), 0i64);
    let stopped = stop.notified();
    tokio::pin!(stopped);
    let mut stopping = false;
    loop {
        let url = format!("{}/api/crdt/events", base.lock().unwrap().clone());
        let Ok(mut stream) = Sse::open(&url, Some(cursor), None).await else {
            // The node is down: try again shortly.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let take = next();
        let mut taken = 0;
        loop {
            let wait = if stopping {
                Duration::from_secs(3)
            } else {
                Duration::from_millis(500)
            };
            tokio::select! {
                frame = stream.next_event(wait) => match frame {
                    Some(f) => {
                        let j = f.json().expect("event data");
                        cursor = f.id().expect("an id");
                        got.push((
                            j["runId"].as_str().unwrap().parse().unwrap(),
                            j["changeHash"].as_str().unwrap().to_string(),
                        ));
                        taken += 1;
                        if taken >= take && !stopping {
                            break;
                        }
                    }
                    None if stopping => return got,
                    None => break,
                },
                _ = &mut stopped, if !stopping => stopping = true,
            }
        }
    }
}

/// Two regions; writers of every kind on both; a consumer per region on its node-wide stream
/// that drops and resumes at random; one node killed and restarted, the link cut for a while.
/// Each consumer ends with exactly its node's log, each change once, the other region's in it.
async fn each_region_s_stream_carries_its_log(backend: Backend) {
    let mut mesh = TestMesh::start(backend, &["us-east-1", "eu-central-1"], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let runs: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let bases: Vec<Arc<Mutex<String>>> = mesh
        .nodes()
        .iter()
        .map(|n| Arc::new(Mutex::new(n.base.clone())))
        .collect();
    let stop = Arc::new(tokio::sync::Notify::new());
    let consumers: Vec<_> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| tokio::spawn(follow(b.clone(), stop.clone(), 7 + i as u64)))
        .collect();
    let write = |i: usize, round: usize| {
        let (base, run, c) = (
            bases[i].lock().unwrap().clone(),
            runs[round % runs.len()],
            c.clone(),
        );
        async move {
            let url = format!("{base}/api/crdt/runs/{run}");
            c.post(&format!("{url}/grafts"), &graft(&format!("r{round}-n{i}")))
                .await;
            c.put(
                &format!("{url}/flags/f{round}"),
                &json!({"value": format!("{round}-{i}"), "user": "w"}),
            )
            .await;
        }
    };
    for round in 0..6 {
        write(0, round).await;
        write(1, round).await;
    }
    // A browser session in region 0 and an automerge-repo client in region 1.
    let session_url = format!(
        "{}/ws/runs/{}",
        mesh.node(0).base.replace("http://", "ws://"),
        runs[0]
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&session_url)
        .await
        .expect("session");
    ws.send(Message::text(
        json!({"type": "JOIN", "user": "ana"}).to_string(),
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        json!({"type": "MUTATE", "opId": "b-1", "op": "PRUNE", "stepId": "s9"}).to_string(),
    ))
    .await
    .unwrap();
    let mut peer = Peer::joined(mesh.node(1), "repo-client").await;
    let mut doc = AutoCommit::new();
    peer.sync_until_quiet(&doc_id(runs[1]), &mut doc).await;
    let flags = doc.get(ROOT, "flags").unwrap().expect("flags").1;
    doc.put(&flags, "fromRepo", "yes").unwrap();
    doc.commit();
    peer.sync_until_quiet(&doc_id(runs[1]), &mut doc).await;
    // Region 1 dies and comes back; then the link is cut while both write.
    mesh.kill(1);
    for round in 6..9 {
        write(0, round).await;
    }
    mesh.restart(1);
    *bases[1].lock().unwrap() = mesh.node(1).base.clone();
    mesh.wait_connected(&c, 1).await;
    mesh.partition(&[0]);
    for round in 9..12 {
        write(0, round).await;
        write(1, round).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    mesh.heal_all();
    mesh.wait_connected(&c, 1).await;
    for run in &runs {
        converged(&c, &mesh.nodes(), *run, 30).await;
    }
    stop.notify_waiters();
    let mut received = Vec::new();
    for consumer in consumers {
        received.push(consumer.await.unwrap());
    }
    for (i, got) in received.iter().enumerate() {
        let log = db::logged_changes(&mesh.members[i].db).await;
        let mut counts: HashMap<&(Uuid, String), usize> = HashMap::new();
        for e in got {
            *counts.entry(e).or_default() += 1;
        }
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "region {i} received changes twice: {twice:?}"
        );
        let got: BTreeSet<_> = got.iter().cloned().collect();
        let logged: BTreeSet<_> = log.iter().cloned().collect();
        assert_eq!(got, logged, "region {i}: the stream is the log");
        assert!(got.len() >= 40, "region {i} saw {} changes", got.len());
    }
    // Both regions hold the same changes, so each consumer saw the other region's too.
    let (a, b): (BTreeSet<_>, BTreeSet<_>) = (
        received[0].iter().cloned().collect(),
        received[1].iter().cloned().collect(),
    );
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_region_s_stream_carries_its_log_sqlite() {
    each_region_s_stream_carries_its_log(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_region_s_stream_carries_its_log_postgres() {
    each_region_s_stream_carries_its_log(Backend::Postgres).await;
}

/// A consumer that stops reading while thousands of events go by is closed with the reason
/// and the cursor to resume from; resuming there misses nothing and repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_left_behind_is_closed_and_resumes_from_its_cursor() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let runs: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let url = node.url("/api/crdt/events");
    let mut slow = Sse::open(&url, Some(0), None).await.expect("opens");
    // It reads nothing while 8,000 flags of 8 KB are written: past what the sockets' buffers
    // hold, and then past the ring's 4,096 events.
    const EVENTS: usize = 8_000;
    let value = "x".repeat(8_000);
    let writers = (0..8).map(|w| {
        let (c, node_base, runs, value) =
            (c.clone(), node.base.clone(), runs.clone(), value.clone());
        async move {
            for i in (w..EVENTS).step_by(8) {
                let run = runs[i % runs.len()];
                let url = format!("{node_base}/api/crdt/runs/{run}/flags/k{i}");
                let body = json!({"value": value, "user": "u"});
                assert_eq!(c.put(&url, &body).await.0, 200);
            }
        }
    });
    futures_util::future::join_all(writers).await;
    let mut seen = Vec::new();
    let closed = loop {
        match slow
            .next(Duration::from_secs(10))
            .await
            .expect("the stream goes on or closes")
        {
            Frame::Event {
                event: Some(e),
                data,
                ..
            } if e == "closed" => break serde_json::from_str::<Value>(&data).unwrap(),
            f @ Frame::Event { .. } => seen.push(f.id().unwrap()),
            Frame::Comment(_) => {}
        }
    };
    assert!(
        closed["reason"].as_str().unwrap().contains("too slow"),
        "{closed}"
    );
    let resume = closed["resumeAfter"].as_i64().unwrap();
    assert_eq!(
        Some(&resume),
        seen.last(),
        "the cursor of the last event it was sent"
    );
    assert!(seen.len() < EVENTS, "it was closed before the end");
    let mut again = Sse::open(&url, Some(resume), None).await.unwrap();
    seen.extend(
        again
            .drain(Duration::from_secs(2))
            .await
            .iter()
            .filter_map(Frame::id),
    );
    assert_eq!(seen.len(), EVENTS, "every event once");
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_outside_the_allowed_hosts_are_refused() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[("CRDT_WEBHOOK_ALLOWED_HOSTS", "*.example.com")]);
    let c = Client::new();
    let hooks = node.url("/api/crdt/webhooks");
    let (status, body) = c
        .post(&hooks, &json!({"url": "http://169.254.169.254/latest"}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("allowed"),
        "{body}"
    );
    let (status, body) = c
        .post(&hooks, &json!({"url": "https://hooks.example.com/crdt"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, listed) = c.get(&hooks).await;
    assert_eq!(
        listed["webhooks"][0]["url"],
        "https://hooks.example.com/crdt"
    );
    assert!(
        listed["webhooks"][0].get("secret").is_none(),
        "secrets are shown once"
    );
}

/// Subscriptions of the configuration are written at start, listed as such, cannot be removed
/// through the API, and go when the configuration no longer lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_subscriptions_follow_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(common::repo_path("config/application.yml")).unwrap();
    let with_hook = base.replace(
        "\ncrdt:\n",
        "\ncrdt:\n  feed:\n    webhooks:\n      subscriptions:\n        - id: ops-audit\n          \
         url: http://127.0.0.1:9/audit\n          secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n          \
         kinds: [graft, prune]\n      allowed-hosts: [127.0.0.1]\n",
    );
    assert_ne!(with_hook, base, "the configuration has a crdt: section");
    let (configured, plain) = (dir.path().join("hook.yml"), dir.path().join("plain.yml"));
    std::fs::write(&configured, with_hook).unwrap();
    std::fs::write(&plain, &base).unwrap();
    let db = TestDb::new(Backend::Sqlite).await;
    let binary = common::node_binary();
    let mut node = Node::spawn_binary(&binary, configured.to_str().unwrap(), &db, &[]);
    let c = Client::new();
    let hooks = node.url("/api/crdt/webhooks");
    let (_, listed) = c.get(&hooks).await;
    let hook = &listed["webhooks"][0];
    assert_eq!(
        (hook["id"].as_str(), hook["origin"].as_str()),
        (Some("ops-audit"), Some("config"))
    );
    assert_eq!(hook["kinds"], json!(["graft", "prune"]));
    let (status, body) = c.delete(&node.url("/api/crdt/webhooks/ops-audit")).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["message"].as_str().unwrap().contains("configuration"));
    node.terminate(20);
    let node = Node::spawn_binary(&binary, plain.to_str().unwrap(), &db, &[]);
    let (_, listed) = c.get(&node.url("/api/crdt/webhooks")).await;
    assert_eq!(
        listed["webhooks"],
        json!([]),
        "removed with the configuration's entry"
    );
}

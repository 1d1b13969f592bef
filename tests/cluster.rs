//! A region of several pods sharing one PostgreSQL database (`crdt.cluster`): one owner per
//! run, any pod answers, an owner that dies or stops hands its runs over, and nothing
//! acknowledged is lost. Real node processes on one real database.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use test_support::{db, Backend, Client, Node, TestDb};
use uuid::Uuid;

const LEASE_MS: &str = "2000";

/// What every pod of a region sharing a database is started with here.
const CLUSTER_ENV: [(&str, &str); 5] = [
    ("CRDT_CLUSTER", "true"),
    ("CRDT_CLUSTER_ADVERTISE_URL", "http://127.0.0.1:0"),
    ("CRDT_CLUSTER_LEASE_MS", LEASE_MS),
    ("CRDT_CLUSTER_SECRET", "region-secret-for-tests"),
    ("CRDT_SHUTDOWN_GRACE_SECS", "5"),
];

fn pod(db: &TestDb, name: &str) -> Node {
    let mut env = vec![("NODE_ID", name)];
    env.extend(CLUSTER_ENV);
    Node::spawn(db, &env)
}

/// A pod of `region` on `db` that also dials `peers` (other regions).
fn meshed_pod(db: &TestDb, region: &str, name: &str, peers: &[String]) -> Node {
    let mut env = test_support::mesh::mesh_env(region, name, peers);
    env.extend(
        CLUSTER_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Node::spawn(db, &env)
}

/// The pods' base URLs the writers pick from; a pod being stopped is taken out first.
type Live = Arc<Mutex<Vec<String>>>;

/// Grafts `agent` through a random live pod, retrying (as a service would) while the run
/// changes hands; whether it was acknowledged.
async fn graft(http: &reqwest::Client, live: &Live, run: Uuid, agent: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let base = {
            let live = live.lock().unwrap();
            live[(Uuid::new_v4().as_u128() % live.len() as u128) as usize].clone()
        };
        let answer = http
            .post(format!("{base}/api/crdt/runs/{run}/grafts"))
            .json(&json!({"agent": agent, "afterStep": "S1", "user": "svc", "opId": agent}))
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        match answer.map(|r| r.status().as_u16()) {
            Ok(200 | 201) => return true,
            // Moving between pods, or the pod went away mid-request: try again.
            Ok(502..=504) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(other) => panic!("graft {agent} on {run}: unexpected {other}"),
        }
    }
    false
}

/// Two pods on a fresh database, and a run grafted once ("First") through pod-0, which owns
/// it: (the database, pod-0, pod-1, a client, the run).
async fn run_on_one_of_two_pods() -> (TestDb, Node, Node, Client, Uuid) {
    let db = TestDb::new(Backend::Postgres).await;
    let owner = pod(&db, "pod-0");
    let other = pod(&db, "pod-1");
    let c = Client::new();
    let run = Uuid::new_v4();
    assert_eq!(post_graft(&c, &owner, run, "First").await, 201);
    (db, owner, other, c, run)
}

/// One graft of `agent` on `node`, answered with its status.
async fn post_graft(c: &Client, node: &Node, run: Uuid, agent: &str) -> u16 {
    let url = format!("{}/api/crdt/runs/{run}/grafts", node.base);
    let (s, body) = c
        .post(
            &url,
            &json!({"agent": agent, "afterStep": "S1", "user": "svc"}),
        )
        .await;
    if s != 201 {
        eprintln!("graft {agent} on {run}: {s} {body}");
    }
    s
}

async fn state(c: &Client, base: &str, run: Uuid) -> Value {
    let (s, body) = c.get(&format!("{base}/api/crdt/runs/{run}/state")).await;
    assert_eq!(s, 200, "{body}");
    body
}

fn agents(state: &Value) -> BTreeSet<String> {
    test_support::agents(state).into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_share_a_database_with_one_owner_per_run() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut pods: HashMap<&str, Node> = HashMap::new();
    for name in ["pod-0", "pod-1", "pod-2"] {
        pods.insert(name, pod(&db, name));
    }
    let live: Live = Arc::new(Mutex::new(pods.values().map(|p| p.base.clone()).collect()));
    let runs: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    let acked: Arc<Mutex<HashMap<Uuid, BTreeSet<String>>>> = Default::default();

    // Writers on random pods while one pod is killed, replaced, and another stopped.
    let http = reqwest::Client::new();
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let (http, live, runs, acked) =
                (http.clone(), live.clone(), runs.clone(), acked.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut n = 0;
                while started.elapsed() < Duration::from_secs(9) {
                    let run = runs[(w + n) % runs.len()];
                    let agent = format!("w{w}-{n}");
                    if graft(&http, &live, run, &agent).await {
                        acked.lock().unwrap().entry(run).or_default().insert(agent);
                    }
                    n += 1;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    // kill -9: its runs wait for its lease to lapse (2 s), then the others take them.
    let dead = pods.remove("pod-0").expect("pod-0");
    live.lock().unwrap().retain(|b| *b != dead.base);
    let mut dead = dead;
    dead.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Its replacement (same pod name) joins; then pod-1 is stopped as a rolling update does.
    let replacement = pod(&db, "pod-0");
    live.lock().unwrap().push(replacement.base.clone());
    pods.insert("pod-0", replacement);
    let mut stopping = pods.remove("pod-1").expect("pod-1");
    live.lock().unwrap().retain(|b| *b != stopping.base);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exited = tokio::task::spawn_blocking(move || {
        let status = stopping.terminate(20);
        (stopping, status)
    });
    let (stopped, status) = exited.await.expect("joined");
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM stops the pod cleanly:\n{}",
        stopped.log_text()
    );
    assert!(
        stopped.log_text().contains("cluster: left"),
        "the stopped pod handed its runs over"
    );
    for w in writers {
        w.await.expect("writer");
    }

    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.values().map(BTreeSet::len).sum();
    assert!(total > 100, "the writers got through: {total} grafts");
    let c = Client::new();
    let bases: Vec<String> = pods.values().map(|p| p.base.clone()).collect();
    for &run in &runs {
        // Any pod answers, with the same state, holding every acknowledged graft.
        let first = state(&c, &bases[0], run).await;
        for base in &bases[1..] {
            assert_eq!(state(&c, base, run).await, first, "run {run}: pods agree");
        }
        let held = agents(&first);
        let want = acked.get(&run).cloned().unwrap_or_default();
        let lost: Vec<_> = want.difference(&held).collect();
        assert!(
            lost.is_empty(),
            "run {run}: acknowledged grafts lost: {lost:?}"
        );
        // Each change stored once in the region's log, numbered without a gap or a clash.
        let rows = db::count(
            &db,
            &format!("SELECT count(*) AS n FROM collaboration_events WHERE run_id = '{run}'"),
        )
        .await;
        let distinct = db::count(
            &db,
            &format!(
                "SELECT count(DISTINCT change_hash) AS n FROM collaboration_events WHERE run_id = '{run}'"
            ),
        )
        .await;
        let last_seq = db::count(
            &db,
            &format!("SELECT COALESCE(max(run_seq), 0) AS n FROM collaboration_events WHERE run_id = '{run}'"),
        )
        .await;
        assert_eq!(rows, distinct, "run {run}: a change stored twice");
        assert_eq!(
            rows, last_seq,
            "run {run}: the log's positions run 1..{rows}"
        );
        assert!(
            rows as usize >= want.len(),
            "run {run}: {rows} rows for {} grafts",
            want.len()
        );
    }

    // Ownership is spread, visible in the status, and forwarding happened.
    let (s, status) = c.get(&format!("{}/api/crdt/mesh/status", bases[0])).await;
    assert_eq!(s, 200, "{status}");
    let pods_seen = status["cluster"]["pods"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(pods_seen.len(), 2, "two live pods: {status}");
    let owned: i64 = pods_seen
        .iter()
        .map(|p| p["runsOwned"].as_i64().unwrap_or(0))
        .sum();
    assert!(owned <= runs.len() as i64, "{status}");
    let mut forwarded = 0.0;
    for base in &bases {
        let text = c.text(&format!("{base}/actuator/prometheus")).await;
        forwarded += test_support::metric(
            &text,
            "crdt_cluster_forwarded_requests_total{door=\"http\"}",
        )
        .unwrap_or(0.0);
    }
    assert!(
        forwarded > 0.0,
        "requests reached non-owners and were forwarded"
    );
    // Runs changed hands (the killed pod's, the stopped pod's).
    let moved = db::count(
        &db,
        "SELECT count(*) AS n FROM crdt_run_owners WHERE epoch > 1",
    )
    .await;
    assert!(moved > 0, "no run was taken over");
    eprintln!(
        "{total} grafts acknowledged over {} runs; {forwarded} forwarded; {moved} runs changed hands",
        runs.len()
    );
    drop(dead);
}

/// A browser session opened on a pod that does not own the run is relayed to the owner: it
/// joins, sees changes made elsewhere live, and writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_on_another_pod_is_served_by_the_owner() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (_db, owner, other, c, run) = run_on_one_of_two_pods().await;

    let url = format!("{}/ws/runs/{run}", other.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    async fn frame(
        ws: &mut test_support::mesh::Ws,
        kind: &str,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        loop {
            let f = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t).expect("json"),
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected {kind}, got {other:?}"),
            };
            if f["type"] == kind && want(&f) {
                return f;
            }
        }
    }
    ws.send(Message::text(
        json!({"type": "JOIN", "user": "ana"}).to_string(),
    ))
    .await
    .expect("send");
    frame(&mut ws, "WELCOME", |_| true).await;
    let has = |n: usize| move |f: &Value| test_support::agents(&f["state"]).len() == n;
    frame(&mut ws, "STATE", has(1)).await;

    // A change made on the owner reaches the relayed session.
    assert_eq!(post_graft(&c, &owner, run, "Second").await, 201);
    frame(&mut ws, "STATE", has(2)).await;
    // The relayed session writes; the owner has it.
    ws.send(Message::text(
        json!({"type": "MUTATE", "opId": "o1", "op": "GRAFT", "agent": "Third", "afterStep": "S1"})
            .to_string(),
    ))
    .await
    .expect("send");
    let ack = frame(&mut ws, "ACK", |_| true).await;
    assert_eq!(ack["graft"]["user"], "ana", "{ack}");
    let on_owner = state(&c, &owner.base, run).await;
    assert_eq!(
        test_support::agents(&on_owner),
        ["First", "Second", "Third"]
    );

    let metrics_url = format!("{}/actuator/prometheus", other.base);
    let metrics = || c.text(&metrics_url);
    let text = metrics().await;
    assert_eq!(
        test_support::metric(
            &text,
            "crdt_cluster_forwarded_requests_total{door=\"browser\"}"
        ),
        Some(1.0)
    );
    // Nothing of the run is held on the pod that relayed (its actor only found the owner).
    let unloaded = test_support::eventually(5, || async {
        let text = metrics().await;
        (test_support::metric(&text, "crdt_runs_loaded") == Some(0.0)).then_some(())
    })
    .await;
    assert!(unloaded.is_some(), "{}", metrics().await);
}

/// An automerge-repo client connected to a pod that does not own the run syncs through the
/// owner: it reads the run, writes to it, and hears of changes made on the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automerge_repo_client_on_another_pod_syncs_through_the_owner() {
    use automerge::sync::{self, SyncDoc};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ReadDoc, ROOT};
    use test_support::repo::{doc_id, field, text, Peer};

    let (_db, owner, other, c, run) = run_on_one_of_two_pods().await;

    let mut p = Peer::joined(&other, "app").await;
    let mut doc = AutoCommit::new();
    p.sync_until_quiet(&doc_id(run), &mut doc).await;
    let grafts = doc.get(ROOT, "grafts").unwrap().expect("grafts").1;
    assert_eq!(doc.length(&grafts), 1, "read through the owner");

    // The client writes; the owner has it.
    let flags = doc.get(ROOT, "flags").unwrap().expect("flags").1;
    doc.put(&flags, "fromApp", "yes").unwrap();
    doc.commit();
    p.sync_until_quiet(&doc_id(run), &mut doc).await;
    let on_owner = state(&c, &owner.base, run).await;
    assert_eq!(on_owner["flags"]["fromApp"], "yes", "{on_owner}");

    // A change made on the owner reaches the client on the other pod, unasked.
    let mut sync_state = sync::State::new();
    if let Some(m) = doc.sync().generate_sync_message(&mut sync_state) {
        p.sync("sync", &doc_id(run), m).await;
    }
    assert_eq!(post_graft(&c, &owner, run, "Second").await, 201);
    let deadline = Instant::now() + Duration::from_secs(10);
    while doc.length(&grafts) < 2 {
        assert!(
            Instant::now() < deadline,
            "the owner's change never arrived"
        );
        let message = p.next().await;
        assert_eq!(field(&message, "type"), Some(text("sync")), "{message:?}");
        let Some(ciborium::Value::Bytes(data)) = field(&message, "data") else {
            panic!("sync without data: {message:?}")
        };
        let m = sync::Message::decode(&data).unwrap();
        doc.sync().receive_sync_message(&mut sync_state, m).unwrap();
        if let Some(reply) = doc.sync().generate_sync_message(&mut sync_state) {
            p.sync("sync", &doc_id(run), reply).await;
        }
    }
    let text_metrics = c.text(&format!("{}/actuator/prometheus", other.base)).await;
    assert!(
        test_support::metric(
            &text_metrics,
            "crdt_cluster_forwarded_requests_total{door=\"runtime\"}"
        )
        .unwrap_or(0.0)
            > 0.0
    );
}

/// The scenario: two regions of three pods each, one database per region, each pod of
/// `us` linked to one pod of `eu` through a proxy. Writers on random pods of both regions;
/// meanwhile an owner pod of `us` is killed (-9), a pod of `eu` is stopped (SIGTERM), and the
/// regions are cut apart and healed. Every pod of both regions converges on one state holding
/// every acknowledged write; each change is stored once per region; and along every run's log
/// the ownership epochs never go down: no deposed owner appended after its successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_of_several_pods_mesh_as_regions() {
    use test_support::mesh::converged;
    use test_support::proxy::Proxy;

    let (db_us, db_eu) = (
        TestDb::new(Backend::Postgres).await,
        TestDb::new(Backend::Postgres).await,
    );
    let links = [
        Proxy::start().await,
        Proxy::start().await,
        Proxy::start().await,
    ];
    let spawn = meshed_pod;
    let mut us: Vec<Option<Node>> = (0..3)
        .map(|i| Some(spawn(&db_us, "us", &format!("us-{i}"), &[links[i].url()])))
        .collect();
    let mut eu: Vec<Option<Node>> = (0..3)
        .map(|i| Some(spawn(&db_eu, "eu", &format!("eu-{i}"), &[])))
        .collect();
    for (link, pod) in links.iter().zip(&eu) {
        link.target(&pod.as_ref().expect("pod").base);
    }
    let bases = |pods: &[Option<Node>]| -> Vec<String> {
        pods.iter().flatten().map(|p| p.base.clone()).collect()
    };
    let live_us: Live = Arc::new(Mutex::new(bases(&us)));
    let live_eu: Live = Arc::new(Mutex::new(bases(&eu)));
    let runs: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    let acked: Arc<Mutex<BTreeSet<String>>> = Default::default();

    let http = reqwest::Client::new();
    let writers: Vec<_> = [("us", live_us.clone()), ("eu", live_eu.clone())]
        .into_iter()
        .flat_map(|(region, live)| (0..2).map(move |w| (region, live.clone(), w)))
        .map(|(region, live, w)| {
            let (http, runs, acked) = (http.clone(), runs.clone(), acked.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut n = 0;
                while started.elapsed() < Duration::from_secs(8) {
                    let run = runs[(w + n) % runs.len()];
                    let agent = format!("{region}-w{w}-{n}");
                    if graft(&http, &live, run, &agent).await {
                        acked.lock().unwrap().insert(agent);
                    }
                    n += 1;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    // us-0 dies: its runs are taken once its lease lapses; its link to eu-0 is gone.
    let mut dead = us[0].take().expect("us-0");
    live_us.lock().unwrap().retain(|b| *b != dead.base);
    dead.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // eu-1 is stopped as a rolling update does: it hands its runs over and leaves.
    let mut stopping = eu[1].take().expect("eu-1");
    live_eu.lock().unwrap().retain(|b| *b != stopping.base);
    let stopped = tokio::task::spawn_blocking(move || {
        let status = stopping.terminate(20);
        (stopping, status)
    });
    // The regions are cut apart, and both keep taking writes.
    for l in &links {
        l.cut();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for l in &links {
        l.heal();
    }
    let (stopped, status) = stopped.await.expect("joined");
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        stopped.log_text()
    );
    for w in writers {
        w.await.expect("writer");
    }

    let c = Client::new();
    let all: Vec<&Node> = us.iter().chain(eu.iter()).flatten().collect();
    let mut held = BTreeSet::new();
    for &run in &runs {
        let state = converged(&c, &all, run, 60).await;
        held.extend(agents(&state));
        let (us_rows, us_distinct) = stored(&db_us, run).await;
        let (eu_rows, eu_distinct) = stored(&db_eu, run).await;
        assert_eq!(
            us_rows, us_distinct,
            "run {run}: a change stored twice in us"
        );
        assert_eq!(
            eu_rows, eu_distinct,
            "run {run}: a change stored twice in eu"
        );
        assert_eq!(
            us_rows, eu_rows,
            "run {run}: both regions hold every change once"
        );
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the writers got through: {}", acked.len());
    let lost: Vec<_> = acked.difference(&held).collect();
    assert!(lost.is_empty(), "acknowledged grafts lost: {lost:?}");
    for db in [&db_us, &db_eu] {
        let stepped_back = db::count(
            db,
            "SELECT count(*) AS n FROM (SELECT owner_epoch, lag(owner_epoch) OVER \
             (PARTITION BY run_id ORDER BY id) AS before FROM collaboration_events) e \
             WHERE owner_epoch < before",
        )
        .await;
        assert_eq!(stepped_back, 0, "an owner appended after its successor had");
        let fenced = db::count(
            db,
            "SELECT count(*) AS n FROM collaboration_events WHERE owner_epoch IS NULL",
        )
        .await;
        assert_eq!(fenced, 0, "every append of a cluster pod carries its epoch");
    }
    eprintln!(
        "{} grafts acknowledged in two regions of three pods",
        acked.len()
    );
    drop(dead);
}

/// A run's rows in a region's log, and how many distinct changes they hold.
async fn stored(db: &TestDb, run: Uuid) -> (i64, i64) {
    let rows = format!("SELECT count(*) AS n FROM collaboration_events WHERE run_id = '{run}'");
    let distinct = format!(
        "SELECT count(DISTINCT change_hash) AS n FROM collaboration_events WHERE run_id = '{run}'"
    );
    (db::count(db, &rows).await, db::count(db, &distinct).await)
}

/// Another region's deletion of a run reaches its owner, whichever pod of the region the link
/// lands on: the decision is the owner's to take (it refuses the run's writes from then on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_regions_deletion_reaches_the_owner_through_any_pod() {
    use test_support::mesh::mesh_env;

    let (db_us, db_eu) = (
        TestDb::new(Backend::Postgres).await,
        TestDb::new(Backend::Postgres).await,
    );
    let eu = {
        let env = mesh_env("eu", "eu-0", &[]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Node::spawn(&db_eu, &env)
    };
    let us_pod = |name: &str, peers: &[String]| meshed_pod(&db_us, "us", name, peers);
    // Only us-0 links to eu; us-1 owns the run.
    let eu_url = eu.url("/ws").replace("http://", "ws://");
    let linked = us_pod("us-0", &[eu_url]);
    let owner = us_pod("us-1", &[]);
    let c = Client::new();
    let run = Uuid::new_v4();
    assert_eq!(post_graft(&c, &owner, run, "A").await, 201);
    // eu has the run (through the link on us-0 and the owner), then deletes it.
    let synced = test_support::eventually(20, || async {
        let (s, state) = c
            .get(&format!("{}/api/crdt/runs/{run}/state", eu.base))
            .await;
        (s == 200 && agents(&state).contains("A")).then_some(())
    })
    .await;
    if synced.is_none() {
        // The three logs say which pod carried what, and when.
        for (name, node) in [("eu-0", &eu), ("us-0", &linked), ("us-1", &owner)] {
            eprintln!("--- {name}'s log\n{}", node.log_text());
        }
    }
    assert!(synced.is_some(), "eu never received the run");
    let (s, body) = c.delete(&format!("{}/api/crdt/runs/{run}", eu.base)).await;
    assert!(s == 200 || s == 204, "{s} {body}");
    // The owner takes the decision: the run is gone on every pod of us, writes refused.
    let gone = test_support::eventually(20, || async {
        let (a, _) = c
            .get(&format!("{}/api/crdt/runs/{run}/state", owner.base))
            .await;
        let (b, _) = c
            .get(&format!("{}/api/crdt/runs/{run}/state", linked.base))
            .await;
        (a == 410 && b == 410).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the deletion never reached the run's owner");
    assert_eq!(
        post_graft(&c, &owner, run, "B").await,
        410,
        "a deleted run takes no writes"
    );
}

//! Hostile input against a real node (issue 12), printed as Markdown tables for BENCHMARKS.md.
//!
//! `cargo bench --bench hostile` runs every section against this build; name sections to run
//! only those (`attacks`, `grafts`). To compare with an earlier build, point
//! `CRDT_BENCH_BEFORE` at its binary and `CRDT_BENCH_BEFORE_CONFIG` at its configuration file:
//! each attack then runs against both, one after the other, on a fresh node each.
//!
//! - attacks: for each attack, the answer the attacker gets, how long it took, the node's peak
//!   resident memory, and whether the node still answers. A node past 4 GiB, or with no answer
//!   within 20 s, is stopped (its row says so).
//! - cold: a run of 50,000 grafts on a node (SQLite): its first read after a restart, and a
//!   retried graft once the run has unloaded after that read.
//! - grafts: a run of 50,000 grafts, in-process: reading the state and answering a retried
//!   graft, with the graft index up to date (after one more graft) and from scratch (what every
//!   read cost before the index).
//! - history: the same run on a node: a history page of 100 at random cursors, the state at an
//!   early and at a late point, each's p50/p99, and the node's peak memory meanwhile against
//!   its memory with the run loaded (issue 22).

use test_support as common;

use test_support::bench::args;
use test_support::bench::builds::{self, Build};

use test_support::bench::watchdog;

use std::future::Future;
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use base64::Engine;
use ciborium::Value as Cbor;
use common::mesh::Ws;
use common::repo::{cbor, doc_id, text, Peer};
use common::{Backend, Client, Node, TestDb};
use futures_util::{SinkExt, StreamExt};
use run_doc::{Mutation, RunDoc};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(20);
const MEMORY_CAP_KIB: u64 = 4 << 20;

fn main() {
    let args = args::Args::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if args.wants("attacks") {
        rt.block_on(attacks());
    }
    if args.wants("grafts") {
        grafts();
    }
    if args.wants("cold") {
        rt.block_on(cold());
    }
    if args.wants("history") {
        rt.block_on(history());
    }
}

fn builds() -> Vec<Build> {
    builds::builds(
        env!("CARGO_BIN_EXE_crdt-node"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/application.yml"),
    )
}

struct Outcome {
    answer: String,
    secs: f64,
    peak_mib: u64,
    alive: bool,
}

/// Runs `attack` against `node`, watching its memory; stops waiting past [`LIMIT`] or 4 GiB.
async fn watch(node: &Node, attack: impl Future<Output = String>) -> Outcome {
    let pid = node.pid();
    let (answer, secs) = watchdog::watched(pid, LIMIT, MEMORY_CAP_KIB, attack).await;
    let peak_mib = common::peak_rss_mib(pid);
    let alive = tokio::time::timeout(Duration::from_secs(3), async {
        Client::new().get(&node.url("/actuator/health")).await.0 == 200
    })
    .await
    .unwrap_or(false);
    Outcome {
        answer,
        secs,
        peak_mib,
        alive,
    }
}

#[derive(Clone, Copy)]
enum Attack {
    LoaderBombRepo,
    LoaderBombMesh,
    OpBombHttp,
    OpBombRepo,
    Ephemerals,
    PreAuthFlood,
    StampPin,
}

impl Attack {
    const ALL: [Attack; 7] = [
        Attack::LoaderBombRepo,
        Attack::LoaderBombMesh,
        Attack::OpBombHttp,
        Attack::OpBombRepo,
        Attack::Ephemerals,
        Attack::PreAuthFlood,
        Attack::StampPin,
    ];

    fn name(self) -> &'static str {
        match self {
            Attack::LoaderBombRepo => "372-byte loader bomb, automerge-repo sync",
            Attack::LoaderBombMesh => "372-byte loader bomb, mesh CRDT_FULL_SYNC",
            Attack::OpBombHttp => "op bomb (1 M characters), HTTP sync",
            Attack::OpBombRepo => "op bomb (1 M characters), automerge-repo sync",
            Attack::Ephemerals => "60 × 4 MiB ephemerals to 4 clients that do not read",
            Attack::PreAuthFlood => "64 unproven `/ws` sockets, reopened; a real peer dials",
            Attack::StampPin => "`lamportTimestamp` 2^53-1, then a graft",
        }
    }

    /// What the attacker sees.
    async fn run(self, node: &Node, run: Uuid, op_bomb: &[u8]) -> String {
        match self {
            Attack::LoaderBombRepo => repo_sync(node, run, common::loader_bomb()).await,
            Attack::LoaderBombMesh => mesh_full_sync(node, run, common::loader_bomb()).await,
            Attack::OpBombHttp => http_sync(node, run, op_bomb).await,
            Attack::OpBombRepo => repo_sync(node, run, op_bomb.to_vec()).await,
            Attack::Ephemerals => ephemerals(node, run).await,
            Attack::PreAuthFlood => preauth_flood(node).await,
            Attack::StampPin => stamp_pin(node, run).await,
        }
    }
}

async fn attacks() {
    println!("### Hostile input, one fresh node per attack (SQLite)\n");
    // Each bomb is built on the run's genesis, which depends on the run id: one run for all.
    let run = Uuid::from_u128(0x1234_5678);
    let op_bomb = common::op_bomb(run, 1_000_000);
    println!(
        "The op bomb: one compressed change of {} bytes inserting 1,000,000 characters.\n",
        op_bomb.len()
    );
    println!("| attack | build | the attacker's answer | time | peak RSS | node answers after |");
    println!("|---|---|---|---:|---:|---|");
    for attack in Attack::ALL {
        for build in builds() {
            let db = TestDb::new(Backend::Sqlite).await;
            // The mesh's default timings (the tests' are much shorter).
            let env = [
                ("REGION", "eu-central-1"),
                ("NODE_ID", "attacked"),
                ("CRDT_MESH_SECRET", common::mesh::SECRET),
            ];
            let mut node = Node::spawn_binary(&build.binary, &build.config, &db, &env);
            let (s, _) = Client::new()
                .post(
                    &common::run_url(&node, run, "/grafts"),
                    &json!({"agent": "A", "afterStep": "S", "user": "u"}),
                )
                .await;
            assert_eq!(s, 201);
            let outcome = watch(&node, attack.run(&node, run, &op_bomb)).await;
            row(attack.name(), build.name, &outcome);
            node.kill();
        }
    }
}

fn row(attack: &str, build: &str, o: &Outcome) {
    println!(
        "| {attack} | {build} | {} | {:.2} s | {} MiB | {} |",
        o.answer.replace('|', "/"),
        o.secs,
        o.peak_mib,
        if o.alive { "yes" } else { "no" }
    );
}

// ---------- the attacks: each returns what the attacker saw ----------

/// What ends a socket: its close code and reason, or the first thing it says.
async fn outcome(ws: &mut Ws) -> String {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(Some(f)))) => {
                return format!("close {}: {}", u16::from(f.code), f.reason)
            }
            Some(Ok(Message::Close(None))) | None => return "closed".into(),
            Some(Ok(Message::Text(t))) if t.contains("ERROR") => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                return format!("ERROR: {}", v["reason"].as_str().unwrap_or(""));
            }
            Some(Ok(Message::Binary(b))) => {
                let v: Cbor = ciborium::from_reader(b.as_ref()).unwrap_or(Cbor::Null);
                let kind = v
                    .as_map()
                    .and_then(|m| m.iter().find(|(k, _)| k.as_text() == Some("type")))
                    .and_then(|(_, v)| v.as_text().map(str::to_string))
                    .unwrap_or_default();
                if kind != "sync" {
                    return format!("`{kind}`");
                }
            }
            Some(Err(e)) => return format!("socket error: {e}"),
            Some(Ok(_)) => continue,
        }
    }
}

async fn repo_sync(node: &Node, run: Uuid, chunk: Vec<u8>) -> String {
    let mut peer = Peer::joined(node, "attacker").await;
    let mut scratch = automerge::AutoCommit::new();
    let mut message = scratch
        .sync()
        .generate_sync_message(&mut sync::State::new())
        .expect("a message");
    message.changes = sync::ChunkList::from(vec![chunk]);
    peer.sync("sync", &doc_id(run), message).await;
    outcome(&mut peer.ws).await
}

async fn mesh_full_sync(node: &Node, run: Uuid, state: Vec<u8>) -> String {
    let mut ws = common::mesh::raw_peer(node, common::mesh::SECRET, "attacker", "attack-1").await;
    let frame = json!({
        "type": "CRDT_FULL_SYNC", "runId": run, "sourceRegion": "attack-1",
        "state": base64::engine::general_purpose::STANDARD.encode(state), "timestamp": 1,
    });
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
    outcome(&mut ws).await
}

async fn http_sync(node: &Node, run: Uuid, changes: &[u8]) -> String {
    let body = json!({
        "changes": base64::engine::general_purpose::STANDARD.encode(changes),
        "sourceRegion": "attack-1",
    });
    let (status, reply) = Client::new()
        .post(&common::run_url(node, run, "/sync"), &body)
        .await;
    let message = reply["message"].as_str().unwrap_or("");
    format!("{status} {}", message.chars().take(90).collect::<String>())
}

async fn ephemerals(node: &Node, run: Uuid) -> String {
    let doc = doc_id(run);
    let ephemeral = |sender: &str, count: u64, data: Vec<u8>| {
        cbor(vec![
            ("type", text("ephemeral")),
            ("senderId", text(sender)),
            ("targetId", text("server")),
            ("documentId", text(&doc)),
            ("sessionId", text(&format!("{sender}-s"))),
            ("count", Cbor::Integer(count.into())),
            ("data", Cbor::Bytes(data)),
        ])
    };
    let mut sleepers = Vec::new();
    for i in 0..4 {
        let id = format!("sleeper-{i}");
        let mut sleeper = Peer::joined(node, &id).await;
        sleeper.ephemeral(&doc, 1, vec![0]).await;
        sleepers.push(sleeper);
    }
    let mut chatty = Peer::joined(node, "chatty").await.ws;
    let big = vec![7u8; 4 << 20];
    for n in 0..60 {
        if chatty
            .send(Message::binary(ephemeral("chatty", n + 2, big.clone())))
            .await
            .is_err()
        {
            return format!("sender cut off after {n}");
        }
    }
    // Let the node relay (or drop) all of it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(sleepers);
    "all 60 sent".into()
}

async fn preauth_flood(node: &Node) -> String {
    let url = node.url("/ws").replace("http://", "ws://");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 64 sockets from another address, each reopened as soon as it is closed or refused.
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (url, stop) = (url.clone(), stop.clone());
        flood.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match common::ws_from("127.0.0.2", &url).await {
                    Ok(mut ws) => while let Some(Ok(_)) = ws.next().await {},
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let db = TestDb::new(Backend::Sqlite).await;
    let env = common::mesh::mesh_env("us-east-1", "real-peer", std::slice::from_ref(&url));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut peer = Node::spawn(&db, &env);
    let c = Client::new();
    let mut answer = format!("the real peer kept out for {} s", LIMIT.as_secs());
    while start.elapsed() < LIMIT - Duration::from_secs(1) {
        let (_, s) = c.get(&node.url("/api/crdt/mesh/status")).await;
        if s["connectedPeers"] == 1 {
            answer = format!(
                "the real peer linked in {:.2} s",
                start.elapsed().as_secs_f64()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.abort_all();
    peer.kill();
    answer
}

async fn stamp_pin(node: &Node, run: Uuid) -> String {
    let mut replica = RunDoc::new(run, "attack-1");
    let change = replica
        .apply(
            &Mutation::SetFlag {
                key: "x".into(),
                value: json!(1),
            },
            0,
        )
        .expect("apply")
        .change
        .expect("a change");
    let body = json!({
        "changes": base64::engine::general_purpose::STANDARD.encode(change.raw_bytes()),
        "sourceRegion": "attack-1",
        "lamportTimestamp": (1u64 << 53) - 1,
    });
    let c = Client::new();
    let (status, _) = c.post(&common::run_url(node, run, "/sync"), &body).await;
    let (_, graft) = c
        .post(
            &common::run_url(node, run, "/grafts"),
            &json!({"agent": "B", "afterStep": "S", "user": "u"}),
        )
        .await;
    format!("{status}; the next graft is stamped {}", graft["lamport"])
}

// ---------- cold ----------

async fn cold() {
    const GRAFTS: usize = 50_000;
    for build in builds() {
        let db = TestDb::new(Backend::Sqlite).await;
        let mut node = Node::spawn_binary(&build.binary, &build.config, &db, &[]);
        let run = Uuid::new_v4();
        let first = Uuid::new_v4();
        let url = common::run_url(&node, run, "/grafts");
        let c = Client::new();
        let writers = (0..16).map(|w| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                for i in (w..GRAFTS).step_by(16) {
                    let id = if i == 0 { first } else { Uuid::new_v4() };
                    let body =
                        json!({"agent": format!("A{i}"), "afterStep": "S", "user": "u", "id": id});
                    c.post(&url, &body).await;
                }
            }
        });
        futures_util::future::join_all(writers).await;
        // SIGTERM: the final snapshot is written, as on a rolling update.
        node.terminate(60);
        let node = Node::spawn_binary(&build.binary, &build.config, &db, &[]);
        let state_url = common::run_url(&node, run, "/state");
        let (read_ms, parsed_ms, state) = timed_read(&state_url).await;
        let shown = state["grafts"].as_array().map_or(0, Vec::len);
        // The same read with the run loaded: what a read of this size costs (8 MB of JSON made
        // and sent), for the first read to be compared with.
        let (warm_ms, warm_parsed_ms, _) = timed_read(&state_url).await;
        // Read only: the run unloads after its linger (5 s, checked every 5 s, so at most 10 s
        // after its last read); then a client retries a graft.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let start = Instant::now();
        let (s, _) = c
            .post(
                &url.replace(&node_port_of(&url), &node_port_of(&node.base)),
                &json!({"agent": "A0", "afterStep": "S", "user": "u", "id": first}),
            )
            .await;
        let retry_ms = start.elapsed().as_secs_f64() * 1000.0;
        println!(
            "| {} | {shown} grafts | first read after a restart {read_ms:.0} ms \
             ({parsed_ms:.0} ms with the client's parse) | \
             retried graft after the linger {retry_ms:.0} ms ({s}) | \
             the same read, loaded {warm_ms:.0} ms ({warm_parsed_ms:.0} ms parsed) |",
            build.name
        );
    }
}

/// GETs `url`: ms until the whole response has arrived (the node's answer), ms including the
/// client's parse of it (8 MB of JSON on the same two cores), and the parsed body.
async fn timed_read(url: &str) -> (f64, f64, serde_json::Value) {
    let start = Instant::now();
    let response = reqwest::get(url).await.expect("GET");
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.expect("body");
    let received = start.elapsed().as_secs_f64() * 1000.0;
    let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    (received, start.elapsed().as_secs_f64() * 1000.0, value)
}

/// The `host:port` part of a URL.
fn node_port_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

// ---------- history ----------

async fn history() {
    const GRAFTS: usize = 50_000;
    let build = &builds()[0];
    let db = TestDb::new(Backend::Sqlite).await;
    let mut node = Node::spawn_binary(&build.binary, &build.config, &db, &[]);
    let run = Uuid::new_v4();
    let url = common::run_url(&node, run, "/grafts");
    let c = Client::new();
    let (_, first) = c
        .post(&url, &json!({"agent": "A0", "afterStep": "S", "user": "u"}))
        .await;
    let early: Vec<String> = serde_json::from_value(first["heads"].clone()).expect("heads");
    let writers = (0..16).map(|w| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            for i in (1 + w..GRAFTS).step_by(16) {
                c.post(
                    &url,
                    &json!({"agent": format!("A{i}"), "afterStep": "S", "user": "u"}),
                )
                .await;
            }
        }
    });
    futures_util::future::join_all(writers).await;
    node.terminate(60);
    let node = Node::spawn_binary(&build.binary, &build.config, &db, &[]);
    let base = common::run_url(&node, run, "");
    // Loaded: the run's state read once; its memory is the baseline.
    let (_, state) = c.get(&format!("{base}/state")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded_kib = common::bench::procfs::rss_kib(node.pid());
    // Peak memory from here on (writing 5 resets the high-water mark).
    let _ = std::fs::write(format!("/proc/{}/clear_refs", node.pid()), "5");
    // Cursors all over the run: every 100th entry of a full read.
    let mut cursors = vec![String::new()];
    let mut after: Option<String> = None;
    let mut last_page;
    loop {
        let q = after
            .as_ref()
            .map(|a| format!("&after={a}"))
            .unwrap_or_default();
        let (_, page) = c.get(&format!("{base}/history?limit=200{q}")).await;
        for e in page["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .step_by(100)
        {
            cursors.push(e["changeHash"].as_str().unwrap_or_default().to_string());
        }
        last_page = page["entries"].as_array().expect("entries").clone();
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    // A late point: ten changes before now (now itself is answered from the run's state).
    let late: Vec<String> =
        serde_json::from_value(last_page[last_page.len() - 11]["heads"].clone()).expect("heads");
    let mut pages = Vec::new();
    for i in 0..200 {
        let cursor = &cursors[(i * 7919) % cursors.len()];
        let q = if cursor.is_empty() {
            String::new()
        } else {
            format!("&after={cursor}")
        };
        let start = Instant::now();
        let (status, page) = c.get(&format!("{base}/history?limit=100{q}")).await;
        pages.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200, "{page}");
    }
    let mut points = Vec::new();
    for (name, heads) in [("early", &early), ("late", &late)] {
        let mut times = Vec::new();
        for _ in 0..100 {
            let start = Instant::now();
            let (status, then) = c.get(&format!("{base}/state?at={}", heads.join(","))).await;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200, "{then}");
        }
        points.push((name, times));
    }
    let peak_kib = common::peak_rss_mib(node.pid()) * 1024;
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    println!("| what | p50 | p99 |");
    println!("|---|---:|---:|");
    println!(
        "| history page of 100 (200 reads, random cursors over {} entries) | {:.1} ms | {:.1} ms |",
        state["grafts"].as_array().map_or(0, Vec::len),
        pct(&mut pages, 0.5),
        pct(&mut pages, 0.99)
    );
    for (name, mut times) in points {
        println!(
            "| state at the {name} point (100 reads) | {:.1} ms | {:.1} ms |",
            pct(&mut times, 0.5),
            pct(&mut times, 0.99)
        );
    }
    println!(
        "\nnode memory with the run loaded {} MiB; peak during the reads {} MiB ({:.2}x)",
        loaded_kib / 1024,
        peak_kib / 1024,
        peak_kib as f64 / loaded_kib.max(1) as f64
    );
}

// ---------- grafts ----------

fn grafts() {
    const GRAFTS: usize = 50_000;
    println!("\n### A run of {GRAFTS} grafts, in-process (median of 5)\n");
    let run = Uuid::new_v4();
    let mut doc = RunDoc::new(run, "us-east-1");
    for i in 0..GRAFTS {
        doc.apply(&graft(Uuid::from_u128(i as u128 + 1)), 1_764_000_000_000)
            .expect("graft");
    }
    let saved = doc.save();
    let load = median_of_5(|| {
        let t = Instant::now();
        std::hint::black_box(RunDoc::load(run, "us-east-1", &saved).expect("load"));
        t.elapsed().as_secs_f64()
    });
    println!(
        "Loading the run from its snapshot ({} KB): {:.0} ms.\n",
        saved.len() / 1000,
        load * 1000.0
    );
    // From scratch: a freshly loaded run reads every graft (what every read cost before).
    let cold_state = median_of_5(|| {
        let mut d = RunDoc::load(run, "us-east-1", &saved).expect("load");
        let t = Instant::now();
        std::hint::black_box(d.state());
        t.elapsed().as_secs_f64()
    });
    let mut warm = RunDoc::load(run, "us-east-1", &saved).expect("load");
    let _ = warm.state();
    let mut n = GRAFTS as u128;
    let warm_state = median_of_5(|| {
        n += 1;
        warm.apply(&graft(Uuid::from_u128(n)), 1_764_000_000_000)
            .expect("graft");
        let t = Instant::now();
        std::hint::black_box(warm.state());
        t.elapsed().as_secs_f64()
    });
    // The same, for a graft from another region (the index follows Automerge's diff).
    let mut other = RunDoc::load(run, "eu-central-1", &saved).expect("load");
    let remote_state = median_of_5(|| {
        n += 1;
        let change = other
            .apply(&graft(Uuid::from_u128(n)), 1_764_000_000_000)
            .expect("graft")
            .change
            .expect("a change");
        warm.apply_remote(vec![change], None).expect("apply");
        let t = Instant::now();
        std::hint::black_box(warm.state());
        t.elapsed().as_secs_f64()
    });
    let retried = Uuid::from_u128(GRAFTS as u128 / 2);
    let cold_retry = median_of_5(|| {
        let mut d = RunDoc::load(run, "us-east-1", &saved).expect("load");
        let t = Instant::now();
        let out = d.apply(&graft(retried), 1_764_000_000_000).expect("retry");
        assert!(out.change.is_none(), "a retry changes nothing");
        t.elapsed().as_secs_f64()
    });
    let warm_retry = median_of_5(|| {
        let t = Instant::now();
        let out = warm
            .apply(&graft(retried), 1_764_000_000_000)
            .expect("retry");
        assert!(out.change.is_none(), "a retry changes nothing");
        t.elapsed().as_secs_f64()
    });
    print_graft_table(&[
        (
            "read the state (one graft made here since the last read)",
            warm_state,
            cold_state,
        ),
        (
            "read the state (one graft from another region since)",
            remote_state,
            cold_state,
        ),
        ("answer a retried graft by id", warm_retry, cold_retry),
    ]);
}

/// The median of five timings of `f` (seconds).
fn median_of_5(mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..5).map(|_| f()).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Rows of (operation, with the index up to date, from scratch), in seconds.
fn print_graft_table(rows: &[(&str, f64, f64)]) {
    println!("| operation | index up to date | from scratch (before: every time) | ratio |");
    println!("|---|---:|---:|---:|");
    for (what, warm, cold) in rows {
        println!(
            "| {what} | {:.3} ms | {:.0} ms | {:.0}× |",
            warm * 1e3,
            cold * 1e3,
            cold / warm
        );
    }
}

fn graft(id: Uuid) -> Mutation {
    Mutation::Graft {
        id,
        retry_safe: true,
        agent: "Planner".into(),
        after_step: "step-1".into(),
        user: "bench".into(),
    }
}

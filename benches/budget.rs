//! Hostile input, round 2 (issue 18), against real node processes, printed as Markdown for
//! BENCHMARKS.md.
//!
//! `cargo bench --bench budget` runs every section against this build; name sections to run
//! only those (`attacks`, `together`). To compare with an earlier build, point
//! `CRDT_BENCH_BEFORE` at its binary and `CRDT_BENCH_BEFORE_CONFIG` at its configuration file.
//!
//! - attacks: each attack on a fresh node (SQLite): the attacker's answer, how long it took,
//!   the node's peak resident memory, and how a graft and a health check fared while it ran
//!   (one of each every 250 ms, 2 s timeout) and after. A node past 3 GiB is stopped.
//! - together: the socket and body attacks at once against one node of this build with its
//!   default budget; its peak memory.

use test_support as common;

use test_support::bench::args;
use test_support::bench::builds::{self, Build};
use test_support::bench::watchdog;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::ReadDoc;
use base64::Engine;
use ciborium::Value as Cbor;
use common::raw_ws::{Ending, RawWs};
use common::repo::{cbor, doc_id, text, Peer};
use common::{Backend, Client, Node, TestDb};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(40);
const MEMORY_CAP_KIB: u64 = 3 << 20;

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
    if args.wants("together") {
        rt.block_on(together());
    }
}

fn builds() -> Vec<Build> {
    builds::builds(
        env!("CARGO_BIN_EXE_crdt-node"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/application.yml"),
    )
}

fn spawn(build: &Build, db: &TestDb) -> Node {
    let env = [
        ("REGION", "eu-central-1"),
        ("NODE_ID", "attacked"),
        ("CRDT_MESH_SECRET", common::mesh::SECRET),
    ];
    Node::spawn_binary(&build.binary, &build.config, db, &env)
}

/// A graft and a health check every 250 ms while an attack runs.
#[derive(Default)]
struct Probe {
    tries: AtomicUsize,
    ok: AtomicUsize,
    worst_ms: AtomicU64,
}

async fn probe(node_base: String, run: Uuid, stop: Arc<AtomicBool>, stats: Arc<Probe>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let graft = format!("{node_base}/api/crdt/runs/{run}/grafts");
    let health = format!("{node_base}/actuator/health");
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let g = http
            .post(&graft)
            .json(&json!({"agent": "probe", "afterStep": "S", "user": "probe"}))
            .send()
            .await
            .is_ok_and(|r| r.status() == 201);
        let h = http
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        stats.tries.fetch_add(1, Ordering::Relaxed);
        if g && h {
            stats.ok.fetch_add(1, Ordering::Relaxed);
        }
        stats
            .worst_ms
            .fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Outcome {
    answer: String,
    secs: f64,
    peak_mib: u64,
    during: String,
    after: bool,
}

/// Runs `attack` against `node` with the probe going, watching its memory.
async fn watch(node: &Node, attack: impl Future<Output = String>) -> Outcome {
    let pid = node.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Probe::default());
    let prober = tokio::spawn(probe(
        node.base.clone(),
        Uuid::new_v4(),
        stop.clone(),
        stats.clone(),
    ));
    let (answer, secs) = watchdog::watched(pid, LIMIT, MEMORY_CAP_KIB, attack).await;
    stop.store(true, Ordering::Relaxed);
    let _ = prober.await;
    let peak_mib = common::peak_rss_mib(pid);
    let after = tokio::time::timeout(Duration::from_secs(3), async {
        let c = Client::new();
        c.get(&node.url("/actuator/health")).await.0 == 200
            && c.post(
                &common::run_url(node, Uuid::new_v4(), "/grafts"),
                &json!({"agent": "after", "afterStep": "S", "user": "u"}),
            )
            .await
            .0 == 201
    })
    .await
    .unwrap_or(false);
    let during = format!(
        "{}/{} ok, worst {} ms",
        stats.ok.load(Ordering::Relaxed),
        stats.tries.load(Ordering::Relaxed),
        stats.worst_ms.load(Ordering::Relaxed)
    );
    Outcome {
        answer,
        secs,
        peak_mib,
        during,
        after,
    }
}

#[derive(Clone, Copy)]
enum Attack {
    AckLoss,
    BigFlag,
    BigFrame,
    HandshakeFrames,
    UnjoinedRepo,
    JoinVersions,
    SplitOpBomb,
    EmptyHaves,
    RunCreation,
    Fanout,
    SlowBodies,
    ManyAddresses,
    ClockChain,
}

impl Attack {
    const ALL: [Attack; 13] = [
        Attack::AckLoss,
        Attack::BigFlag,
        Attack::BigFrame,
        Attack::HandshakeFrames,
        Attack::UnjoinedRepo,
        Attack::JoinVersions,
        Attack::SplitOpBomb,
        Attack::EmptyHaves,
        Attack::RunCreation,
        Attack::Fanout,
        Attack::SlowBodies,
        Attack::ManyAddresses,
        Attack::ClockChain,
    ];

    fn name(self) -> &'static str {
        match self {
            Attack::AckLoss => "flag of 150,000 values, 6 grafts, SIGKILL, restart",
            Attack::BigFlag => "`PUT` of a 2 M-value flag (a 4 MB body)",
            Attack::BigFrame => "`/ws/runs` frame declaring 600 MiB (256 MiB sent), no JOIN",
            Attack::HandshakeFrames => "64 unproven `/ws` sockets × 8 MB frame",
            Attack::UnjoinedRepo => "128 unjoined `/ws/automerge` sockets × 16.7 MB",
            Attack::JoinVersions => "`join` with 16.7 M empty protocol versions",
            Attack::SplitOpBomb => "10 changes × 99,999 ops in one HTTP sync, 5 requests",
            Attack::EmptyHaves => "sync message of 8 M empty `have` entries, 3 connections",
            Attack::RunCreation => "a graft to a new run, 16 at a time, for 20 s",
            Attack::Fanout => "400 × 65,000 B ephemerals to 100 clients that do not read",
            Attack::SlowBodies => "2,000 request bodies at a byte every 5 s",
            Attack::ManyAddresses => "59 addresses × 16 reopening `/ws` sockets; a real peer dials",
            Attack::ClockChain => "5,000 changes chained 2^21 apart in one HTTP sync",
        }
    }

    async fn run(self, node: &Node, run: Uuid) -> String {
        match self {
            // Run with a restart in between: see `ack_loss`.
            Attack::AckLoss => String::new(),
            Attack::BigFlag => big_flag(node, run).await,
            Attack::BigFrame => big_frame(node, run).await,
            Attack::HandshakeFrames => many_frames(node, "/ws", 64, 8_000_000).await,
            Attack::UnjoinedRepo => many_frames(node, "/ws/automerge", 128, 16_700_000).await,
            Attack::JoinVersions => join_versions(node).await,
            Attack::SplitOpBomb => split_op_bomb(node, run).await,
            Attack::EmptyHaves => empty_haves(node, run).await,
            Attack::RunCreation => run_creation(node).await,
            Attack::Fanout => fanout(node, run).await,
            Attack::SlowBodies => slow_bodies(node).await,
            Attack::ManyAddresses => many_addresses(node).await,
            Attack::ClockChain => clock_chain(node, run).await,
        }
    }
}

async fn attacks() {
    println!("### Hostile input, round 2: one fresh node per attack (SQLite, release)\n");
    println!(
        "| attack | build | the attacker's answer | time | peak RSS | graft + health during | after |"
    );
    println!("|---|---|---|---:|---:|---|---|");
    for attack in Attack::ALL {
        for build in builds() {
            let db = TestDb::new(Backend::Sqlite).await;
            let run = Uuid::new_v4();
            let mut node = spawn(&build, &db);
            let outcome = if let Attack::AckLoss = attack {
                ack_loss(&build, &db, &mut node, run).await
            } else {
                let (s, _) = Client::new()
                    .post(
                        &common::run_url(&node, run, "/grafts"),
                        &json!({"agent": "A", "afterStep": "S", "user": "u"}),
                    )
                    .await;
                assert_eq!(s, 201);
                watch(&node, attack.run(&node, run)).await
            };
            println!(
                "| {} | {} | {} | {:.1} s | {} MiB | {} | {} |",
                attack.name(),
                build.name,
                outcome.answer.replace('|', "/"),
                outcome.secs,
                outcome.peak_mib,
                outcome.during,
                if outcome.after { "yes" } else { "no" }
            );
            node.kill();
        }
    }
}

/// Every socket and body attack at once against one node of this build, default budget.
async fn together() {
    let build = builds().pop().expect("this build");
    let db = TestDb::new(Backend::Sqlite).await;
    let node = spawn(&build, &db);
    let run = Uuid::new_v4();
    let c = Client::new();
    c.post(
        &common::run_url(&node, run, "/grafts"),
        &json!({"agent": "A", "afterStep": "S", "user": "u"}),
    )
    .await;
    let all = async {
        let answers = futures_util::join!(
            big_frame(&node, run),
            many_frames(&node, "/ws", 64, 8_000_000),
            many_frames(&node, "/ws/automerge", 128, 16_700_000),
            join_versions(&node),
            empty_haves(&node, run),
            fanout(&node, run),
            slow_bodies(&node),
            split_op_bomb(&node, run),
        );
        format!("{answers:?}").chars().take(60).collect::<String>()
    };
    let outcome = watch(&node, all).await;
    println!("\n### Every socket and body attack at once, one node, default budget\n");
    println!("| peak RSS | graft + health during | after |");
    println!("|---:|---|---|");
    println!(
        "| {} MiB | {} | {} |",
        outcome.peak_mib,
        outcome.during,
        if outcome.after { "yes" } else { "no" }
    );
}

fn addr(node: &Node) -> String {
    node.base.trim_start_matches("http://").to_string()
}

fn ending(e: Ending) -> String {
    match e {
        Ending::Closed(code, reason) => format!("close {code}: {}", clip(&reason)),
        Ending::Dropped => "dropped".into(),
        Ending::Silent => "nothing".into(),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(70).collect()
}

// ---------- the attacks ----------

async fn ack_loss(build: &Build, db: &TestDb, node: &mut Node, run: Uuid) -> Outcome {
    let c = Client::new();
    let start = Instant::now();
    let (put, _) = c
        .put(
            &common::run_url(node, run, "/flags/big"),
            &json!({"value": vec![0; 150_000], "user": "u"}),
        )
        .await;
    for i in 0..6 {
        c.post(
            &common::run_url(node, run, "/grafts"),
            &json!({"agent": format!("A{i}"), "afterStep": "S", "user": "u"}),
        )
        .await;
    }
    let peak_mib = common::peak_rss_mib(node.pid());
    node.kill();
    *node = spawn(build, db);
    let (_, state) = c.get(&common::run_url(node, run, "/state")).await;
    let grafts = state["grafts"].as_array().map_or(0, Vec::len);
    let flag = if state["flags"]["big"].is_null() {
        "absent"
    } else {
        "present"
    };
    Outcome {
        answer: format!("PUT {put}; after restart {grafts} of 6 grafts, flag {flag}"),
        secs: start.elapsed().as_secs_f64(),
        peak_mib,
        during: "-".into(),
        after: c.get(&node.url("/actuator/health")).await.0 == 200,
    }
}

async fn big_flag(node: &Node, run: Uuid) -> String {
    // "[0,0,…]": 2 M values in 4 MB, under the default body limit of 4 MiB.
    let mut body = String::from(r#"{"user":"u","value":["#);
    body.push_str(&"0,".repeat(1_999_999));
    body.push_str("0]}");
    let response = reqwest::Client::new()
        .put(common::run_url(node, run, "/flags/big"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            format!("{status} {}", clip(&text))
        }
        Err(e) => format!("no answer: {e}"),
    }
}

async fn big_frame(node: &Node, run: Uuid) -> String {
    let Ok(mut ws) = RawWs::connect(&addr(node), &format!("/ws/runs/{run}"), &[]).await else {
        return "refused".into();
    };
    let _ = ws.header(0x2, 600 << 20).await;
    let sent = ws.stream_zeros(256 << 20).await;
    format!(
        "{} after {} MiB",
        ending(ws.ending(Duration::from_secs(5)).await),
        sent >> 20
    )
}

/// `n` sockets at `path`, each sending one frame of `size` bytes without proving itself.
async fn many_frames(node: &Node, path: &str, n: usize, size: usize) -> String {
    let tasks = (0..n).map(|_| async {
        let mut ws = RawWs::connect(&addr(node), path, &[]).await.ok()?;
        ws.header(0x2, size as u64).await.ok()?;
        ws.stream_zeros(size).await;
        Some(ending(ws.ending(Duration::from_secs(10)).await))
    });
    let endings: Vec<Option<String>> = futures_util::future::join_all(tasks).await;
    let refused = endings.iter().filter(|e| e.is_none()).count();
    let first = endings.iter().flatten().next().cloned().unwrap_or_default();
    format!("{refused} refused at the door; first: {first}")
}

async fn join_versions(node: &Node) -> String {
    let Ok(mut ws) = RawWs::connect(&addr(node), "/ws/automerge", &[]).await else {
        return "refused".into();
    };
    // A CBOR map whose version list holds 16.7 M empty strings (0x60 each).
    let count: u32 = 16_700_000;
    let mut message = Vec::new();
    message.push(0xa4);
    for (k, v) in [("type", "join"), ("senderId", "attacker")] {
        ciborium::into_writer(&text(k), &mut message).expect("cbor");
        ciborium::into_writer(&text(v), &mut message).expect("cbor");
    }
    ciborium::into_writer(&text("peerMetadata"), &mut message).expect("cbor");
    message.push(0xa0);
    ciborium::into_writer(&text("supportedProtocolVersions"), &mut message).expect("cbor");
    message.push(0x9a);
    message.extend_from_slice(&count.to_be_bytes());
    message.extend(std::iter::repeat_n(0x60u8, count as usize));
    if ws.frame(0x2, &message).await.is_err() {
        return ending(ws.ending(Duration::from_secs(5)).await);
    }
    ending(ws.ending(Duration::from_secs(20)).await)
}

/// Ten changes of 99,999 operations each, chained, on the run's genesis.
fn ten_big_changes(run: Uuid) -> Vec<u8> {
    let genesis = run_doc::RunDoc::new(run, "eu").save();
    let mut doc = automerge::AutoCommit::load(&genesis).expect("genesis loads");
    let base = doc.get_heads();
    let list = doc
        .put_object(automerge::ROOT, "bomb", automerge::ObjType::List)
        .expect("put");
    doc.commit();
    for _ in 0..10 {
        let at = doc.length(&list);
        let zeros = vec![automerge::ScalarValue::Int(0); 99_999];
        doc.splice(&list, at, 0, zeros).expect("splice");
        doc.commit();
    }
    doc.get_changes(&base)
        .iter_mut()
        .flat_map(|c| c.bytes().into_owned())
        .collect()
}

async fn split_op_bomb(node: &Node, run: Uuid) -> String {
    let changes = ten_big_changes(run);
    let body = json!({
        "changes": base64::engine::general_purpose::STANDARD.encode(&changes),
        "sourceRegion": "attack-1",
    });
    let c = Client::new();
    let mut answers = Vec::new();
    for _ in 0..5 {
        let (status, reply) = c.post(&common::run_url(node, run, "/sync"), &body).await;
        answers.push(format!(
            "{status} {}",
            clip(reply["message"].as_str().unwrap_or(""))
        ));
    }
    format!("{} ({} KB each)", answers[0], changes.len() / 1000)
}

async fn empty_haves(node: &Node, run: Uuid) -> String {
    let data = common::empty_haves_message(8_000_000);
    let tasks = (0..3).map(|i| {
        let data = data.clone();
        async move {
            let mut peer = Peer::joined(node, &format!("haves-{i}")).await;
            peer.send(cbor(vec![
                ("type", text("request")),
                ("senderId", text(&format!("haves-{i}"))),
                ("targetId", text("server")),
                ("documentId", text(&doc_id(run))),
                ("data", Cbor::Bytes(data)),
            ]))
            .await;
            // The earlier build may answer nothing at all: wait a while, never panic.
            use futures_util::StreamExt;
            use tokio_tungstenite::tungstenite::Message;
            let closed = tokio::time::timeout(Duration::from_secs(15), async {
                loop {
                    match peer.ws.next().await {
                        Some(Ok(Message::Close(Some(f)))) => {
                            return format!("close {}: {}", u16::from(f.code), clip(&f.reason))
                        }
                        Some(Ok(Message::Close(None))) | None => return "closed".to_string(),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return format!("socket error: {e}"),
                    }
                }
            });
            closed
                .await
                .unwrap_or_else(|_| "no answer within 15 s".into())
        }
    });
    let answers = futures_util::future::join_all(tasks).await;
    answers[0].clone()
}

async fn run_creation(node: &Node) -> String {
    let c = Client::new();
    let start = Instant::now();
    let made = Arc::new(AtomicUsize::new(0));
    let tasks = (0..16).map(|_| {
        let (c, made) = (c.clone(), made.clone());
        async move {
            while start.elapsed() < Duration::from_secs(20) {
                let (s, _) = c
                    .post(
                        &common::run_url(node, Uuid::new_v4(), "/grafts"),
                        &json!({"agent": "A", "afterStep": "S", "user": "u"}),
                    )
                    .await;
                if s == 201 {
                    made.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    futures_util::future::join_all(tasks).await;
    let metrics = c.text(&node.url("/actuator/prometheus")).await;
    let loaded = common::metric(&metrics, "crdt_runs_loaded").unwrap_or(0.0);
    format!(
        "{} runs made ({:.0}/s); {loaded} loaded at the end",
        made.load(Ordering::Relaxed),
        made.load(Ordering::Relaxed) as f64 / 20.0
    )
}

async fn fanout(node: &Node, run: Uuid) -> String {
    let doc = doc_id(run);
    let mut sleepers = Vec::new();
    for i in 0..100 {
        let mut sleeper = Peer::joined(node, &format!("sleeper-{i}")).await;
        sleeper.ephemeral(&doc, 1, vec![0]).await;
        sleepers.push(sleeper);
    }
    let mut chatty = Peer::joined(node, "chatty").await;
    for n in 0..400 {
        chatty.ephemeral(&doc, n + 2, vec![7u8; 65_000]).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(sleepers);
    "all 400 sent".into()
}

async fn slow_bodies(node: &Node) -> String {
    let addr = addr(node);
    let start = Instant::now();
    let tasks = (0..2000).map(|_| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
            let head = format!(
                "POST /api/crdt/runs/{}/grafts HTTP/1.1\r\nHost: {addr}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
                Uuid::new_v4()
            );
            s.write_all(head.as_bytes()).await.ok()?;
            let mut buf = [0u8; 64];
            for _ in 0..8 {
                if s.write_all(b" ").await.is_err() {
                    return Some(start.elapsed());
                }
                let read = tokio::io::AsyncReadExt::read(&mut s, &mut buf);
                if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), read).await {
                    if n > 0 && buf.starts_with(b"HTTP/1.1 408") {
                        return Some(start.elapsed());
                    }
                    return Some(start.elapsed());
                }
            }
            None
        }
    });
    let ends: Vec<Option<Duration>> = futures_util::future::join_all(tasks).await;
    let cut: Vec<Duration> = ends.into_iter().flatten().collect();
    let last = cut.iter().max().copied().unwrap_or_default();
    format!(
        "{} of 2000 cut off, the last after {:.0} s",
        cut.len(),
        last.as_secs_f64()
    )
}

async fn many_addresses(node: &Node) -> String {
    let url = node.url("/ws").replace("http://", "ws://");
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = tokio::task::JoinSet::new();
    for host in 10..69u8 {
        for _ in 0..16 {
            let (url, stop) = (url.clone(), stop.clone());
            flood.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match common::ws_from(&format!("127.0.0.{host}"), &url).await {
                        Ok(mut ws) => {
                            use futures_util::StreamExt;
                            while let Some(Ok(_)) = ws.next().await {}
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            });
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let start = Instant::now();
    let db = TestDb::new(Backend::Sqlite).await;
    let env = common::mesh::mesh_env("us-east-1", "real-peer", std::slice::from_ref(&url));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut peer = Node::spawn(&db, &env);
    let c = Client::new();
    let mut answer = "the real peer kept out for 30 s".to_string();
    while start.elapsed() < Duration::from_secs(30) {
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
    stop.store(true, Ordering::Relaxed);
    flood.abort_all();
    peer.kill();
    answer
}

async fn clock_chain(node: &Node, run: Uuid) -> String {
    let mut chain = run_doc::RunDoc::new(run, "attack-1");
    let mut bytes = Vec::new();
    for i in 0..5_000 {
        chain.observe_lamport(chain.lamport() + run_doc::MAX_LAMPORT_STEP - 1);
        let out = chain
            .apply(
                &run_doc::Mutation::SetFlag {
                    key: format!("k{}", i % 10),
                    value: json!(i),
                },
                0,
            )
            .expect("apply");
        if let Some(change) = out.change {
            bytes.extend_from_slice(change.raw_bytes());
        }
    }
    let body = json!({
        "changes": base64::engine::general_purpose::STANDARD.encode(&bytes),
        "sourceRegion": "attack-1",
    });
    let c = Client::new();
    let (status, reply) = c.post(&common::run_url(node, run, "/sync"), &body).await;
    let (_, state) = c.get(&common::run_url(node, run, "/state")).await;
    format!(
        "{status} {}; the run's clock is {}",
        clip(reply["message"].as_str().unwrap_or("")),
        state["lamport"]
    )
}

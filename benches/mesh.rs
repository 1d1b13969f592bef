//! Benchmarks of the mesh, printed as Markdown tables (copied into BENCHMARKS.md).
//!
//! `cargo bench --bench mesh` runs every section; name sections to run only those:
//! `cargo bench --bench mesh -- propagation catchup converge`.
//!
//! - propagation: time from a mutation's acknowledgement by us-east-1 to its commit in
//!   eu-central-1, three nodes on loopback, at 100 and at 5,000 mutations/s offered. The bench
//!   joins eu-central-1 as a mesh peer of its own and times the `CRDT_SYNC` frame that node
//!   forwards once it has committed the change.
//! - catchup: bytes Automerge's sync protocol (as the node runs it) sends to heal k missed
//!   changes on a 100,000-op document, against the size of those changes and of the document.
//! - converge: two nodes partitioned, 10,000 operations written on each side of one run, then
//!   healed: time until both hold the same heads.
//! - wan: two regions linked through a proxy that holds every byte `WAN_ONE_WAY_MS` (40) each
//!   way: propagation at 1,000 mutations/s, then a partition of `WAN_PARTITION_SECS` (60) at
//!   that rate and the catch-up after it: time to converge, and bytes the link carried against
//!   the bytes of the missed changes.

use test_support as common;

use test_support::bench::mix;

use test_support::bench::args;

use test_support::bench::http;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::sync;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::mesh::{raw_peer, TestMesh, SECRET};
use common::{Backend, Client};
use http::{http_request, Conn};
use run_doc::{parse_changes, Budget, Mutation, RunDoc};
use run_wire::mesh as protocol;

fn main() {
    let args = args::Args::from_env();
    let run = |name: &str| args.wants(name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if run("propagation") {
        rt.block_on(propagation());
    }
    if run("catchup") {
        catchup();
    }
    if run("converge") {
        rt.block_on(converge());
    }
    if run("wan") {
        rt.block_on(wan());
    }
}

// ---------- propagation ----------

/// Joins `base`'s mesh as a peer and records when each change hash arrives.
async fn listen(node: &common::Node, seen: Arc<Mutex<HashMap<String, Instant>>>) {
    let mut ws = raw_peer(node, SECRET, "bench-probe", "bench-1").await;
    let send = |v: Value| Message::text(v.to_string());
    ws.send(send(
        json!({"type": "CRDT_RUNS", "runIds": [], "done": true}),
    ))
    .await
    .expect("send");
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let now = Instant::now();
            let Ok(frame) = serde_json::from_str::<Value>(&t) else {
                continue;
            };
            if frame["type"] != "CRDT_SYNC" {
                continue;
            }
            let bytes = protocol::unb64("changes", frame["changes"].as_str().unwrap_or_default())
                .unwrap_or_default();
            if let Ok(changes) = parse_changes(&bytes) {
                let mut seen = seen.lock().unwrap();
                for c in changes {
                    seen.insert(c.hash().to_string(), now);
                }
            }
        }
    });
}

/// Offers `rate` mutations/s for `secs` over `clients` connections to `addr`, each on runs
/// of its own; returns (ack time, head) per acknowledged mutation.
async fn offer(addr: &str, rate: f64, secs: f64, clients: usize) -> Vec<(Instant, String, Uuid)> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let addr = addr.to_string();
        let runs: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
        let interval = Duration::from_secs_f64(clients as f64 / rate);
        tasks.spawn(async move {
            let mut conn = Conn::open(&addr).await;
            let mut acks = Vec::new();
            let start = Instant::now();
            let mut next = start;
            let mut i = c * 7919;
            while start.elapsed().as_secs_f64() < secs {
                next += interval;
                let run = runs[i % runs.len()];
                if let Ok(200 | 201) = conn.call(&http_request(run, i)).await {
                    let at = Instant::now();
                    let body: Value = serde_json::from_slice(&conn.body).unwrap_or_default();
                    if let Some(h) = body["heads"][0].as_str() {
                        acks.push((at, h.to_string(), run));
                    }
                }
                i += 1;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            acks
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("client"));
    }
    all
}

async fn propagation() {
    let regions = ["us-east-1", "eu-central-1", "ap-southeast-1"];
    let mesh = TestMesh::start(Backend::Sqlite, &regions, &[(0, 1), (0, 2), (1, 2)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 2).await;
    let seen = Arc::new(Mutex::new(HashMap::new()));
    listen(mesh.node(1), seen.clone()).await;
    // Let the probe's own catch-up finish: a change committed before its link came up would
    // reach it whole (CRDT_FULL_SYNC), not as a forwarded CRDT_SYNC.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr = mesh.node(0).base.trim_start_matches("http://").to_string();
    println!("\n### Propagation us-east-1 → eu-central-1 (3 nodes, SQLite, loopback)\n");
    println!("| offered/s | acknowledged/s | seen in eu-central-1 | p50 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let rates: Vec<(f64, usize)> = if std::env::var("PROPAGATION_QUICK").is_ok() {
        vec![(100.0, 4)]
    } else {
        vec![(100.0, 4), (5000.0, 64)]
    };
    let mut notes = Vec::new();
    for (rate, clients) in rates {
        let secs = 5.0;
        let acks = offer(&addr, rate, secs, clients).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (lat, unseen) = {
            let seen = seen.lock().unwrap();
            let mut lat: Vec<f64> = acks
                .iter()
                .filter_map(|(at, h, _)| {
                    let s = seen.get(h)?;
                    Some(s.saturating_duration_since(*at).as_secs_f64() * 1e3)
                })
                .collect();
            lat.sort_by(f64::total_cmp);
            let unseen: Vec<(String, Uuid)> = acks
                .iter()
                .filter(|(_, h, _)| !seen.contains_key(h))
                .map(|(_, h, r)| (h.clone(), *r))
                .collect();
            (lat, unseen)
        };
        // Any change the probe did not see forwarded must still be in eu-central-1.
        for (h, r) in &unseen {
            let held = common::mesh::holds(&c, mesh.node(1), *r, std::slice::from_ref(h)).await;
            notes.push(format!(
                "Not seen forwarded: {h} of run {r}; eu-central-1 holds it: {held}."
            ));
        }
        println!(
            "| {rate:.0} | {:.0} | {:.1}% | {:.2} | {:.2} | {:.2} |",
            acks.len() as f64 / secs,
            100.0 * lat.len() as f64 / acks.len().max(1) as f64,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN)
        );
    }
    for note in notes {
        println!("\n{note}");
    }
}

// ---------- catch-up bytes ----------

/// Runs the sync protocol between two documents until both are quiet; returns bytes each way.
fn sync_pair(
    a: &mut RunDoc,
    sa: &mut sync::State,
    b: &mut RunDoc,
    sb: &mut sync::State,
) -> (usize, usize, usize) {
    let (mut ab, mut ba, mut rounds) = (0, 0, 0);
    let mut to_b = a.sync_step(sa, None, Budget::default()).reply;
    let mut to_a = b.sync_step(sb, None, Budget::default()).reply;
    while to_a.is_some() || to_b.is_some() {
        rounds += 1;
        let (next_b, next_a);
        {
            let m = to_b.take().map(|m| {
                let bytes = m.encode();
                ab += bytes.len();
                sync::Message::decode(&bytes).expect("decode")
            });
            next_a = if m.is_some() {
                b.sync_step(sb, m, Budget::default()).reply
            } else {
                None
            };
        }
        {
            let m = to_a.take().map(|m| {
                let bytes = m.encode();
                ba += bytes.len();
                sync::Message::decode(&bytes).expect("decode")
            });
            next_b = if m.is_some() {
                a.sync_step(sa, m, Budget::default()).reply
            } else {
                None
            };
        }
        to_a = next_a;
        to_b = next_b;
        assert!(rounds < 50, "sync did not settle");
    }
    (ab, ba, rounds)
}

fn catchup() {
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    let mut i = 0;
    while a.size().0 < 100_000 {
        a.apply(&mix::mix(i), 0).expect("apply");
        i += 1;
    }
    let (ops, changes) = a.size();
    let full = a.save().len();
    let mut b = RunDoc::load(run, "eu-central-1", &a.save()).expect("load");
    let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
    sync_pair(&mut a, &mut sa, &mut b, &mut sb);
    // What each side keeps of the link when it drops: the shared heads.
    let (saved_a, saved_b) = (sa.encode(), sb.encode());
    println!("\n### Catch-up after a partition (document of {ops} ops in {changes} changes; full save {full} B)\n");
    println!("| missed changes k | their bytes | sync bytes A→B | B→A | rounds | ratio to missed | share of full save |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut written = 0;
    for k in [1usize, 10, 100, 1000] {
        let heads_before = a.heads();
        for _ in 0..k {
            a.apply(&mix::mix(i), 0).expect("apply");
            i += 1;
            written += 1;
        }
        let missed: usize = a
            .changes_since(&heads_before)
            .iter()
            .map(|c| c.raw_bytes().len())
            .sum();
        let mut sa = sync::State::decode(&saved_a).expect("state");
        let mut sb = sync::State::decode(&saved_b).expect("state");
        let (ab, ba, rounds) = sync_pair(&mut a, &mut sa, &mut b, &mut sb);
        assert_eq!(a.heads(), b.heads());
        println!(
            "| {k} | {missed} | {ab} | {ba} | {rounds} | {:.2}× | {:.2}% |",
            (ab + ba) as f64 / missed as f64,
            100.0 * (ab + ba) as f64 / full as f64
        );
        let _ = (&mut sa, &mut sb);
    }
    // Without a kept state the filter covers every change, which is the cost after a restart.
    a.apply(
        &Mutation::SetFlag {
            key: "x".into(),
            value: json!(1),
        },
        0,
    )
    .expect("apply");
    let mut fresh_a = sync::State::new();
    let mut fresh_b = sync::State::new();
    let (ab, ba, rounds) = sync_pair(&mut a, &mut fresh_a, &mut b, &mut fresh_b);
    println!("\nOne missed change with no kept sync state (after a node restart): {ab} B + {ba} B in {rounds} rounds ({written} changes written in the table above).");

    // The document-model share of healing a 10,000-each-way split (no IO, no network).
    let run = Uuid::new_v4();
    let mut a = RunDoc::new(run, "us-east-1");
    a.apply(&mix::mix(0), 0).expect("apply");
    let mut b = RunDoc::load(run, "eu-central-1", &a.save()).expect("load");
    for j in 0..10_000 {
        a.apply(&mix::mix(2 * j + 1), 0).expect("apply");
        b.apply(&mix::mix(2 * j + 2), 0).expect("apply");
    }
    let started = Instant::now();
    let (ab, ba, rounds) = sync_pair(
        &mut a,
        &mut sync::State::new(),
        &mut b,
        &mut sync::State::new(),
    );
    assert_eq!(a.heads(), b.heads());
    println!(
        "\nHealing 10,000 changes each way in-process (the sync steps both nodes run): {:.0} ms, {ab} B + {ba} B in {rounds} rounds.",
        started.elapsed().as_secs_f64() * 1e3
    );
}

// ---------- convergence after a partition ----------

/// Writes `count` runs on node 0 and waits until node 1 holds the last of them.
async fn write_idle_runs(mesh: &TestMesh, c: &Client, count: usize) {
    let idle: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
    let addr = mesh.node(0).base.trim_start_matches("http://").to_string();
    let mut conn = Conn::open(&addr).await;
    for (i, run) in idle.iter().enumerate() {
        conn.call(&http_request(*run, i)).await.expect("write");
    }
    let last = *idle.last().expect("runs");
    while c
        .get(&common::run_url(mesh.node(1), last, "/state"))
        .await
        .1["heads"]
        != c.get(&common::run_url(mesh.node(0), last, "/state"))
            .await
            .1["heads"]
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `per_side` operations to `run` on node `i` over 8 connections; how many succeeded.
async fn write_side(mesh: &TestMesh, i: usize, run: Uuid, per_side: usize) -> usize {
    let addr = mesh.node(i).base.trim_start_matches("http://").to_string();
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(Conn::open(&addr).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (k, mut conn) in conns.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut ok = 0;
            for j in (k..per_side).step_by(8) {
                if let Ok(200 | 201) = conn.call(&http_request(run, j * 2 + i)).await {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        ok += r.expect("writer");
    }
    ok
}

/// Polls both nodes after the heal until their run is identical; prints when the link came
/// up and when the states matched.
async fn report_healing(mesh: &TestMesh, c: &Client, run: Uuid) {
    let heal = Instant::now();
    let mut reconnected = None;
    loop {
        let (_, s0) = c.get(&common::run_url(mesh.node(0), run, "/state")).await;
        let (_, s1) = c.get(&common::run_url(mesh.node(1), run, "/state")).await;
        if reconnected.is_none() {
            let (_, st) = c.get(&mesh.node(0).url("/api/crdt/mesh/status")).await;
            if st["connectedPeers"] == 1 {
                reconnected = Some(heal.elapsed());
            }
        }
        if s0["heads"] == s1["heads"] && s0["grafts"] == s1["grafts"] {
            let total = heal.elapsed();
            let link = reconnected.unwrap_or(total);
            println!(
                "Healed: link up after {:.0} ms; identical heads after {:.0} ms ({:.0} ms after the link came up); {} grafts.",
                link.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3,
                (total - link).as_secs_f64() * 1e3,
                s0["grafts"].as_array().map_or(0, Vec::len)
            );
            break;
        }
        if heal.elapsed() > Duration::from_secs(120) {
            println!("did not converge in 120 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn converge() {
    let mesh = TestMesh::start(Backend::Sqlite, &["us-east-1", "eu-central-1"], &[(0, 1)]).await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    // 1,000 other runs that both sides hold and nobody touches during the split: the
    // reconnect's catch-up should skip them by their heads digests.
    write_idle_runs(&mesh, &c, 1000).await;
    let run = Uuid::new_v4();
    // The run exists on both sides before the split.
    c.put(
        &common::run_url(mesh.node(0), run, "/flags/start"),
        &json!({"value": 1}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    mesh.partition(&[0]);
    mesh.wait_connected(&c, 0).await;
    let started = Instant::now();
    let (a, b) = tokio::join!(
        write_side(&mesh, 0, run, 10_000),
        write_side(&mesh, 1, run, 10_000)
    );
    println!(
        "\n### Convergence after a partition (2 nodes, SQLite, one run written, 1,000 idle)\n"
    );
    println!(
        "Written while partitioned: {a} + {b} operations in {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    mesh.heal_all();
    report_healing(&mesh, &c, run).await;
    for line in mesh
        .node(0)
        .log_text()
        .lines()
        .filter(|l| l.contains("catch-up with"))
    {
        println!("    {line}");
    }
}

/// Percentiles of sorted milliseconds (NaN for none).
fn pct(sorted: &[f64], p: f64) -> f64 {
    test_support::bench::stats::percentile(sorted, p).unwrap_or(f64::NAN)
}

// ---------- a wide-area link ----------

async fn wan() {
    let one_way_ms: u64 = std::env::var("WAN_ONE_WAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let one_way = Duration::from_millis(one_way_ms);
    const RATE: f64 = 1000.0;
    let partition_secs: f64 = std::env::var("WAN_PARTITION_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60.0);
    let mesh = TestMesh::start(Backend::Sqlite, &["us-east-1", "eu-central-1"], &[(0, 1)]).await;
    let link = &mesh.links[0].proxy;
    link.set_delay(one_way);
    // The link dialled before the delay was set: make it dial again through the delay.
    link.cut();
    link.heal();
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, status) = c.get(&mesh.node(0).url("/api/crdt/mesh/status")).await;
    let rtt = status["peers"][0]["rttMs"].as_f64().unwrap_or(f64::NAN);
    let seen = Arc::new(Mutex::new(HashMap::new()));
    listen(mesh.node(1), seen.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr = mesh.node(0).base.trim_start_matches("http://").to_string();

    println!(
        "\n### Propagation over a link holding bytes {one_way_ms} ms each way, {RATE:.0} mutations/s\n"
    );
    let acks = offer(&addr, RATE, 10.0, 16).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut lat: Vec<f64> = {
        let seen = seen.lock().unwrap();
        acks.iter()
            .filter_map(|(at, h, _)| {
                Some(seen.get(h)?.saturating_duration_since(*at).as_secs_f64() * 1e3)
            })
            .collect()
    };
    lat.sort_by(f64::total_cmp);
    println!("link round trip as the mesh measures it (ping/pong): {rtt:.1} ms\n");
    println!("| acknowledged/s | seen in eu-central-1 | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.0} | {:.1}% | {:.1} | {:.1} | {:.1} | {:.1} |",
        acks.len() as f64 / 10.0,
        100.0 * lat.len() as f64 / acks.len().max(1) as f64,
        pct(&lat, 0.5),
        pct(&lat, 0.9),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );

    // A partition at the same rate, then the heal.
    let a = &mesh.members[0].db;
    let before = common::db::count(
        a,
        "SELECT COALESCE(MAX(id), 0) AS n FROM collaboration_events",
    )
    .await;
    mesh.partition(&[0]);
    let missed = offer(&addr, RATE, partition_secs, 16).await;
    let missed_bytes = common::db::count(
        a,
        &format!(
            "SELECT COALESCE(SUM(LENGTH(crdt_changes)), 0) AS n FROM collaboration_events \
             WHERE id > {before}"
        ),
    )
    .await;
    let mut last: HashMap<Uuid, String> = HashMap::new();
    for (_, head, run) in &missed {
        last.insert(*run, head.clone());
    }
    link.take_carried();
    let healed = Instant::now();
    mesh.heal_all();
    let mut waiting: Vec<(Uuid, String)> = last.into_iter().collect();
    while !waiting.is_empty() && healed.elapsed() < Duration::from_secs(300) {
        let mut still = Vec::new();
        for (run, head) in waiting {
            if !common::mesh::holds(&c, mesh.node(1), run, std::slice::from_ref(&head)).await {
                still.push((run, head));
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let converged_ms = healed.elapsed().as_secs_f64() * 1e3;
    let carried = link.take_carried();
    println!(
        "\n### Catch-up after a {partition_secs:.0} s partition at {RATE:.0} mutations/s ({one_way_ms} ms each way)\n"
    );
    println!("| changes missed | runs | bytes of the changes | converged after | bytes the link carried | ratio |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {}{:.0} ms | {} | {:.2}× |",
        missed.len(),
        missed
            .iter()
            .map(|(_, _, r)| *r)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        missed_bytes,
        if waiting.is_empty() {
            ""
        } else {
            "NOT CONVERGED "
        },
        converged_ms,
        carried,
        carried as f64 / missed_bytes.max(1) as f64
    );
}

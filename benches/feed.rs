//! The change feed, printed as Markdown tables (copied into BENCHMARKS.md).
//!
//! `cargo bench --bench feed [-- latency|throughput|webhooks] [--quick]`. One node (release
//! build, SQLite), the load on the same two cores.
//! - latency: 100 subscribers, each following 10 of 1,000 runs on the node-wide stream
//!   (`?runs=`); writers graft at a fixed rate over the 1,000 runs; each event's delay from
//!   its mutation's acknowledgement to its arrival at its subscriber.
//! - throughput: grafts as fast as 64 connections get them acknowledged over 1,000 runs, with
//!   no subscriber and with the 100, alternating, the same node.
//! - webhooks: 10,000 events queued for an endpoint that answers 503 (the node's memory
//!   meanwhile), then delivered to it once it answers 204 (the rate).

use test_support as common;

use test_support::bench::args;
use test_support::bench::http::Conn;
use test_support::bench::procfs;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

use common::sse::Sse;
use common::{Backend, Node, TestDb};

const RUNS: usize = 1000;
const SUBSCRIBERS: usize = 100;

fn main() {
    let args = args::Args::from_env();
    let quick = args.flag("--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if args.wants("latency") {
            println!("\n### Commit to event, {SUBSCRIBERS} subscribers over {RUNS} runs\n");
            println!("| offered grafts/s | acknowledged | events received | p50 | p99 | max |");
            println!("|---:|---:|---:|---:|---:|---:|");
            let secs = if quick { 3.0 } else { 10.0 };
            for rate in [1000.0, 5000.0] {
                latency(rate, secs).await;
            }
        }
        if args.wants("throughput") {
            throughput(if quick { 2 } else { 5 }).await;
        }
        if args.wants("webhooks") {
            webhooks(if quick { 2000 } else { 10_000 }).await;
        }
    });
}

fn graft(run: Uuid, i: usize) -> Vec<u8> {
    let body = json!({"agent": format!("A{i}"), "afterStep": "s1", "user": "bench"}).to_string();
    format!(
        "POST /api/crdt/runs/{run}/grafts HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A node with its runs written once (so their first write does not count).
async fn node_with_runs(db: &TestDb) -> (Node, Vec<Uuid>) {
    let node = Node::spawn(
        db,
        &[
            ("RUST_LOG", "warn,crdt_node=info"),
            ("CRDT_WEBHOOK_BACKOFF_MIN_MS", "200"),
            ("CRDT_WEBHOOK_BACKOFF_MAX_MS", "1000"),
            ("CRDT_WEBHOOK_MAX_ATTEMPTS", "1000"),
            ("CRDT_WEBHOOK_ALLOWED_HOSTS", "127.0.0.1"),
        ],
    );
    let runs: Vec<Uuid> = (0..RUNS).map(|_| Uuid::new_v4()).collect();
    let addr = addr(&node);
    let chunks: Vec<Vec<Uuid>> = runs.chunks(RUNS / 16).map(<[Uuid]>::to_vec).collect();
    let warm = chunks.into_iter().map(|chunk| {
        let addr = addr.clone();
        async move {
            let mut conn = Conn::open(&addr).await;
            for run in chunk {
                assert_eq!(conn.call(&graft(run, 0)).await.expect("warm"), 201);
            }
        }
    });
    futures_util::future::join_all(warm).await;
    (node, runs)
}

fn addr(node: &Node) -> String {
    node.base.trim_start_matches("http://").to_string()
}

/// Arrivals of (run, lamport) at one subscriber.
type Arrivals = Arc<Mutex<HashMap<(Uuid, u64), Instant>>>;

/// Opens the subscribers, each on `?runs=` its tenth of the runs, recording arrivals.
async fn subscribe(
    node: &Node,
    runs: &[Uuid],
    stop: Arc<AtomicBool>,
) -> (Arrivals, Vec<tokio::task::JoinHandle<()>>) {
    let arrivals: Arrivals = Arc::default();
    let mut tasks = Vec::new();
    for s in 0..SUBSCRIBERS {
        let mine: Vec<String> = runs
            .iter()
            .skip(s)
            .step_by(SUBSCRIBERS)
            .map(Uuid::to_string)
            .collect();
        let url = node.url(&format!("/api/crdt/events?runs={}", mine.join(",")));
        let mut stream = Sse::open(&url, None, None).await.expect("subscribe");
        let (arrivals, stop) = (arrivals.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Some(frame) = stream.next_event(Duration::from_millis(200)).await else {
                    continue;
                };
                let at = Instant::now();
                let Some(e) = frame.json() else { continue };
                let run: Uuid = e["runId"]
                    .as_str()
                    .and_then(|r| r.parse().ok())
                    .expect("runId");
                let lamport = e["lamport"].as_u64().expect("lamport");
                arrivals.lock().unwrap().insert((run, lamport), at);
            }
        }));
    }
    (arrivals, tasks)
}

/// Grafts at `rate` for `secs` from 16 connections (open loop: each sends on its schedule, or
/// at once when behind); each acknowledged (run, lamport) with its time.
async fn write_at(node: &Node, runs: &[Uuid], rate: f64, secs: f64) -> Vec<((Uuid, u64), Instant)> {
    const CONNS: usize = 16;
    let total = (rate * secs) as usize;
    let interval = Duration::from_secs_f64(CONNS as f64 / rate);
    let start = Instant::now();
    let writers = (0..CONNS).map(|w| {
        let (addr, runs) = (addr(node), runs.to_vec());
        async move {
            let mut conn = Conn::open(&addr).await;
            let mut acks = Vec::new();
            for (k, i) in (w..total).step_by(CONNS).enumerate() {
                tokio::time::sleep_until((start + interval * k as u32).into()).await;
                let run = runs[i % runs.len()];
                if conn.call(&graft(run, i)).await.expect("graft") != 201 {
                    continue;
                }
                let at = Instant::now();
                let body: Value = serde_json::from_slice(&conn.body).expect("json");
                acks.push(((run, body["lamport"].as_u64().expect("lamport")), at));
            }
            acks
        }
    });
    futures_util::future::join_all(writers).await.concat()
}

async fn latency(rate: f64, secs: f64) {
    let db = TestDb::new(Backend::Sqlite).await;
    let (node, runs) = node_with_runs(&db).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (arrivals, tasks) = subscribe(&node, &runs, stop.clone()).await;
    let acks = write_at(&node, &runs, rate, secs).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let arrivals = arrivals.lock().unwrap();
    let mut delays: Vec<f64> = acks
        .iter()
        .filter_map(|(key, acked)| {
            let at = arrivals.get(key)?;
            // An event may arrive before its acknowledgement does: count that as 0.
            Some(at.saturating_duration_since(*acked).as_secs_f64() * 1000.0)
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        delays
            .get(((delays.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "| {rate:.0} | {:.0}/s | {} of {} | {:.1} ms | {:.1} ms | {:.1} ms |",
        acks.len() as f64 / secs,
        delays.len(),
        acks.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}

/// Grafts acknowledged per second by 64 connections for `secs`.
async fn closed_loop(node: &Node, runs: &[Uuid], secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let writers = (0..64).map(|w| {
        let (addr, runs, done) = (addr(node), runs.to_vec(), done.clone());
        async move {
            let mut conn = Conn::open(&addr).await;
            let mut i = w;
            while Instant::now() < until {
                if conn
                    .call(&graft(runs[i % runs.len()], i))
                    .await
                    .expect("graft")
                    == 201
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                i += 64;
            }
        }
    });
    futures_util::future::join_all(writers).await;
    done.load(Ordering::Relaxed) as f64 / secs as f64
}

async fn throughput(secs: u64) {
    let db = TestDb::new(Backend::Sqlite).await;
    let (node, runs) = node_with_runs(&db).await;
    // Warm: the first seconds of a fresh node are slower than any after.
    closed_loop(&node, &runs, secs).await;
    println!("\n### Mutation throughput with and without the feed ({SUBSCRIBERS} subscribers)\n");
    println!("Rounds of {secs} s in the order without, with, with, without (twice), so that the");
    println!("runs' growth over the bench weighs on both alike.\n");
    println!("| round | without | with {SUBSCRIBERS} subscribers |");
    println!("|---:|---:|---:|");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..8 {
        let feed = matches!(round % 4, 1 | 2);
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = if feed {
            subscribe(&node, &runs, stop.clone()).await.1
        } else {
            Vec::new()
        };
        let rate = closed_loop(&node, &runs, secs).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        if feed {
            with.push(rate);
            println!("| {} | | {rate:.0}/s |", round + 1);
        } else {
            without.push(rate);
            println!("| {} | {rate:.0}/s | |", round + 1);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "\nMean: without {:.0}/s, with {:.0}/s: {:.2}×.",
        mean(&without),
        mean(&with),
        mean(&with) / mean(&without)
    );
}

/// A local webhook endpoint: answers `status` (shared, changeable) to every request on
/// keep-alive connections; counts the 2xx it gave.
async fn endpoint(status: Arc<AtomicU64>, delivered: Arc<AtomicU64>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let (status, delivered) = (status.clone(), delivered.clone());
            tokio::spawn(async move {
                let mut io = BufReader::new(socket);
                let mut line = String::new();
                loop {
                    let mut length = 0usize;
                    loop {
                        line.clear();
                        if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = line.trim_end().to_ascii_lowercase();
                        if h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if io.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let code = status.load(Ordering::Relaxed);
                    if (200..300).contains(&code) {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    let response = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                    if io.get_mut().write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

async fn webhooks(events: usize) {
    let db = TestDb::new(Backend::Sqlite).await;
    let (node, runs) = node_with_runs(&db).await;
    let (status, delivered) = (Arc::new(AtomicU64::new(503)), Arc::new(AtomicU64::new(0)));
    let port = endpoint(status.clone(), delivered.clone()).await;
    let c = common::Client::new();
    let (s, body) = c
        .post(
            &node.url("/api/crdt/webhooks"),
            &json!({"url": format!("http://127.0.0.1:{port}/hook")}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let base = procfs::rss_kib(node.pid());
    let rate = 2000.0;
    let acks = write_at(&node, &runs, rate, events as f64 / rate).await;
    let mut peak = procfs::rss_kib(node.pid());
    // The queue, refused for a while.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        peak = peak.max(procfs::rss_kib(node.pid()));
    }
    let queued = common::metric(
        &c.text(&node.url("/actuator/prometheus")).await,
        "crdt_webhook_outbox_pending",
    );
    status.store(204, Ordering::Relaxed);
    let start = Instant::now();
    while (delivered.load(Ordering::Relaxed) as usize) < acks.len() {
        peak = peak.max(procfs::rss_kib(node.pid()));
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "deliveries stalled at {}",
            delivered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "\n### Webhooks: {} events to one local endpoint\n",
        acks.len()
    );
    println!("| queued while refused (outbox) | node RSS before → peak | delivered once answered | rate |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {} | {} → {} MiB | {:.1} s | {:.0}/s |",
        queued.unwrap_or(f64::NAN),
        base / 1024,
        peak / 1024,
        secs,
        acks.len() as f64 / secs
    );
}

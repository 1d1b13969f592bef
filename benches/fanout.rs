//! Fan-out to browser sessions, printed as a Markdown table (copied into BENCHMARKS.md).
//!
//! `cargo bench --bench fanout` (add `--quick` for a short run). One node (release build,
//! SQLite); 1,000 WebSocket sessions joined to one run, then to 100 runs (10 each); a writer
//! sets flags over HTTP at a fixed rate. For each mutation: the time from its acknowledgement
//! (the HTTP response) to the moment the last session on its run holds a `STATE` that includes
//! it. And the node's resident memory per open session.

use test_support as common;

use test_support::bench::args;

use test_support::bench::http;

use test_support::bench::procfs;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::{Backend, Node, TestDb};
use http::Conn;

const SESSIONS: usize = 1000;

fn main() {
    let args = args::Args::from_env();
    let quick = args.flag("--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("\n### Fan-out to {SESSIONS} browser sessions\n");
        println!("| Runs | Sessions per run | Mutations/s | Mutations | Ack → last session p50 | p99 | max | Memory per session |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        let secs = if quick { 3.0 } else { 10.0 };
        fanout(1, 20.0, secs).await;
        fanout(1, 100.0, secs).await;
        fanout(100, 200.0, secs).await;
    });
}

/// One session: joins, then records (state lamport, arrival) for every STATE until told to stop.
async fn session(url: String, stop: tokio::sync::watch::Receiver<bool>) -> Vec<(u64, Instant)> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    ws.send(Message::text(
        json!({"type": "JOIN", "user": "bench"}).to_string(),
    ))
    .await
    .expect("join");
    let mut seen = Vec::new();
    let mut stop = stop;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let now = Instant::now();
                    // The state's own lamport is the last "lamport" in the frame (only heads follow).
                    if t.starts_with(r#"{"type":"STATE""#) {
                        if let Some(l) = t.rfind(r#""lamport":"#).and_then(|i| {
                            let rest = &t[i + 10..];
                            rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
                        }) {
                            seen.push((l, now));
                        }
                    }
                }
                Some(Ok(_)) => {}
                _ => panic!("session closed: {msg:?}"),
            }
        }
    }
    let _ = ws.close(None).await;
    seen
}

/// Every acknowledged mutation's delay (ms) until the last session of its run saw it, and how
/// many (mutation, session) pairs never saw it.
fn delivery_delays(
    acks: &[(Uuid, u64, Instant)],
    by_run: &std::collections::HashMap<Uuid, Vec<Vec<(u64, Instant)>>>,
) -> (Vec<f64>, usize) {
    let mut delays: Vec<f64> = Vec::new();
    let mut missing = 0;
    for (run, lamport, acked) in acks {
        let mut last: Option<Instant> = None;
        for seen in &by_run[run] {
            match seen.iter().find(|(l, _)| l >= lamport) {
                Some((_, at)) => last = Some(last.map_or(*at, |t: Instant| t.max(*at))),
                None => missing += 1,
            }
        }
        if let Some(t) = last {
            delays.push(t.saturating_duration_since(*acked).as_secs_f64() * 1000.0);
        }
    }
    (delays, missing)
}

/// Waits (at most 60 s) until the node counts every session as open.
async fn all_joined(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = common::Client::new();
    loop {
        let text = client.text(&node.url("/actuator/prometheus")).await;
        if common::metric(&text, "crdt_browser_sessions") == Some(SESSIONS as f64) {
            break;
        }
        assert!(Instant::now() < deadline, "sessions did not all join");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn fanout(runs: usize, rate: f64, secs: f64) {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[("RUST_LOG", "warn,crdt_node=info")]);
    let addr = node.base.trim_start_matches("http://").to_string();
    let ids: Vec<Uuid> = (0..runs).map(|_| Uuid::new_v4()).collect();
    let mut conn = Conn::open(&addr).await;
    let put = |run: Uuid, i: usize| {
        let body = json!({"value": i, "user": "writer"}).to_string();
        format!(
            "PUT /api/crdt/runs/{run}/flags/k{} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            i % 10,
            body.len()
        )
        .into_bytes()
    };
    for (i, run) in ids.iter().enumerate() {
        assert_eq!(conn.call(&put(*run, i)).await.expect("warm"), 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = procfs::rss_kib(node.pid());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for s in 0..SESSIONS {
        let run = ids[s % runs];
        let url = format!("ws://{addr}/ws/runs/{run}");
        tasks.push((run, tokio::spawn(session(url, stop_rx.clone()))));
        if s % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Every session joined and holds the initial state.
    all_joined(&node).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = procfs::rss_kib(node.pid());

    // The writer: one mutation every 1/rate s, round-robin over the runs.
    let total = (rate * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut acks: Vec<(Uuid, u64, Instant)> = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let run = ids[i % runs];
        assert_eq!(conn.call(&put(run, i + runs)).await.expect("put"), 200);
        let at = Instant::now();
        let body: serde_json::Value = serde_json::from_slice(&conn.body).expect("json");
        acks.push((run, body["lamport"].as_u64().expect("lamport"), at));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let mut by_run: std::collections::HashMap<Uuid, Vec<Vec<(u64, Instant)>>> = Default::default();
    for (run, task) in tasks {
        by_run
            .entry(run)
            .or_default()
            .push(task.await.expect("session"));
    }
    let (mut delays, missing) = delivery_delays(&acks, &by_run);
    assert_eq!(missing, 0, "some sessions never saw some mutations");
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| delays[((delays.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "| {runs} | {} | {rate:.0} | {total} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} KiB |",
        SESSIONS / runs,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        during.saturating_sub(before) as f64 / SESSIONS as f64,
    );
}

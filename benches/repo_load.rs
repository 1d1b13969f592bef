//! A load client for the automerge-repo protocol in Rust (issue 23 item 1): many clients per
//! process, each an automerge-repo peer on a WebSocket of its own, writing at an open-loop rate
//! and timing every change from its creation to its arrival at each other client of its
//! document. Printed as a Markdown row per cell for BENCHMARKS.md.
//!
//! `cargo bench --bench repo_load -- [--clients 10] [--docs 1] [--rate 200] [--secs 10]
//! [--observers 1]` starts a node (release build, SQLite) and runs one cell: `clients` writers
//! spread over `docs` documents, and `observers` more clients per document that only read (so a
//! document with one writer still has someone to deliver to).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{AutoCommit, ReadDoc, ROOT};
use ciborium::Value as Cbor;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use test_support as common;
use test_support::repo::{cbor, doc_id, field, text};

struct Options {
    clients: usize,
    docs: usize,
    rate: f64,
    secs: f64,
    observers: usize,
}

fn option(args: &[String], name: &str, default: f64) -> f64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What every client adds to: arrivals' latencies (µs) and counts.
#[derive(Default)]
struct Tally {
    latencies_us: Mutex<Vec<u64>>,
    sent: AtomicU64,
    arrived: AtomicU64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let o = Options {
        clients: option(&args, "--clients", 10.0) as usize,
        docs: option(&args, "--docs", 1.0) as usize,
        rate: option(&args, "--rate", 200.0),
        secs: option(&args, "--secs", 10.0),
        observers: option(&args, "--observers", 1.0) as usize,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(cell(o));
}

async fn cell(o: Options) {
    let db = common::TestDb::new(common::Backend::Sqlite).await;
    let node = common::Node::spawn_binary(
        env!("CARGO_BIN_EXE_crdt-node"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/application.yml"),
        &db,
        &[
            ("CRDT_PRE_AUTH_PER_ADDRESS", "4096"),
            ("CRDT_PRE_AUTH_PER_RANGE", "4096"),
            ("CRDT_PRE_AUTH_TOTAL", "8192"),
        ],
    );
    let c = common::Client::new();
    let runs: Vec<Uuid> = (0..o.docs).map(|_| Uuid::new_v4()).collect();
    for run in &runs {
        let body = json!({"agent": "Seed", "afterStep": "S", "user": "bench"});
        c.post(&common::run_url(&node, *run, "/grafts"), &body)
            .await;
    }
    let url = node.url("/ws/automerge").replace("http://", "ws://");
    let epoch = Instant::now();
    let tally = Arc::new(Tally::default());
    let mut joined = Vec::new();
    for i in 0..o.clients {
        joined.push((true, Client::join(&url, i, runs[i % o.docs]).await));
    }
    for i in 0..o.docs * o.observers {
        let id = o.clients + i;
        joined.push((false, Client::join(&url, id, runs[i % o.docs]).await));
    }
    let cpu_before = (
        process_cpu_secs(std::process::id()),
        process_cpu_secs(node.pid()),
    );
    let interval = Duration::from_secs_f64(o.clients as f64 / o.rate);
    let deadline = Instant::now() + Duration::from_secs_f64(o.secs);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (writes, client)) in joined.into_iter().enumerate() {
        let tally = tally.clone();
        // Writers start spread over one interval, so the offered load is even; observers
        // write nothing.
        let start = Instant::now() + interval.mul_f64(i as f64 / o.clients as f64);
        let until = if writes { deadline } else { Instant::now() };
        tasks.spawn(client.run(start, interval, until, deadline, epoch, tally));
    }
    while tasks.join_next().await.is_some() {}
    let cpu_after = (
        process_cpu_secs(std::process::id()),
        process_cpu_secs(node.pid()),
    );
    let sent = tally.sent.load(Ordering::Relaxed);
    // Each change reaches the other writers of its document and its observers.
    let per_doc = (o.clients as f64 / o.docs as f64).ceil() as u64;
    let expected = sent * (per_doc.saturating_sub(1) + o.observers as u64);
    let arrived = tally.arrived.load(Ordering::Relaxed);
    let mut lat = tally
        .latencies_us
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(f64::NAN, |us| *us as f64 / 1000.0)
    };
    println!("| writers × docs (+ observers per doc) | offered/s | sent/s | arrived / expected | p50 | p99 | client CPU | node CPU per change |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} × {} (+{}) | {:.0} | {:.0} | {} / {} | {:.1} ms | {:.1} ms | {:.0}% | {:.0} µs |",
        o.clients,
        o.docs,
        o.observers,
        o.rate,
        sent as f64 / o.secs,
        arrived,
        expected,
        pct(0.5),
        pct(0.99),
        100.0 * (cpu_after.0 - cpu_before.0) / o.secs,
        1e6 * (cpu_after.1 - cpu_before.1) / sent.max(1) as f64,
    );
}

/// One automerge-repo peer with its copy of one document.
struct Client {
    ws: common::mesh::Ws,
    id: String,
    doc_id: String,
    doc: AutoCommit,
    state: sync::State,
}

impl Client {
    async fn join(url: &str, i: usize, run: Uuid) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        let mut client = Client {
            ws,
            id: format!("load-{i}"),
            doc_id: doc_id(run),
            doc: AutoCommit::new(),
            state: sync::State::new(),
        };
        let join = cbor(vec![
            ("type", text("join")),
            ("senderId", text(&client.id)),
            ("peerMetadata", Cbor::Map(vec![])),
            ("supportedProtocolVersions", Cbor::Array(vec![text("1")])),
        ]);
        client.ws.send(Message::binary(join)).await.expect("join");
        // The peer message, then the document: request it and sync until it is here.
        let mut asked = false;
        while client.doc.get(ROOT, "flags").ok().flatten().is_none() {
            if !asked {
                client.send_sync("request").await;
                asked = true;
            }
            let Some(message) = client.next().await else {
                break;
            };
            client.take(&message, None);
        }
        client
    }

    async fn next(&mut self) -> Option<Cbor> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Binary(b)) => return ciborium::from_reader(b.as_ref()).ok(),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    async fn send_sync(&mut self, kind: &str) {
        let Some(m) = self.doc.sync().generate_sync_message(&mut self.state) else {
            return;
        };
        let bytes = cbor(vec![
            ("type", text(kind)),
            ("senderId", text(&self.id)),
            ("targetId", text("server")),
            ("documentId", text(&self.doc_id)),
            ("data", Cbor::Bytes(m.encode())),
        ]);
        let _ = self.ws.send(Message::binary(bytes)).await;
    }

    /// Applies a `sync` message; each new change of another client is an arrival, timed from
    /// the creation instant its message carries.
    fn take(&mut self, message: &Cbor, timing: Option<(&Instant, &Tally)>) {
        if field(message, "type") != Some(text("sync")) {
            return;
        }
        let Some(Cbor::Bytes(data)) = field(message, "data") else {
            return;
        };
        let Ok(m) = sync::Message::decode(&data) else {
            return;
        };
        let before = self.doc.get_heads();
        if self
            .doc
            .sync()
            .receive_sync_message(&mut self.state, m)
            .is_err()
        {
            return;
        }
        let Some((epoch, tally)) = timing else { return };
        let now = epoch.elapsed().as_micros() as u64;
        let mut arrivals = Vec::new();
        for change in self.doc.get_changes(&before) {
            let Some(stamp) = change.message().and_then(|m| m.strip_prefix("load:")) else {
                continue;
            };
            let mut parts = stamp.splitn(2, ':');
            let (Some(from), Some(at)) = (parts.next(), parts.next()) else {
                continue;
            };
            if from != self.id {
                if let Ok(at) = at.parse::<u64>() {
                    arrivals.push(now.saturating_sub(at));
                }
            }
        }
        tally
            .arrived
            .fetch_add(arrivals.len() as u64, Ordering::Relaxed);
        if !arrivals.is_empty() {
            if let Ok(mut l) = tally.latencies_us.lock() {
                l.extend(arrivals);
            }
        }
    }

    /// Writes a change every `interval` from `start` until `writes_until` (open loop: a late
    /// write does not push the next ones back), reading and answering the node meanwhile, and
    /// reads on until two seconds after `deadline` so changes in flight arrive.
    async fn run(
        mut self,
        start: Instant,
        interval: Duration,
        writes_until: Instant,
        deadline: Instant,
        epoch: Instant,
        tally: Arc<Tally>,
    ) {
        let mut next = tokio::time::Instant::from_std(start);
        let end = tokio::time::Instant::from_std(writes_until);
        let drain = tokio::time::Instant::from_std(deadline) + Duration::from_secs(2);
        let flags = self.doc.get(ROOT, "flags").ok().flatten().map(|(_, id)| id);
        let mut n: u64 = 0;
        loop {
            let now = tokio::time::Instant::now();
            if now >= drain {
                return;
            }
            let write_due = now >= next && now < end;
            if write_due {
                n += 1;
                let at = epoch.elapsed().as_micros() as u64;
                if let Some(flags) = &flags {
                    let _ = self.doc.put(flags, self.id.as_str(), n as i64);
                }
                self.doc.commit_with(
                    CommitOptions::default().with_message(format!("load:{}:{at}", self.id)),
                );
                tally.sent.fetch_add(1, Ordering::Relaxed);
                self.send_sync("sync").await;
                next += interval;
                continue;
            }
            let wake = if now < end { next.min(drain) } else { drain };
            tokio::select! {
                message = self.ws.next() => match message {
                    Some(Ok(Message::Binary(b))) => {
                        if let Ok(m) = ciborium::from_reader::<Cbor, _>(b.as_ref()) {
                            self.take(&m, Some((&epoch, &tally)));
                            self.send_sync("sync").await;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// CPU seconds (user + system) a process has used.
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the stat line (utime, stime), counted after the command's ')'.
    (ticks(11) + ticks(12)) / 100.0
}

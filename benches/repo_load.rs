//! A load client for the automerge-repo protocol in Rust (issue 23 items 1 and 2): many
//! clients per process, each an automerge-repo peer on a WebSocket of its own, writing at an
//! open-loop rate and timing every change from its creation to its arrival at each other client
//! of its document. Printed as Markdown rows for BENCHMARKS.md.
//!
//! `cargo bench --bench repo_load -- [--clients 10] [--docs 1] [--rate 200] [--secs 10]
//! [--observers 1] [--servers crdt-node,reference,samod] [--find-max] [--node-env K=V]`
//!
//! Each trial starts a fresh server: crdt-node (this release build, SQLite),
//! automerge-repo-sync-server 0.2.8 (`e2e/node_modules`, after `npm ci` there) or the samod
//! server (`benches/samod-server`, built by `scripts/side-by-side.sh`). `clients` writers spread
//! over `docs` documents, and `observers` more clients per document that only read (so a
//! document with one writer still has someone to deliver to). On crdt-node the documents are
//! runs made over HTTP first; on the others the first observer of each document creates it.
//! `--find-max` doubles the rate from `--rate` while a trial is sustained (every change
//! delivered, p99 ≤ `--p99-ms` (250), at least 95% of the offered rate sent), then halves the
//! gap twice; the servers take turns at each rate, so their figures come from one run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{AutoCommit, ObjType, ReadDoc, ROOT};
use ciborium::Value as Cbor;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use test_support as common;
use test_support::bench::procfs::{cpu_secs, rss_kib};
use test_support::bench::stats::percentile;
use test_support::repo::{doc_id, field, field_ref, join_message, sync_message, text};

/// The node's allocator here too: the client allocates as much per message as the node does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone)]
struct Options {
    clients: usize,
    docs: usize,
    rate: f64,
    secs: f64,
    observers: usize,
    servers: Vec<Target>,
    find_max: bool,
    p99_ms: f64,
    /// `--node-env K=V` (repeatable): more environment for crdt-node, e.g. its settings.
    node_env: Vec<(String, String)>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Target {
    CrdtNode,
    Reference,
    Samod,
}

impl Target {
    fn parse(name: &str) -> Option<Target> {
        match name {
            "crdt-node" => Some(Target::CrdtNode),
            "reference" => Some(Target::Reference),
            "samod" => Some(Target::Samod),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::CrdtNode => "crdt-node",
            Target::Reference => "automerge-repo-sync-server",
            Target::Samod => "samod",
        }
    }
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

/// One trial's figures.
struct Trial {
    offered: f64,
    sent: u64,
    arrived: u64,
    expected: u64,
    p50_ms: f64,
    p99_ms: f64,
    client_cpu: f64,
    server_cpu_us_per_change: f64,
    rss_peak_mib: f64,
    rss_after_mib: f64,
}

impl Trial {
    fn sustained(&self, o: &Options) -> bool {
        self.arrived >= self.expected
            && self.p99_ms <= o.p99_ms
            && self.sent as f64 >= 0.95 * self.offered * o.secs
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let servers = args
        .iter()
        .position(|a| a == "--servers")
        .and_then(|i| args.get(i + 1))
        .map_or("crdt-node", String::as_str)
        .split(',')
        .map(|s| Target::parse(s).unwrap_or_else(|| panic!("unknown server {s}")))
        .collect();
    let o = Options {
        clients: option(&args, "--clients", 10.0) as usize,
        docs: option(&args, "--docs", 1.0) as usize,
        rate: option(&args, "--rate", 200.0),
        secs: option(&args, "--secs", 10.0),
        observers: option(&args, "--observers", 1.0) as usize,
        servers,
        find_max: args.iter().any(|a| a == "--find-max"),
        p99_ms: option(&args, "--p99-ms", 250.0),
        node_env: args
            .windows(2)
            .filter(|w| w[0] == "--node-env")
            .filter_map(|w| w[1].split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    // One thread: the clients' tasks never wake each other across cores, and the client's
    // CPU figure is one core's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench(o));
}

async fn bench(o: Options) {
    println!("| server | writers × docs (+ observers per doc) | offered/s | sent/s | arrived / expected | p50 | p99 | client CPU | server CPU per change | server RSS peak / after |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    if !o.find_max {
        for &target in &o.servers {
            let t = trial(&o, target, o.rate).await;
            row(&o, target, &t);
        }
        return;
    }
    // Per server: the highest sustained rate so far and the lowest that was not.
    let mut bounds: Vec<(f64, Option<f64>)> = o.servers.iter().map(|_| (0.0, None)).collect();
    let mut rate = o.rate;
    // Doubling while any server still sustains, then two halvings of each server's gap.
    loop {
        let mut any = false;
        for (i, &target) in o.servers.iter().enumerate() {
            if bounds[i].1.is_none() {
                any |= narrow(&o, target, rate, &mut bounds[i]).await;
            }
        }
        if !any {
            break;
        }
        rate *= 2.0;
    }
    for _ in 0..2 {
        for (i, &target) in o.servers.iter().enumerate() {
            if let (good, Some(bad)) = bounds[i] {
                narrow(&o, target, ((good + bad) / 2.0).round(), &mut bounds[i]).await;
            }
        }
    }
    println!();
    for (i, &target) in o.servers.iter().enumerate() {
        println!(
            "highest sustained rate, {} × {} (+{}), {}: {:.0}/s (not sustained at {:.0}/s)",
            o.clients,
            o.docs,
            o.observers,
            target.name(),
            bounds[i].0,
            bounds[i].1.unwrap_or(f64::NAN)
        );
    }
}

/// One trial of `target` at `rate`, printed; `rate` becomes the highest sustained or the lowest
/// not sustained bound. Whether it was sustained.
async fn narrow(o: &Options, target: Target, rate: f64, bounds: &mut (f64, Option<f64>)) -> bool {
    let t = trial(o, target, rate).await;
    row(o, target, &t);
    let sustained = t.sustained(o);
    if sustained {
        bounds.0 = rate;
    } else {
        bounds.1 = Some(rate);
    }
    sustained
}

fn row(o: &Options, target: Target, t: &Trial) {
    println!(
        "| {} | {} × {} (+{}) | {:.0} | {:.0} | {} / {} | {:.1} ms | {:.1} ms | {:.0}% | {:.0} µs | {:.0} / {:.0} MiB |",
        target.name(),
        o.clients,
        o.docs,
        o.observers,
        t.offered,
        t.sent as f64 / o.secs,
        t.arrived,
        t.expected,
        t.p50_ms,
        t.p99_ms,
        100.0 * t.client_cpu / o.secs,
        t.server_cpu_us_per_change,
        t.rss_peak_mib,
        t.rss_after_mib,
    );
}

/// A server under test, stopped when dropped.
enum Server {
    CrdtNode {
        node: common::Node,
        _db: common::TestDb,
    },
    External {
        child: std::process::Child,
        url: String,
        _dir: tempfile::TempDir,
    },
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::External { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Server {
    async fn start(target: Target, node_env: &[(String, String)]) -> Server {
        if target == Target::CrdtNode {
            let db = common::TestDb::new(common::Backend::Sqlite).await;
            let mut env = vec![
                ("CRDT_PRE_AUTH_PER_ADDRESS", "4096"),
                ("CRDT_PRE_AUTH_PER_RANGE", "4096"),
                ("CRDT_PRE_AUTH_TOTAL", "8192"),
            ];
            env.extend(node_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let node = common::Node::spawn_binary(
                env!("CARGO_BIN_EXE_crdt-node"),
                concat!(env!("CARGO_MANIFEST_DIR"), "/config/application.yml"),
                &db,
                &env,
            );
            return Server::CrdtNode { node, _db: db };
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let data = dir.path().join("data");
        let mut cmd = match target {
            Target::Reference => {
                let mut c = std::process::Command::new("node");
                c.arg(common::repo_path(
                    "e2e/node_modules/@automerge/automerge-repo-sync-server/src/index.js",
                ))
                .env("PORT", port.to_string())
                .env("DATA_DIR", &data);
                c
            }
            _ => {
                let mut c = std::process::Command::new(common::repo_path(
                    "benches/samod-server/target/release/samod-server",
                ));
                c.arg(port.to_string()).arg(&data);
                c
            }
        };
        // The reference server serves ./public from its working directory.
        cmd.current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", target.name()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "{} did not start", target.name());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Server::External {
            child,
            url: format!("ws://127.0.0.1:{port}/"),
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Server::CrdtNode { node, .. } => node.pid(),
            Server::External { child, .. } => child.id(),
        }
    }

    fn ws_url(&self) -> String {
        match self {
            Server::CrdtNode { node, .. } => node.url("/ws/automerge").replace("http://", "ws://"),
            Server::External { url, .. } => url.clone(),
        }
    }

    /// `n` documents, each holding a `flags` map: runs made over HTTP on crdt-node (a client's
    /// own new document is not a run there); on the others, ids whose first client creates them.
    async fn documents(&self, n: usize) -> Vec<String> {
        let runs: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        if let Server::CrdtNode { node, .. } = self {
            let c = common::Client::new();
            for run in &runs {
                let body = json!({"agent": "Seed", "afterStep": "S", "user": "bench"});
                c.post(&common::run_url(node, *run, "/grafts"), &body).await;
            }
        }
        runs.into_iter().map(doc_id).collect()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn trial(o: &Options, target: Target, rate: f64) -> Trial {
    let server = Server::start(target, &o.node_env).await;
    let docs = server.documents(o.docs).await;
    let creates = !matches!(server, Server::CrdtNode { .. });
    let url = server.ws_url();
    let epoch = Instant::now();
    let tally = Arc::new(Tally::default());
    let mut joined = Vec::new();
    // Observers first: on the servers where clients create documents, the first one of each
    // document does.
    for i in 0..o.docs * o.observers {
        let id = o.clients + i;
        let create = creates && i < o.docs;
        joined.push((
            false,
            Client::join(&url, id, &docs[i % o.docs], create).await,
        ));
    }
    for i in 0..o.clients {
        joined.push((true, Client::join(&url, i, &docs[i % o.docs], false).await));
    }
    let pid = server.pid();
    let cpu_before = (cpu_secs(std::process::id()), cpu_secs(pid));
    let interval = Duration::from_secs_f64(o.clients as f64 / rate);
    let deadline = Instant::now() + Duration::from_secs_f64(o.secs);
    let mut tasks = tokio::task::JoinSet::new();
    let mut w = 0;
    for (writes, client) in joined {
        let tally = tally.clone();
        // Writers start spread over one interval, so the offered load is even; observers
        // write nothing.
        let start = Instant::now() + interval.mul_f64(w as f64 / o.clients as f64);
        w += usize::from(writes);
        let until = if writes { deadline } else { Instant::now() };
        tasks.spawn(client.run(start, interval, until, deadline, epoch, tally));
    }
    while tasks.join_next().await.is_some() {}
    let cpu_after = (cpu_secs(std::process::id()), cpu_secs(pid));
    let rss_after_mib = rss_kib(pid) as f64 / 1024.0;
    let rss_peak_mib = common::peak_rss_mib(pid) as f64;
    if let Server::CrdtNode { node, .. } = &server {
        // What the node complained of, when it did: why a trial fell short.
        let text = node.log_text();
        let mut seen = std::collections::HashSet::new();
        for line in text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        {
            let gist: String = line.split_whitespace().skip(3).take(8).collect();
            if seen.insert(gist) && seen.len() <= 5 {
                eprintln!("crdt-node: {line}");
            }
        }
    }
    drop(server);
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
    let pct = |p: f64| percentile(&lat, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    Trial {
        offered: rate,
        sent,
        arrived,
        expected,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        client_cpu: cpu_after.0 - cpu_before.0,
        server_cpu_us_per_change: 1e6 * (cpu_after.1 - cpu_before.1) / sent.max(1) as f64,
        rss_peak_mib,
        rss_after_mib,
    }
}

/// One automerge-repo peer with its copy of one document.
struct Client {
    ws: common::mesh::Ws,
    id: String,
    server_id: String,
    doc_id: String,
    doc: AutoCommit,
    state: sync::State,
    /// Every change this client has seen (its own included).
    seen: std::collections::HashSet<automerge::ChangeHash>,
}

impl Client {
    /// Connects, joins and holds the document: asks the server for it, or (`create`) makes it
    /// and waits until the server holds it.
    /// A socket the server drops before its `peer` message (automerge-repo-sync-server does,
    /// now and then, while a thousand clients connect) is opened again, as a real client would.
    async fn join(url: &str, i: usize, doc_id: &str, create: bool) -> Client {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::try_join(url, i, doc_id, create).await {
                Some(client) => return client,
                None if tries < 5 => {
                    eprintln!("load-{i}: the server closed the socket before joining; again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => panic!("load-{i}: could not join in {tries} tries"),
            }
        }
    }

    async fn try_join(url: &str, i: usize, doc_id: &str, create: bool) -> Option<Client> {
        // Nagle off, as a browser has it: otherwise an answer waits for the server's delayed
        // ACK of the message before it.
        // A small read buffer: tungstenite zero-fills the whole buffer before every read (128
        // KiB by default, 8% of the client's CPU), and these messages are a few hundred bytes.
        let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .ok()?;
        let mut client = Client {
            ws,
            id: format!("load-{i}"),
            server_id: String::new(),
            doc_id: doc_id.to_string(),
            doc: AutoCommit::new(),
            state: sync::State::new(),
            seen: Default::default(),
        };
        let join = join_message(&client.id, &["1"]);
        client.ws.send(Message::binary(join)).await.ok()?;
        while client.server_id.is_empty() {
            let message = client.next().await?;
            if field(&message, "type") == Some(text("peer")) {
                if let Some(Cbor::Text(id)) = field(&message, "senderId") {
                    client.server_id = id;
                }
            }
        }
        if create {
            let _ = client.doc.put_object(ROOT, "flags", ObjType::Map);
            client.doc.commit();
            client.send_sync("sync").await;
            let ours = client.doc.get_heads();
            while client.state.shared_heads != ours {
                let Some(message) = client.next().await else {
                    panic!(
                        "{}: the server closed before it held the new document {doc_id}",
                        client.id
                    );
                };
                client.take(&message, None);
                client.send_sync("sync").await;
            }
            client.new_changes(HashMap::new());
            return Some(client);
        }
        // Request the document and sync until it is here.
        client.send_sync("request").await;
        while client.doc.get(ROOT, "flags").ok().flatten().is_none() {
            let Some(message) = client.next().await else {
                break;
            };
            client.take(&message, None);
            client.send_sync("sync").await;
        }
        client.new_changes(HashMap::new());
        Some(client)
    }

    /// The changes applied since the last look: walked back from the heads to what was seen,
    /// so the cost follows the new changes (Automerge's `get_changes(heads)` works out the
    /// clock of the whole history). Those in `carried` are not rebuilt from the document.
    /// (A change that arrived before its dependencies counts once it is applied.)
    fn new_changes(
        &mut self,
        mut carried: HashMap<automerge::ChangeHash, automerge::Change>,
    ) -> Vec<automerge::Change> {
        let mut out = Vec::new();
        let mut to_visit = self.doc.get_heads();
        while let Some(hash) = to_visit.pop() {
            if !self.seen.insert(hash) {
                continue;
            }
            let change = carried
                .remove(&hash)
                .or_else(|| self.doc.get_change_by_hash(&hash));
            if let Some(change) = change {
                to_visit.extend(change.deps().iter().copied());
                out.push(change);
            }
        }
        out
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
        let bytes = sync_message(kind, &self.id, &self.server_id, &self.doc_id, m.encode());
        let _ = self.ws.send(Message::binary(bytes)).await;
    }

    /// Applies a `sync` message; each new change of another client is an arrival, timed from
    /// the creation instant its message carries.
    fn take(&mut self, message: &Cbor, timing: Option<(&Instant, &Tally)>) {
        let get = |name: &str| field_ref(message, name);
        if get("type").and_then(Cbor::as_text) != Some("sync")
            || get("documentId").and_then(Cbor::as_text) != Some(self.doc_id.as_str())
        {
            return;
        }
        let Some(Cbor::Bytes(data)) = get("data") else {
            return;
        };
        let Ok(m) = sync::Message::decode(data) else {
            return;
        };
        // The changes the message carries, read from its own bytes: rebuilding each from the
        // document afterwards (`get_change_by_hash`) cost an eighth of the client's CPU. A chunk
        // that is not exactly one change (a bundle, a document) is left to the rebuilding.
        let carried: HashMap<automerge::ChangeHash, automerge::Change> = m
            .changes
            .iter()
            .filter_map(|chunk| {
                automerge::Change::try_from(chunk)
                    .ok()
                    .filter(|c| c.raw_bytes().len() == chunk.len())
            })
            .map(|c| (c.hash(), c))
            .collect();
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
        for change in self.new_changes(carried) {
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
    /// write does not push the next ones back), reading and answering the server meanwhile,
    /// and reads on until two seconds after `deadline` so changes in flight arrive.
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
                self.seen.extend(self.doc.get_heads());
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

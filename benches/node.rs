//! Benchmarks of the whole node, printed as Markdown tables (copied into BENCHMARKS.md).
//!
//! `cargo bench --bench node` runs every section; name sections to run only those:
//! `cargo bench --bench node -- throughput load memory`. `--quick` shortens each cell.
//!
//! - throughput: durable mutations/s and latency over HTTP at 1, 16 and 64 clients, on 1 run and
//!   spread over 1,000 runs, on SQLite and PostgreSQL, beside the in-process ceiling for the
//!   same operation mix measured in the same run.
//! - wrk: durable grafts/s with `wrk` as the client (64 connections, 1,000 runs), beside the
//!   in-process ceiling of the same grafts measured in the same run; on SQLite, SQLite in RAM
//!   (a bound: what the disk costs) and PostgreSQL, then the node writing nothing (a bound:
//!   what the database costs).
//! - wrk-hot: the same into one run, which grows by thousands of grafts a second.
//! - long: the same into 10 runs of 10,000 events each (`LONG_EVENTS=N`: N each): what
//!   snapshots of long runs cost.
//! - load: time to load a run of 10,000 events from snapshot + tail vs. full replay.
//! - memory: resident memory of the node with 10,000 loaded runs of 10 operations each.
//!
//! The load client speaks HTTP/1.1 over raw keep-alive sockets on one thread, so it takes as
//! little of the machine's CPU from the node as it can.

// The node's own allocator: the in-process ceilings measure the document model as the node
// runs it (with glibc's malloc they came out 3-13% lower, flattering the node's share).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use test_support as common;

use test_support::bench::mix;
use test_support::bench::no_writes;

use test_support::bench::args;

use test_support::bench::procfs;

use test_support::bench::http;

use test_support::bench::stats::percentile;

use std::time::{Duration, Instant};

use common::{Backend, Node, TestDb};
use http::{http_request, Conn};
use mix::mix;
use run_doc::RunDoc;
use run_store::{self, NewEvent, Snapshot};
use uuid::Uuid;

fn main() {
    let args = args::Args::from_env();
    let quick = args.flag("--quick");
    let run = |name: &str| args.wants(name);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if run("throughput") {
        rt.block_on(throughput(quick));
    }
    if run("wrk") {
        rt.block_on(wrk_cells(quick, 1000));
    }
    if run("wrk-hot") {
        rt.block_on(wrk_cells(quick, 1));
    }
    if run("long") {
        rt.block_on(long_runs(quick));
    }
    if run("load") {
        rt.block_on(load_time());
    }
    if run("memory") {
        rt.block_on(memory());
    }
    if run("legacy") {
        rt.block_on(legacy_load());
    }
    if run("stall") {
        rt.block_on(snapshot_stall(quick));
    }
}

// ---------- the operation mix ----------

/// Ops/s in-process on one thread over `runs` documents (one change per op), op `i` being
/// `mutation(i)` into document `(i * step) % runs`.
fn in_process_ceiling(
    runs: usize,
    ops: usize,
    step: usize,
    mutation: impl Fn(usize) -> run_doc::Mutation,
) -> f64 {
    let mut docs: Vec<RunDoc> = (0..runs)
        .map(|_| RunDoc::new(Uuid::new_v4(), "us-east-1"))
        .collect();
    let start = Instant::now();
    for i in 0..ops {
        let doc = &mut docs[(i * step) % runs];
        let out = doc.apply(&mutation(i), 1_764_000_000_000).expect("apply");
        std::hint::black_box(out.change.map(|c| c.raw_bytes().len()));
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

/// A node for a throughput cell: runs stay loaded, its log says little.
fn throughput_node(db: &TestDb) -> Node {
    Node::spawn(db, THROUGHPUT_ENV)
}

/// The environment of a throughput node beside what `Node::spawn` sets (the in-process node
/// of [`InProcessNode`] reads its settings from it too).
const THROUGHPUT_ENV: &[(&str, &str)] = &[
    ("CRDT_RUN_IDLE_SECS", "3600"),
    ("RUST_LOG", "warn,crdt_node=info"),
];

fn backend_name(backend: Backend) -> &'static str {
    if backend == Backend::Sqlite {
        "SQLite"
    } else {
        "PostgreSQL"
    }
}

struct Cell {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

/// `clients` keep-alive connections, each writing as fast as it is answered, to `runs` runs.
async fn drive(
    addr: &str,
    clients: usize,
    runs: &[Uuid],
    warmup: Duration,
    measure: Duration,
) -> Cell {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let addr = addr.to_string();
        let runs = runs.to_vec();
        tasks.spawn(async move {
            let mut conn = Conn::open(&addr).await;
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut i = c * 7919;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let run = runs[(i / 4 * 31 + c) % runs.len()];
                let request = http_request(run, i);
                let sent = Instant::now();
                let ok = matches!(conn.call(&request).await, Ok(200 | 201));
                if sent >= measure_from {
                    if ok {
                        latencies.push(sent.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                i += 1;
            }
            (latencies, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(result) = tasks.join_next().await {
        let (l, e) = result.expect("client task");
        all.extend(l);
        errors += e;
    }
    all.sort();
    let pct = |p: f64| percentile(&all, p).map_or(0.0, |d| d.as_secs_f64() * 1e3);
    Cell {
        rate: all.len() as f64 / measure.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
    }
}

async fn throughput(quick: bool) {
    let (warmup, measure) = if quick {
        (Duration::from_millis(500), Duration::from_secs(2))
    } else {
        (Duration::from_secs(1), Duration::from_secs(5))
    };
    let ceiling_1 = in_process_ceiling(1, 20_000, 1, mix);
    let ceiling_1000 = in_process_ceiling(1000, 20_000, 1, mix);
    println!("\n### Durable mutations over HTTP (mix: 50% graft, 25% set flag, 25% prune)\n");
    println!("In-process ceiling of the same mix, one thread: {ceiling_1:.0} ops/s on 1 run (20,000 ops into one document), {ceiling_1000:.0} ops/s over 1,000 runs.\n");
    println!("| backend | runs | clients | mutations/s | p50 ms | p99 ms | errors | share of in-process ceiling |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = TestDb::new(backend).await;
        let node = throughput_node(&db);
        let addr = node.base.trim_start_matches("http://").to_string();
        for runs in [1usize, 1000] {
            for clients in [1usize, 16, 64] {
                let ids: Vec<Uuid> = (0..runs).map(|_| Uuid::new_v4()).collect();
                let cell = drive(&addr, clients, &ids, warmup, measure).await;
                let ceiling = if runs == 1 { ceiling_1 } else { ceiling_1000 };
                println!(
                    "| {} | {runs} | {clients} | {:.0} | {:.2} | {:.2} | {} | {:.0}% |",
                    backend_name(backend),
                    cell.rate,
                    cell.p50_ms,
                    cell.p99_ms,
                    cell.errors,
                    100.0 * cell.rate / ceiling
                );
            }
        }
        drop(node);
    }
}

// ---------- durable grafts driven by wrk ----------

/// A duration as wrk prints it ("812.00us", "19.38ms", "1.02s"), in ms.
fn wrk_ms(text: &str) -> f64 {
    let unit = |suffix: &str, scale: f64| {
        text.strip_suffix(suffix)
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v * scale)
    };
    unit("us", 1e-3)
        .or_else(|| unit("ms", 1.0))
        .or_else(|| unit("s", 1e3))
        .unwrap_or(f64::NAN)
}

/// `wrk -t2 -c64` with `scripts/wrk-graft.lua` (grafts into `runs` runs) against `base` for
/// `secs`: requests/s, p99 ms and the requests not answered 2xx.
fn wrk(base: &str, secs: u64, runs: usize) -> (f64, f64, u64) {
    let out = std::process::Command::new("wrk")
        .env("WRK_RUNS", runs.to_string())
        .args(["-t2", "-c64", &format!("-d{secs}s"), "--latency", "-s"])
        .arg(common::repo_path("scripts/wrk-graft.lua"))
        .arg(base)
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (
        field("Requests/sec:").parse().unwrap_or(f64::NAN),
        wrk_ms(&field("99%")),
        field("Non-2xx or 3xx responses:").parse().unwrap_or(0),
    )
}

/// One [`wrk`] run against a node, and the CPU it cost.
struct Measured {
    rate: f64,
    p99: f64,
    errors: u64,
    /// The node's CPU per request, µs.
    node_us: f64,
    /// Of it, the threads that write the database (SQLite: tokio's blocking pool, where the
    /// writer runs, and the checkpoint thread; PostgreSQL: the connections' thread), µs.
    storage_us: f64,
    /// The PostgreSQL server's processes per request, µs (every `postgres` process on the
    /// machine: run it for nothing else meanwhile); 0 on SQLite.
    server_us: f64,
    /// How busy the machine's cores were, %.
    busy: f64,
}

/// The node's threads that write the database (see [`Measured::storage_us`]), by name.
fn storage_thread(name: &str) -> bool {
    name.starts_with("tokio-") || name.starts_with("sqlite-") || name == "pg-connections"
}

/// [`wrk`] against `node` on `backend` for `secs`, with what it cost.
fn wrk_measured(node: &Node, backend: Backend, secs: u64, runs: usize) -> Measured {
    wrk_measured_at(&node.base, node.pid(), backend, secs, runs)
}

/// [`wrk_measured`] against the node at `base`, which is process `pid`.
fn wrk_measured_at(base: &str, pid: u32, backend: Backend, secs: u64, runs: usize) -> Measured {
    let storage = || -> f64 {
        procfs::thread_cpu_secs(pid)
            .iter()
            .filter(|(name, _)| storage_thread(name))
            .map(|(_, secs)| secs)
            .sum()
    };
    let server = || match backend {
        Backend::Postgres => procfs::processes_cpu_secs("postgres"),
        Backend::Sqlite => 0.0,
    };
    let (node0, storage0, server0) = (procfs::cpu_secs(pid), storage(), server());
    let (busy0, idle0) = procfs::machine_jiffies();
    let (rate, p99, errors) = wrk(base, secs, runs);
    let (busy1, idle1) = procfs::machine_jiffies();
    let per_request = |used: f64| 1e6 * used / (rate * secs as f64).max(1.0);
    let (busy, idle) = (busy1.saturating_sub(busy0), idle1.saturating_sub(idle0));
    Measured {
        rate,
        p99,
        errors,
        node_us: per_request(procfs::cpu_secs(pid) - node0),
        storage_us: per_request(storage() - storage0),
        server_us: per_request(server() - server0),
        busy: 100.0 * busy as f64 / (busy + idle).max(1) as f64,
    }
}

/// Durable grafts/s over HTTP into `runs` runs with `wrk` as the client (C, two threads,
/// little CPU per request), beside the in-process ceiling of the same grafts measured in the
/// same run, on SQLite, SQLite in RAM and PostgreSQL, and over many runs the same node writing
/// nothing ([`InProcessNode`]). One run (`-- wrk-hot`) is a run many write to at once: its
/// document grows by about 7,000 grafts a second.
async fn wrk_cells(quick: bool, runs: usize) {
    let secs = if quick { 5 } else { 10 };
    // The work of `scripts/wrk-graft.lua`'s requests: "Agent" after "Step1".
    let graft = |_| run_doc::Mutation::Graft {
        id: Uuid::new_v4(),
        retry_safe: false,
        agent: "Agent".into(),
        after_step: "Step1".into(),
        user: "bench".into(),
    };
    let ceiling = in_process_ceiling(runs, 80_000, 7919, graft);
    let (over, section) = if runs == 1 {
        ("one run".to_string(), "wrk-hot")
    } else {
        (format!("{runs} runs"), "wrk")
    };
    println!("\n### Durable grafts over HTTP, wrk -t2 -c64, {over} (`-- {section}`)\n");
    println!("In-process ceiling of the same grafts, one thread, 80,000 into {over}: {ceiling:.0} grafts/s.\n");
    println!("| backend | requests/s | p99 ms | not 2xx | node CPU per request | of it, writing the database | database server per request | cores busy | share of in-process ceiling |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    // SQLite in RAM as well (tmpfs: its fsyncs return at once and nothing reaches a device),
    // as a bound: what the same node does when the disk costs nothing.
    let shm = std::path::Path::new("/dev/shm");
    let cells = [
        (Backend::Sqlite, false),
        (Backend::Sqlite, true),
        (Backend::Postgres, false),
    ];
    for (backend, in_ram) in cells {
        if in_ram && !shm.is_dir() {
            continue;
        }
        let db = if in_ram {
            TestDb::sqlite_under(shm)
        } else {
            TestDb::new(backend).await
        };
        let node = throughput_node(&db);
        // Warm: every run loaded and the database's first pages written.
        wrk(&node.base, 3, runs);
        let m = wrk_measured(&node, backend, secs, runs);
        let name = if in_ram {
            "SQLite in RAM (tmpfs, a bound)"
        } else {
            backend_name(backend)
        };
        let database = (
            format!("{:.0} µs", m.storage_us),
            format!("{:.0} µs", m.server_us),
        );
        print_wrk_row(name, &m, database, ceiling);
        drop(node);
    }
    if runs == 1 {
        // A hot run passes `copy-max-changes` within seconds: the other rows then build its
        // snapshots from storage, which this node's log (empty) would make nearly free.
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await;
    let node = InProcessNode::without_durable_writes(&db);
    wrk(&node.base, 3, runs);
    let m = wrk_measured_at(&node.base, std::process::id(), Backend::Sqlite, secs, runs);
    // No database columns: the writing threads' names would match this process's own runtime.
    let database = ("—".to_string(), "—".to_string());
    print_wrk_row(
        "no durable write (this process, a bound)",
        &m,
        database,
        ceiling,
    );
    node.stop().await;
}

/// One row of [`wrk_cells`]' table; `database` fills its two database columns.
fn print_wrk_row(name: &str, m: &Measured, database: (String, String), ceiling: f64) {
    println!(
        "| {name} | {:.0} | {:.1} | {} | {:.0} µs | {} | {} | {:.0}% | {:.0}% |",
        m.rate,
        m.p99,
        m.errors,
        m.node_us,
        database.0,
        database.1,
        m.busy,
        100.0 * m.rate / ceiling
    );
}

/// The node in this process on a SQLite store whose appends are acknowledged and dropped
/// (`no_writes::NoDurableWrites`; snapshots and reads still reach the database): what the
/// write path would do if the database cost nothing, the hand-off to the writer and the rows'
/// building included. This process then holds only the node and idle threads, so its CPU is
/// the node's. The node has no such mode of its own.
struct InProcessNode {
    base: String,
    server: actix_web::dev::ServerHandle,
    thread: std::thread::JoinHandle<()>,
}

impl InProcessNode {
    fn without_durable_writes(db: &TestDb) -> InProcessNode {
        let url = db.url.clone();
        let (started, addr) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                // As `throughput_node` configures the node process.
                let settings = crdt_node::config::Settings::load_from(
                    &common::repo_path("config/application.yml"),
                    true,
                    |key| match key {
                        "DATABASE_URL" => Some(url.clone()),
                        "PORT" => Some("0".into()),
                        _ => THROUGHPUT_ENV
                            .iter()
                            .find(|(k, _)| *k == key)
                            .map(|(_, v)| v.to_string()),
                    },
                )
                .expect("settings");
                let db = &settings.database;
                let store = run_store::open(&db.url, db.pool_size, db.create_if_missing)
                    .await
                    .expect("open the store");
                let store = std::sync::Arc::new(no_writes::NoDurableWrites(store));
                let node = crdt_node::node::start_with_store(&settings, store)
                    .await
                    .expect("start the node");
                let _ = started.send((node.addr, node.server.clone()));
                let _ = node.task.await;
                actix::System::current().stop();
            });
            // Runs the system until that stop: its arbiters (the runs' threads, the store's
            // users) end with it instead of living on beside the next cells.
            let _ = system.run();
        });
        let (addr, server) = addr.recv().expect("the node started");
        InProcessNode {
            base: format!("http://{addr}"),
            server,
            thread,
        }
    }

    async fn stop(self) {
        self.server.stop(false).await;
        let _ = self.thread.join();
    }
}

/// Durable grafts with `wrk` into 10 runs of 10,000 events each (`LONG_EVENTS`; the runs of
/// `scripts/wrk-graft.lua` with `WRK_RUNS=10`, seeded with a snapshot at their end): a run's
/// snapshot saves all of it, so their cost per request shows here, with how many were written
/// and from what (a run past `crdt.snapshot.copy-max-changes` is rebuilt from storage).
async fn long_runs(quick: bool) {
    const RUNS: usize = 10;
    let events: usize = std::env::var("LONG_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let secs = if quick { 5 } else { 10 };
    println!("\n### Durable grafts over HTTP into {RUNS} runs of {events} events, wrk -t2 -c64 (`-- long`)\n");
    println!("| backend | requests/s | p99 ms | not 2xx | node CPU per request | snapshots from memory | from storage |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = TestDb::new(backend).await;
        let store = run_store::open(&db.url, 4, false).await.expect("store");
        for i in 1..=RUNS {
            let run = Uuid::parse_str(&format!("{i:08x}-0000-4000-8000-{i:012x}")).expect("id");
            seed_run_as(store.as_ref(), run, events, Some(events)).await;
        }
        drop(store);
        let node = throughput_node(&db);
        // Warm: every run loaded.
        wrk(&node.base, 3, RUNS);
        let snapshots = || async {
            let text = reqwest::get(node.url("/actuator/prometheus"))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics text");
            common::snapshots_written(&text)
        };
        let (memory0, storage0) = snapshots().await;
        let m = wrk_measured(&node, backend, secs, RUNS);
        let (memory1, storage1) = snapshots().await;
        println!(
            "| {} | {:.0} | {:.1} | {} | {:.0} µs | {:.0} | {:.0} |",
            backend_name(backend),
            m.rate,
            m.p99,
            m.errors,
            m.node_us,
            memory1 - memory0,
            storage1 - storage0,
        );
        drop(node);
    }
}

// ---------- load time ----------

/// Builds a run of `events` events in the store; with `snapshot_at`, a snapshot of the state
/// after that many events.
async fn seed_run(store: &dyn run_store::Store, events: usize, snapshot_at: Option<usize>) -> Uuid {
    let run = Uuid::new_v4();
    seed_run_as(store, run, events, snapshot_at).await;
    run
}

/// As [`seed_run`], for the run `run`.
async fn seed_run_as(
    store: &dyn run_store::Store,
    run: Uuid,
    events: usize,
    snapshot_at: Option<usize>,
) {
    let mut doc = RunDoc::new(run, "us-east-1");
    let mut batch = Vec::new();
    for i in 0..events {
        let change = doc
            .apply(&mix(i), 1_764_000_000_000)
            .expect("apply")
            .change
            .expect("a change");
        batch.push(NewEvent {
            run_id: run,
            run_seq: i as i64 + 1,
            event_type: "BENCH".into(),
            payload: None,
            user_id: None,
            created_at: chrono::Utc::now().naive_utc(),
            crdt_changes: change.raw_bytes().to_vec(),
            change_hash: change.hash().as_ref().to_vec(),
            source_region: "us-east-1".into(),
            lamport: doc.lamport() as i64,
            kind: Some(doc.describe(&change).kind.as_str().into()),
            content: Some(doc.describe(&change).content.to_string()),
            fence: None,
        });
        if batch.len() == 1000 {
            store.append(&batch).await.expect("append");
            batch.clear();
        }
        if Some(i + 1) == snapshot_at {
            let snapshot = Snapshot {
                id: Uuid::new_v4(),
                run_id: run,
                data: doc.save(),
                lamport: doc.lamport() as i64,
                region: "us-east-1".into(),
                created_at: chrono::Utc::now().naive_utc(),
                event_count: (i + 1) as i32,
                projection: None,
                fence: None,
            };
            store.save_snapshot(&snapshot, 10).await.expect("snapshot");
        }
    }
    store.append(&batch).await.expect("append");
}

/// A table row: the backend, the fast load, the slow one, and how much faster.
fn load_row(backend: Backend, fast: Duration, slow: Duration) {
    let name = if backend == Backend::Sqlite {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    println!(
        "| {name} | {:.1} ms | {:.1} ms | {:.1}× faster |",
        slow.as_secs_f64() * 1e3,
        fast.as_secs_f64() * 1e3,
        slow.as_secs_f64() / fast.as_secs_f64()
    );
}

async fn median_load(store: &dyn run_store::Store, run: Uuid) -> (Duration, u64) {
    let mut times = Vec::new();
    let mut lamport = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let loaded = crdt_node::runs::loader::load(store, run, "us-east-1")
            .await
            .expect("load");
        times.push(start.elapsed());
        lamport = loaded.doc.lamport();
    }
    times.sort();
    (times[2], lamport)
}

async fn load_time() {
    println!("\n### Loading a run of 10,000 events (median of 5)\n");
    println!("| backend | full replay of 10,000 events | snapshot at 9,950 + 50 events | ratio |");
    println!("|---|---:|---:|---:|");
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = TestDb::new(backend).await;
        let store = run_store::open(&db.url, 4, false).await.expect("store");
        let with_snapshot = seed_run(store.as_ref(), 10_000, Some(9_950)).await;
        let without = seed_run(store.as_ref(), 10_000, None).await;
        let (fast, l1) = median_load(store.as_ref(), with_snapshot).await;
        let (slow, l2) = median_load(store.as_ref(), without).await;
        assert_eq!(
            (l1, l2),
            (10_000, 10_000),
            "both loads restore the whole clock"
        );
        load_row(backend, fast, slow);
    }
}

// ---------- memory ----------

async fn memory() {
    const RUNS: usize = 10_000;
    const OPS: usize = 10;
    let db = TestDb::new(Backend::Postgres).await;
    let node = Node::spawn(
        &db,
        &[
            ("CRDT_RUN_IDLE_SECS", "3600"),
            ("RUST_LOG", "warn,crdt_node=info"),
        ],
    );
    let addr = node.base.trim_start_matches("http://").to_string();
    let warm = [Uuid::new_v4()];
    drive(&addr, 4, &warm, Duration::ZERO, Duration::from_millis(500)).await;
    let before = procfs::rss_kib(node.pid());
    let runs: Vec<Uuid> = (0..RUNS).map(|_| Uuid::new_v4()).collect();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in runs.chunks(RUNS / 32) {
        let chunk = chunk.to_vec();
        let addr = addr.clone();
        tasks.spawn(async move {
            let mut conn = Conn::open(&addr).await;
            for run in chunk {
                for i in 0..OPS {
                    let status = conn.call(&http_request(run, i)).await.expect("request");
                    assert!(status == 200 || status == 201, "status {status}");
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    let text = reqwest::get(node.url("/actuator/prometheus"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let loaded = common::metric(&text, "crdt_runs_loaded").unwrap_or(0.0);
    let after = procfs::rss_kib(node.pid());
    println!("\n### Memory for {RUNS} loaded runs of {OPS} operations each\n");
    println!(
        "Runs loaded: {loaded:.0}. Resident memory {:.1} MiB before, {:.1} MiB after: {:.1} KiB per run. ({} mutations written in {:.1} s.)",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / RUNS as f64,
        RUNS * OPS,
        elapsed.as_secs_f64()
    );
}

// ---------- legacy replay ----------

/// Writes `n` legacy (OT) rows for `run`, as the old system left them.
async fn seed_legacy(db: &TestDb, run: Uuid, n: usize) {
    let id = common::db::run_literal(db, run);
    for start in (0..n).step_by(500) {
        let rows: Vec<String> = (start..(start + 500).min(n))
            .map(|i| {
                let (kind, payload) = match i % 4 {
                    0 | 1 => ("GRAFT", format!(r#"{{"agent":"Agent{i}","afterStep":"Step{}","user":"u{}","region":"us-east-1"}}"#, i % 50, i % 7)),
                    2 => ("SET_FLAG", format!(r#"{{"key":"flag{}","value":{i},"user":"u"}}"#, i % 40)),
                    _ => ("PRUNE", format!(r#"{{"stepId":"Step{}","user":"u"}}"#, i % 60)),
                };
                format!("({id}, '{kind}', '{payload}', 'legacy', '2025-06-01 10:00:00')")
            })
            .collect();
        common::db::execute(
            db,
            &format!(
                "INSERT INTO collaboration_events (run_id, event_type, payload, user_id, created_at) VALUES {}",
                rows.join(", ")
            ),
        )
        .await;
    }
}

async fn legacy_load() {
    const EVENTS: usize = 10_000;
    println!("\n### Loading a run of {EVENTS} legacy (OT) events (median of 5)\n");
    println!("| backend | replaying the legacy log | from a snapshot of the same run | ratio |");
    println!("|---|---:|---:|---:|");
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = TestDb::new(backend).await;
        let store = run_store::open(&db.url, 4, false).await.expect("store");
        let run = Uuid::new_v4();
        seed_legacy(&db, run, EVENTS).await;
        let (replay, l1) = median_load(store.as_ref(), run).await;
        // The same run, snapshotted: later loads start from the snapshot.
        let mut loaded = crdt_node::runs::loader::load(store.as_ref(), run, "us-east-1")
            .await
            .expect("load");
        let snapshot = Snapshot {
            id: Uuid::new_v4(),
            run_id: run,
            data: loaded.doc.save(),
            lamport: loaded.doc.lamport() as i64,
            region: "us-east-1".into(),
            created_at: chrono::Utc::now().naive_utc(),
            event_count: 0,
            projection: None,
            fence: None,
        };
        store.save_snapshot(&snapshot, 10).await.expect("snapshot");
        let (fast, l2) = median_load(store.as_ref(), run).await;
        assert_eq!(l1, l2, "both loads restore the same clock");
        load_row(backend, fast, replay);
    }
}

// ---------- writes while a big run is snapshotted ----------

/// Writes to one 100,000-op run, one at a time, for `secs`; returns per-write latencies.
async fn write_for(addr: &str, run: Uuid, secs: f64) -> Vec<Duration> {
    let mut conn = Conn::open(addr).await;
    let mut latencies = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut i = 0;
    while Instant::now() < end {
        let start = Instant::now();
        let status = conn.call(&http_request(run, i)).await.expect("request");
        assert!(status == 200 || status == 201, "status {status}");
        latencies.push(start.elapsed());
        i += 1;
    }
    latencies
}

async fn snapshot_stall(quick: bool) {
    const OPS: usize = 100_000;
    let secs = if quick { 5.0 } else { 15.0 };
    println!("\n### Writes to a {OPS}-op run while it is snapshotted (SQLite, one writer)\n");
    println!("| snapshots | writes/s | p50 | p99 | worst stall | snapshots written |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, every) in [
        ("off", "100000000"),
        ("every 100 events (≥ 1 s apart)", "100"),
    ] {
        let db = TestDb::new(Backend::Sqlite).await;
        let run = {
            let store = run_store::open(&db.url, 4, false).await.expect("store");
            seed_run(store.as_ref(), OPS, None).await
        };
        let node = Node::spawn(
            &db,
            &[
                ("CRDT_SNAPSHOT_EVERY", every),
                ("RUST_LOG", "warn,crdt_node=info"),
            ],
        );
        let addr = node.base.trim_start_matches("http://").to_string();
        // Load the run first: the first write would otherwise pay for it.
        let _ = write_for(&addr, run, 0.5).await;
        let mut lat = write_for(&addr, run, secs).await;
        let text = common::Client::new()
            .text(&node.url("/actuator/prometheus"))
            .await;
        let snapshots = common::metric(&text, "crdt_snapshot_size_bytes_count").unwrap_or(0.0);
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e3;
        println!(
            "| {label} | {:.0} | {:.1} ms | {:.1} ms | {:.1} ms | {snapshots:.0} |",
            lat.len() as f64 / secs,
            pct(0.5),
            pct(0.99),
            pct(1.0),
        );
    }
}

//! Issue 24: a region whose pods share one PostgreSQL database (one owner per run), with one pod
//! and with three, beside three pods with a database each (the earlier layout: full replicas
//! meshed with each other). Every layout holds 10,000 active runs on the release build, its
//! pods and PostgreSQL on this machine's two cores with the client.
//!
//! `cargo bench --bench cluster [-- layouts|stalls] [--quick]` prints, per layout: memory per
//! pod, rows written and CPU seconds (every pod and every PostgreSQL process together) per
//! mutation, and the write rate the client got; for three pods on a shared database, the
//! latency of a graft sent to the run's owner against one sent to another pod (forwarded);
//! and (`stalls`) how long writes wait while a pod is stopped and while one is killed.
//!
//! The client sends each run's requests to one pod, as the Ingress's hash by run id does
//! (`k8s/components/shared-database`); the first request claims the run there.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use test_support::bench::args::Args;
use test_support::bench::http::Conn;
use test_support::bench::procfs::{cpu_secs, processes_cpu_secs, rss_kib};
use test_support::bench::stats::percentile;
use test_support::proxy::Proxy;
use test_support::{mesh, Backend, Node, TestDb};
use uuid::Uuid;

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// Pods sharing the region's database, one owner per run.
    Shared(usize),
    /// Pods with a database each, meshed with each other.
    PerPod(usize),
}

impl Layout {
    fn name(self) -> String {
        match self {
            Layout::Shared(n) => format!("{n} pod(s), one shared database"),
            Layout::PerPod(n) => format!("{n} pods, a database each (meshed)"),
        }
    }

    fn pods(self) -> usize {
        match self {
            Layout::Shared(n) | Layout::PerPod(n) => n,
        }
    }
}

/// Keeps every run loaded (they are all active).
const COMMON: [(&str, &str); 4] = [
    ("REGION", "us"),
    ("CRDT_MAX_LOADED_RUNS", "50000"),
    ("CRDT_MAX_LOADED_OPS", "50000000"),
    ("CRDT_RUN_IDLE_SECS", "3600"),
];

struct Region {
    pods: Vec<Node>,
    /// The databases the pods write (one, or one per pod).
    databases: Vec<String>,
    _db: TestDb,
    _links: Vec<Proxy>,
}

impl Region {
    /// The pods' `host:port`, for the raw client.
    fn addrs(&self) -> Vec<String> {
        self.pods
            .iter()
            .map(|p| p.base.trim_start_matches("http://").to_string())
            .collect()
    }
}

async fn start(layout: Layout) -> Region {
    let db = TestDb::new(Backend::Postgres).await;
    let name = db.url.rsplit('/').next().unwrap_or_default().to_string();
    let n = layout.pods();
    let mut pods = Vec::new();
    let mut links = Vec::new();
    let mut databases = Vec::new();
    match layout {
        Layout::Shared(_) => {
            for i in 0..n {
                let node_id = format!("pod-{i}");
                let mut env: Vec<(&str, &str)> = COMMON.to_vec();
                env.extend([
                    ("NODE_ID", node_id.as_str()),
                    ("CRDT_CLUSTER", "true"),
                    ("CRDT_CLUSTER_ADVERTISE_URL", "http://127.0.0.1:0"),
                    ("CRDT_CLUSTER_SECRET", "bench-cluster-secret"),
                ]);
                pods.push(Node::spawn(&db, &env));
            }
            databases.push(name);
        }
        Layout::PerPod(_) => {
            for _ in 0..n {
                links.push(Proxy::start().await);
            }
            for i in 0..n {
                let node_id = format!("pod-{i}");
                let peers: Vec<String> =
                    (0..n).filter(|j| *j != i).map(|j| links[j].url()).collect();
                let mut env: Vec<(String, String)> = mesh::mesh_env("us", &node_id, &peers);
                env.retain(|(k, _)| {
                    k != "CRDT_MESH_HEARTBEAT_MS" && k != "CRDT_MESH_PEER_TIMEOUT_MS"
                });
                env.extend(COMMON.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                env.push(("DATABASE_PER_NODE".into(), "true".into()));
                env.push(("DATABASE_CREATE_IF_MISSING".into(), "true".into()));
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                pods.push(Node::spawn(&db, &env));
                databases.push(format!("{name}_pod_{i}"));
            }
            for (link, pod) in links.iter().zip(&pods) {
                link.target(&pod.base);
            }
            // The links up before anything is written.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    Region {
        pods,
        databases,
        _db: db,
        _links: links,
    }
}

fn graft(run: Uuid, i: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"agent":"agent-{i}","afterStep":"S{}","user":"svc"}}"#,
        i % 7
    );
    format!(
        "POST /api/crdt/runs/{run}/grafts HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The pod a run's requests go to (as the Ingress hashes them).
fn home(run: Uuid, pods: usize) -> usize {
    (run.as_u128() % pods as u128) as usize
}

/// Sends `ops` grafts, op `i` to run `pick(i)` on its home pod, `concurrency` at a time.
async fn drive(
    region: &Region,
    runs: &Arc<Vec<Uuid>>,
    ops: usize,
    pick: fn(usize, usize) -> usize,
) -> f64 {
    // 64 in flight per pod: each pod sees the load one pod alone sees.
    let concurrency = 64 * region.pods.len();
    let next = Arc::new(AtomicUsize::new(0));
    let addrs = Arc::new(region.addrs());
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, addrs, runs) = (next.clone(), addrs.clone(), runs.clone());
            tokio::spawn(async move {
                let mut conns: Vec<Option<Conn>> = (0..addrs.len()).map(|_| None).collect();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= ops {
                        return;
                    }
                    let run = runs[pick(i, runs.len())];
                    let pod = home(run, addrs.len());
                    // A connection the pod closed (idle past its keep-alive) is opened again.
                    let mut status = 0;
                    for _ in 0..2 {
                        let conn = match &mut conns[pod] {
                            Some(c) => c,
                            slot => slot.insert(Conn::open(&addrs[pod]).await),
                        };
                        status = conn.call(&graft(run, i)).await.unwrap_or(0);
                        if status != 0 {
                            break;
                        }
                        conns[pod] = None;
                    }
                    assert!(status == 201 || status == 200, "graft answered {status}");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    ops as f64 / started.elapsed().as_secs_f64()
}

/// Transactions the pods' group committers have made so far (`crdt_commit_batch_appends`).
async fn commits(region: &Region) -> f64 {
    let mut total = 0.0;
    for pod in &region.pods {
        let mut conn = Conn::open(pod.base.trim_start_matches("http://")).await;
        let request = b"GET /actuator/prometheus HTTP/1.1\r\nHost: bench\r\n\r\n";
        if conn.call(request).await.is_ok() {
            let text = String::from_utf8_lossy(&conn.body).to_string();
            total += test_support::metric(&text, "crdt_commit_batch_appends_count").unwrap_or(0.0);
        }
    }
    total
}

fn rows(database: &str) -> i64 {
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", database, "-Atc"])
        .arg("SELECT count(*) FROM collaboration_events")
        .output()
        .expect("psql");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn drop_database(database: &str) {
    let _ = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-qAtc",
        ])
        .arg(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .output();
}

/// One layout's row; for three pods on a shared database also the forwarding figures.
async fn layout(layout: Layout, runs: usize, ops: usize) -> Option<String> {
    let region = start(layout).await;
    let ids: Arc<Vec<Uuid>> = Arc::new((0..runs).map(|_| Uuid::new_v4()).collect());
    // Every run gets its first graft (claimed by its home pod on a shared database).
    drive(&region, &ids, runs, |i, _| i).await;
    // The meshed layout replicates every run to every pod: let it settle.
    if matches!(layout, Layout::PerPod(_)) {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let pids: Vec<u32> = region.pods.iter().map(Node::pid).collect();
    // (the pods', PostgreSQL's) CPU seconds so far.
    let cpu = || {
        (
            pids.iter().map(|p| cpu_secs(*p)).sum::<f64>(),
            processes_cpu_secs("postgres"),
        )
    };
    let rows_now = || region.databases.iter().map(|d| rows(d)).sum::<i64>();
    let (cpu_before, rows_before, commits_before) = (cpu(), rows_now(), commits(&region).await);
    // Random runs among all of them.
    let rate = drive(&region, &ids, ops, |i, n| {
        (i.wrapping_mul(2_654_435_761)) % n
    })
    .await;
    if matches!(layout, Layout::PerPod(_)) {
        // Replication to the other pods is work this layout does per mutation too.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let (cpu_after, rows_after, commits_after) = (cpu(), rows_now(), commits(&region).await);
    let rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p) / 1024).collect();
    println!(
        "| {} | {} | {:.2} | {:.2} | {:.0} µs ({:.0} + {:.0}) | {:.0}/s |",
        layout.name(),
        rss.iter()
            .map(|m| format!("{m}"))
            .collect::<Vec<_>>()
            .join(" / "),
        (rows_after - rows_before) as f64 / ops as f64,
        (commits_after - commits_before) / ops as f64,
        (cpu_after.0 + cpu_after.1 - cpu_before.0 - cpu_before.1) / ops as f64 * 1e6,
        (cpu_after.0 - cpu_before.0) / ops as f64 * 1e6,
        (cpu_after.1 - cpu_before.1) / ops as f64 * 1e6,
        rate,
    );
    let extra = if layout == Layout::Shared(3) {
        Some(forwarding(&region, &ids, ops.min(2000)).await)
    } else {
        None
    };
    if let Layout::PerPod(_) = layout {
        let databases = region.databases.clone();
        drop(region);
        for d in databases {
            drop_database(&d);
        }
    }
    extra
}

/// One client, one request at a time: grafts to the run's owner, and to another pod.
async fn forwarding(region: &Region, runs: &[Uuid], n: usize) -> String {
    let addr = |i: usize| {
        region.pods[i]
            .base
            .trim_start_matches("http://")
            .to_string()
    };
    let pods = region.pods.len();
    let mut to_owner: Vec<Conn> = Vec::new();
    for i in 0..pods {
        to_owner.push(Conn::open(&addr(i)).await);
    }
    let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
    for i in 0..n {
        let run = runs[(i * 7919) % runs.len()];
        let owner = home(run, pods);
        // Alternating, so both see the same machine.
        for (pod, sample) in [(owner, &mut direct), ((owner + 1) % pods, &mut forwarded)] {
            let started = Instant::now();
            let status = to_owner[pod].call(&graft(run, i)).await.expect("graft");
            assert!(status == 201 || status == 200, "graft answered {status}");
            sample.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    for s in [&mut direct, &mut forwarded] {
        s.sort_by(f64::total_cmp);
    }
    let p = |s: &[f64], q| percentile(s, q).unwrap_or(f64::NAN);
    format!(
        "\nA graft through the run's owner against through another pod ({n} each, one at a time):\n\n\
         | sent to | p50 | p99 |\n|---|---:|---:|\n\
         | the owner | {:.2} ms | {:.2} ms |\n| another pod (forwarded) | {:.2} ms | {:.2} ms |",
        p(&direct, 0.5),
        p(&direct, 0.99),
        p(&forwarded, 0.5),
        p(&forwarded, 0.99),
    )
}

/// How long writes to runs wait while pods go away: a pod stopped as a rolling update stops it
/// (taken out of the endpoints first, then SIGTERM), and a pod killed outright. Writers send
/// each run's grafts to its pod and, when that fails or answers 503, to the next live pod after
/// 50 ms, as a service behind the Ingress retries; a write's wait is from its first attempt to
/// its acknowledgement.
async fn stalls(runs: usize) {
    let mut region = start(Layout::Shared(3)).await;
    let ids: Arc<Vec<Uuid>> = Arc::new((0..runs).map(|_| Uuid::new_v4()).collect());
    drive(&region, &ids, runs, |i, _| i).await;
    let live: Arc<std::sync::Mutex<Vec<bool>>> = Arc::new(std::sync::Mutex::new(vec![true; 3]));
    let addrs = Arc::new(region.addrs());
    let started = Instant::now();
    let stop_at = Duration::from_secs(19);
    // (when the write began, its wait, the run's pod)
    let waits: Arc<std::sync::Mutex<Vec<(f64, f64, usize)>>> = Arc::default();
    let writers: Vec<_> =
        (0..32)
            .map(|w| {
                let (ids, live, addrs, waits) =
                    (ids.clone(), live.clone(), addrs.clone(), waits.clone());
                tokio::spawn(async move {
                    let mut n = w;
                    while started.elapsed() < stop_at {
                        let run = ids[n % ids.len()];
                        n += 32;
                        let home_pod = home(run, 3);
                        let began = started.elapsed().as_secs_f64();
                        let mut pod = home_pod;
                        loop {
                            let up = live.lock().map(|l| l[pod]).unwrap_or(false);
                            if up {
                                let answered =
                                    match Conn::open_within(&addrs[pod], Duration::from_secs(2))
                                        .await
                                    {
                                        Some(mut c) => c.call(&graft(run, n)).await.unwrap_or(0),
                                        None => 0,
                                    };
                                if answered == 201 || answered == 200 {
                                    break;
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            pod = (pod + 1) % 3;
                        }
                        let wait = started.elapsed().as_secs_f64() - began;
                        waits.lock().unwrap().push((began, wait, home_pod));
                    }
                })
            })
            .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A rolling update: out of the endpoints, then SIGTERM.
    live.lock().unwrap()[1] = false;
    let stopping_at = started.elapsed().as_secs_f64();
    let mut stopping = region.pods.remove(1);
    let stopped = tokio::task::spawn_blocking(move || {
        let status = stopping.terminate(30);
        (stopping, status)
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    // A pod killed outright (its address still in the endpoints for a moment).
    let killed_at = started.elapsed().as_secs_f64();
    region.pods[1].kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    live.lock().unwrap()[2] = false;
    for w in writers {
        w.await.expect("writer");
    }
    let (stopped, status) = stopped.await.expect("joined");
    let handed = stopped
        .log_text()
        .lines()
        .find(|l| l.contains("cluster: left"))
        .and_then(|l| l.split("cluster: ").nth(1).map(str::to_string))
        .unwrap_or_else(|| "did not say it left".into());
    let waits = waits.lock().unwrap().clone();
    // Writes begun within [from, to), to runs of `pod` (any, if None).
    let window = |from: f64, to: f64, pod: Option<usize>| {
        let mut w: Vec<f64> = waits
            .iter()
            .filter(|(began, _, p)| *began >= from && *began < to && pod.is_none_or(|x| x == *p))
            .map(|(_, wait, _)| wait * 1e3)
            .collect();
        w.sort_by(f64::total_cmp);
        w
    };
    let row = |what: &str, w: &[f64]| {
        format!(
            "| {what} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            w.len(),
            percentile(w, 0.5).unwrap_or(f64::NAN),
            percentile(w, 0.99).unwrap_or(f64::NAN),
            w.last().copied().unwrap_or(f64::NAN),
        )
    };
    println!(
        "\nWrites while pods go away ({runs} runs, 32 writers; the stopped pod exited {} and {}; lease 5 s):\n\n\
         | writes | count | p50 wait | p99 wait | longest |\n|---|---:|---:|---:|---:|\n{}\n{}\n{}",
        status.map_or("not in 30 s".into(), |s| s.to_string()),
        handed,
        row("before anything happened (every run)", &window(0.0, stopping_at, None)),
        row(
            "to pod 1's runs, within 4 s of its SIGTERM",
            &window(stopping_at, stopping_at + 4.0, Some(1))
        ),
        row(
            "to every run, within 8 s of pod 2's kill -9",
            &window(killed_at, killed_at + 8.0, None)
        ),
    );
}

fn main() {
    let args = Args::from_env();
    let quick = args.flag("--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    if args.wants("layouts") {
        let (runs, ops) = if quick {
            (1_000, 2_000)
        } else {
            (10_000, 20_000)
        };
        println!(
            "{runs} active runs, {ops} grafts on random runs, 64 at a time per pod, each to its run's pod\n\n\
             | layout | RSS per pod (MiB) | rows written per mutation | transactions per mutation | CPU per mutation (pods + PostgreSQL) | grafts/s |\n\
             |---|---|---:|---:|---:|---:|"
        );
        let mut extra = Vec::new();
        for l in [Layout::Shared(1), Layout::Shared(3), Layout::PerPod(3)] {
            extra.extend(rt.block_on(layout(l, runs, ops)));
        }
        for text in extra {
            println!("{text}");
        }
    }
    if args.wants("stalls") {
        rt.block_on(stalls(if quick { 300 } else { 3_000 }));
    }
}

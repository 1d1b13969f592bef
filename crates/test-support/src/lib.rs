//! What crdt-node's integration tests and benchmarks share: real node processes on ephemeral
//! ports, each with a database of its own (a temporary SQLite file, or a fresh PostgreSQL
//! database dropped afterwards); raw clients of each protocol ([`mesh`], [`repo`]);
//! fault-injecting proxies ([`proxy`]), TLS ([`tls`]); the benchmarks' helpers ([`bench`]).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async test body once per backend: `both_backends!(name);` expects
/// `async fn name(backend: Backend)` and makes `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() { super::$name($crate::Backend::Sqlite).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { super::$name($crate::Backend::Postgres).await }
        }
    )*};
}

pub fn pg_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database for one test.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => Self::sqlite(tempfile::tempdir().expect("temp dir")),
            Backend::Postgres => {
                let admin = pg_admin_url();
                let name = format!("crdt_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = AsyncPgConnection::establish(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("PostgreSQL at {admin} is required for this test: {e}")
                    });
                diesel::sql_query(format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create db");
                let base = admin
                    .rsplit_once('/')
                    .map(|(b, _)| b.to_string())
                    .unwrap_or(admin.clone());
                TestDb {
                    url: format!("{base}/{name}"),
                    backend,
                    _dir: None,
                    pg_name: Some(name),
                }
            }
        }
    }

    /// A SQLite database in a new directory under `parent` (a benchmark puts one in RAM, under
    /// `/dev/shm`, to see what the disk costs).
    pub fn sqlite_under(parent: &std::path::Path) -> TestDb {
        Self::sqlite(tempfile::tempdir_in(parent).expect("temp dir"))
    }

    fn sqlite(dir: tempfile::TempDir) -> TestDb {
        let url = format!("sqlite://{}", dir.path().join("crdt.db").display());
        TestDb {
            url,
            backend: Backend::Sqlite,
            _dir: Some(dir),
            pg_name: None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // Drop runs outside any async context we may block; use a thread of our own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async move {
                    let mut conn = AsyncPgConnection::establish(&pg_admin_url()).await.ok()?;
                    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await
                        .ok()
                })
            })
            .join();
        }
    }
}

/// A node process.
pub struct Node {
    child: Child,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts the node binary on an ephemeral port against `db`, with extra environment.
    pub fn spawn(db: &TestDb, env: &[(&str, &str)]) -> Node {
        Self::spawn_binary(
            &node_binary(),
            &repo_path("config/application.yml"),
            db,
            env,
        )
    }

    /// As [`Node::spawn`], with another build of the node and its configuration file (a
    /// benchmark compares this build with an earlier one).
    pub fn spawn_binary(binary: &str, config: &str, db: &TestDb, env: &[(&str, &str)]) -> Node {
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CRDT_CONFIG", config)
            .env("DATABASE_URL", &db.url)
            .env("PORT", "0")
            .env("RUST_LOG", "info,automerge=warn,actix_web_prom=error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start crdt-node");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Node {
                child,
                base: format!("http://{addr}"),
                log,
            },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "node did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `secs` for the process to exit; its exit status if it did.
    pub fn terminate(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        // A panic inside a node (a dead arbiter thread, say) fails the test that saw it, even
        // when everything the test asked of the node still worked.
        if !std::thread::panicking() {
            let log = self.log_text();
            if let Some(at) = log.find("panicked at") {
                let tail: String = log[at..].chars().take(2000).collect();
                panic!("the node panicked during the test:\n{tail}");
            }
        }
    }
}

/// A thin JSON client: every call returns (status, body as JSON).
#[derive(Clone, Default)]
pub struct Client {
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    pub fn new() -> Client {
        Client::default()
    }

    pub fn with_token(token: &str) -> Client {
        Client {
            http: reqwest::Client::new(),
            token: Some(token.into()),
        }
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = self.auth(rb).send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub async fn get(&self, url: &str) -> (u16, Value) {
        self.send(self.http.get(url)).await
    }

    pub async fn post(&self, url: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.post(url).json(body)).await
    }

    pub async fn put(&self, url: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.put(url).json(body)).await
    }

    pub async fn delete(&self, url: &str) -> (u16, Value) {
        self.send(self.http.delete(url)).await
    }

    pub async fn raw(
        &self,
        rb: impl FnOnce(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> (u16, Value) {
        let rb = rb(&self.http);
        self.send(rb).await
    }

    pub async fn text(&self, url: &str) -> String {
        self.auth(self.http.get(url))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body")
    }
}

pub fn run_url(node: &Node, run: uuid::Uuid, rest: &str) -> String {
    node.url(&format!("/api/crdt/runs/{run}{rest}"))
}

/// The agents of a state's grafts, in the order the state lists them.
pub fn agents(state: &Value) -> Vec<String> {
    state["grafts"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .filter_map(|g| g["agent"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of a Prometheus sample line `name{labels} value` (or `name value`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Snapshots a node reports written (`crdt_snapshots_written_total`) in the metrics `text`: from
/// memory, from storage.
pub fn snapshots_written(text: &str) -> (f64, f64) {
    let from = |source: &str| {
        let series = format!("crdt_snapshots_written_total{{source=\"{source}\"}}");
        metric(text, &series).unwrap_or(0.0)
    };
    (from("memory"), from("storage"))
}

/// Polls `f` until it returns Some, for up to `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Direct reads of the tables, to check what the node stored.
pub mod db {
    use super::{Backend, TestDb};
    use diesel::prelude::*;
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    use run_store::schema;
    use uuid::Uuid;

    /// `event_count` of each stored snapshot of the run, newest first.
    pub async fn snapshot_positions(db: &TestDb, run: Uuid) -> Vec<i32> {
        match db.backend {
            Backend::Postgres => {
                use schema::pg::crdt_snapshots::dsl::*;
                let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
                let v: Vec<Option<i32>> = crdt_snapshots
                    .filter(run_id.eq(run))
                    .order(event_count.desc())
                    .select(event_count)
                    .load(&mut c)
                    .await
                    .unwrap();
                v.into_iter().map(|x| x.unwrap_or(0)).collect()
            }
            Backend::Sqlite => {
                use schema::sqlite::crdt_snapshots::dsl::*;
                let mut c = sqlite(db);
                let v: Vec<Option<i32>> = diesel::RunQueryDsl::load(
                    crdt_snapshots
                        .filter(run_id.eq(run.as_bytes().to_vec()))
                        .order(event_count.desc())
                        .select(event_count),
                    &mut c,
                )
                .unwrap();
                v.into_iter().map(|x| x.unwrap_or(0)).collect()
            }
        }
    }

    /// `lamport_timestamp` of each stored snapshot of the run, newest first.
    pub async fn snapshot_lamports(db: &TestDb, run: Uuid) -> Vec<i64> {
        match db.backend {
            Backend::Postgres => {
                use schema::pg::crdt_snapshots::dsl::*;
                let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
                crdt_snapshots
                    .filter(run_id.eq(run))
                    .order(event_count.desc())
                    .select(lamport_timestamp)
                    .load(&mut c)
                    .await
                    .unwrap()
            }
            Backend::Sqlite => {
                use schema::sqlite::crdt_snapshots::dsl::*;
                diesel::RunQueryDsl::load(
                    crdt_snapshots
                        .filter(run_id.eq(run.as_bytes().to_vec()))
                        .order(event_count.desc())
                        .select(lamport_timestamp),
                    &mut sqlite(db),
                )
                .unwrap()
            }
        }
    }

    /// The projection kept with the run's newest snapshot, if any.
    pub async fn snapshot_projection(db: &TestDb, run: Uuid) -> Option<Vec<u8>> {
        match db.backend {
            Backend::Postgres => {
                use schema::pg::crdt_snapshots::dsl::*;
                let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
                crdt_snapshots
                    .filter(run_id.eq(run))
                    .order(event_count.desc())
                    .select(projection)
                    .first(&mut c)
                    .await
                    .unwrap()
            }
            Backend::Sqlite => {
                use schema::sqlite::crdt_snapshots::dsl::*;
                diesel::RunQueryDsl::first(
                    crdt_snapshots
                        .filter(run_id.eq(run.as_bytes().to_vec()))
                        .order(event_count.desc())
                        .select(projection),
                    &mut sqlite(db),
                )
                .unwrap()
            }
        }
    }

    /// Replaces the projection of every snapshot of the run (to tell what answered a read).
    pub async fn set_snapshot_projection(db: &TestDb, run: Uuid, bytes: &[u8]) {
        let hex = hex::encode(bytes);
        let value = match db.backend {
            Backend::Postgres => format!("'\\x{hex}'::bytea"),
            Backend::Sqlite => format!("X'{hex}'"),
        };
        let run = run_literal(db, run);
        execute(
            db,
            &format!("UPDATE crdt_snapshots SET projection = {value} WHERE run_id = {run}"),
        )
        .await;
    }

    /// Every change the node's log holds, as (run, change hash in hex), in cursor order, read
    /// through the store as the node reads it.
    pub async fn logged_changes(db: &TestDb) -> Vec<(Uuid, String)> {
        let store = run_store::open(&db.url, 2, false).await.expect("store");
        let (mut after, mut out) = (0, Vec::new());
        loop {
            let page = store.feed(after, None, 1000).await.expect("feed");
            let Some(last) = page.last() else { return out };
            after = last.id;
            out.extend(
                page.iter()
                    .filter_map(|r| Some((r.run_id, hex::encode(r.change_hash.as_ref()?)))),
            );
        }
    }

    /// Number of event rows of the run.
    pub async fn event_rows(db: &TestDb, run: Uuid) -> i64 {
        match db.backend {
            Backend::Postgres => {
                use schema::pg::collaboration_events::dsl::*;
                let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
                collaboration_events
                    .filter(run_id.eq(run))
                    .count()
                    .get_result(&mut c)
                    .await
                    .unwrap()
            }
            Backend::Sqlite => {
                use schema::sqlite::collaboration_events::dsl::*;
                let mut c = sqlite(db);
                diesel::RunQueryDsl::get_result(
                    collaboration_events
                        .filter(run_id.eq(run.as_bytes().to_vec()))
                        .count(),
                    &mut c,
                )
                .unwrap()
            }
        }
    }

    /// `user_id` of the run's events, in log order.
    pub async fn event_users(db: &TestDb, run: Uuid) -> Vec<Option<String>> {
        match db.backend {
            Backend::Postgres => {
                use schema::pg::collaboration_events::dsl::*;
                let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
                collaboration_events
                    .filter(run_id.eq(run))
                    .order(run_seq.asc())
                    .select(user_id)
                    .load(&mut c)
                    .await
                    .unwrap()
            }
            Backend::Sqlite => {
                use schema::sqlite::collaboration_events::dsl::*;
                diesel::RunQueryDsl::load(
                    collaboration_events
                        .filter(run_id.eq(run.as_bytes().to_vec()))
                        .order(run_seq.asc())
                        .select(user_id),
                    &mut sqlite(db),
                )
                .unwrap()
            }
        }
    }

    /// Runs one SQL statement (used to damage or trim data on purpose).
    pub async fn execute(db: &TestDb, sql: &str) -> usize {
        match db.backend {
            Backend::Postgres => {
                let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
                diesel::sql_query(sql).execute(&mut c).await.unwrap()
            }
            Backend::Sqlite => {
                diesel::RunQueryDsl::execute(diesel::sql_query(sql), &mut sqlite(db)).unwrap()
            }
        }
    }

    /// PostgreSQL only: runs `body` (PL/pgSQL) before every insert into the event log, through
    /// a trigger named `name` (to slow commits down or make them fail).
    pub async fn on_insert(db: &TestDb, name: &str, body: &str) {
        assert_eq!(
            db.backend,
            Backend::Postgres,
            "PL/pgSQL triggers need PostgreSQL"
        );
        execute(
            db,
            &format!("CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN {body} END $$ LANGUAGE plpgsql"),
        )
        .await;
        execute(
            db,
            &format!("CREATE TRIGGER {name} BEFORE INSERT ON collaboration_events EXECUTE FUNCTION {name}()"),
        )
        .await;
    }

    /// Removes the insert trigger `name`.
    pub async fn drop_on_insert(db: &TestDb, name: &str) {
        let on = if db.backend == Backend::Postgres {
            " ON collaboration_events"
        } else {
            ""
        };
        execute(db, &format!("DROP TRIGGER {name}{on}")).await;
    }

    /// SQL that cuts a snapshot's bytes to their first 20, as a torn write would.
    pub fn torn_snapshot_data(db: &TestDb) -> &'static str {
        match db.backend {
            Backend::Postgres => "substring(snapshot_data from 1 for 20)",
            Backend::Sqlite => "substr(snapshot_data, 1, 20)",
        }
    }

    /// Rows of the run in every table that holds runs' data, by table (the tombstone apart).
    pub async fn rows_of_run(db: &TestDb, run: Uuid) -> Vec<(&'static str, i64)> {
        let id = run_literal(db, run);
        let mut out = Vec::new();
        for table in [
            "collaboration_events",
            "crdt_snapshots",
            "crdt_runs",
            "crdt_webhook_outbox",
        ] {
            let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE run_id = {id}");
            out.push((table, count(db, &sql).await));
        }
        out
    }

    /// The number a `SELECT COUNT(*) AS n ...` answers.
    pub async fn count(db: &TestDb, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let row: N = match db.backend {
            Backend::Postgres => {
                let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
                diesel::sql_query(sql).get_result(&mut c).await.unwrap()
            }
            Backend::Sqlite => {
                diesel::RunQueryDsl::get_result(diesel::sql_query(sql), &mut sqlite(db)).unwrap()
            }
        };
        row.n
    }

    /// The SQL literal of a run id in this backend.
    pub fn run_literal(db: &TestDb, run: Uuid) -> String {
        match db.backend {
            Backend::Postgres => format!("'{run}'"),
            Backend::Sqlite => format!("X'{}'", run.simple()),
        }
    }

    fn sqlite(db: &TestDb) -> diesel::SqliteConnection {
        let path = db.url.strip_prefix("sqlite://").unwrap();
        let mut conn = diesel::SqliteConnection::establish(path).unwrap();
        // The node may be writing (a snapshot, a commit): wait for its lock, as it waits for ours.
        diesel::connection::SimpleConnection::batch_execute(
            &mut conn,
            "PRAGMA busy_timeout = 5000;",
        )
        .unwrap();
        conn
    }
}
pub mod bench;
pub mod jwt;
pub mod mesh;
pub mod proxy;
pub mod raw_ws;
pub mod repo;
pub mod sse;
pub mod tls;

/// A path in the repository (the workspace root).
pub fn repo_path(relative: &str) -> String {
    format!("{}/../../{relative}", env!("CARGO_MANIFEST_DIR"))
}

/// The node binary the running test or benchmark was built with: `CRDT_NODE_BIN`, else the
/// `crdt-node` beside the test's own executable (cargo builds it into `target/<profile>/` for
/// the integration tests and benchmarks of its package; the test runs from `deps/` below).
pub fn node_binary() -> String {
    if let Ok(bin) = std::env::var("CRDT_NODE_BIN") {
        return bin;
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps/<test>");
    profile_dir.join("crdt-node").display().to_string()
}

/// The peak resident memory of process `pid` so far, in MiB (Linux `VmHWM`).
pub fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// A change of `run` (built on its genesis) that inserts `chars` characters in one text: a
/// few KB once Automerge deflates it, `chars` operations once applied.
pub fn op_bomb(run: uuid::Uuid, chars: usize) -> Vec<u8> {
    use automerge::transaction::Transactable;
    let genesis = run_doc::RunDoc::new(run, "eu").save();
    let mut doc = automerge::AutoCommit::load(&genesis).expect("genesis loads");
    let base = doc.get_heads();
    let text = doc
        .put_object(automerge::ROOT, "bomb", automerge::ObjType::Text)
        .expect("put");
    doc.splice_text(&text, 0, 0, &"a".repeat(chars))
        .expect("splice");
    doc.commit();
    let mut change = doc.get_changes(&base).pop().expect("one change");
    change.bytes().into_owned()
}

/// A valid Automerge document followed by a chunk Automerge's loader allocates gigabytes for
/// (`fuzz/known/`): 372 bytes.
pub fn loader_bomb() -> Vec<u8> {
    use automerge::transaction::Transactable;
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "a", 1).expect("put");
    let mut bytes = doc.save();
    let known = repo_path("fuzz/known/snapshot_load-oom-automerge-load");
    bytes.extend(std::fs::read(known).expect("fuzz/known input"));
    bytes
}

/// A WebSocket to `url` (ws://127.0.0.1:PORT/...) opened from the loopback address `source`
/// (127.0.0.2, …): another host, as far as the node can tell.
pub async fn ws_from(
    source: &str,
    url: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    tokio_tungstenite::tungstenite::Error,
> {
    let parsed = url::Url::parse(url).expect("a ws:// URL");
    let target = format!(
        "{}:{}",
        parsed.host_str().expect("host"),
        parsed.port().expect("port")
    );
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("a source address"))?;
    let stream = socket
        .connect(target.parse().expect("a target address"))
        .await?;
    tokio_tungstenite::client_async(url, stream)
        .await
        .map(|(ws, _)| ws)
}

/// Opens `n` WebSockets to `url` from `source` that never prove themselves; returns those the
/// node upgraded (held open by the caller) and how many it refused.
pub async fn flood(
    source: &str,
    url: &str,
    n: usize,
) -> (
    Vec<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
    usize,
) {
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        match ws_from(source, url).await {
            Ok(ws) => open.push(ws),
            Err(_) => refused += 1,
        }
    }
    (open, refused)
}

/// `value` as an unsigned LEB128, appended to `out` (Automerge's and the sync protocol's
/// integers).
pub fn uleb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A sync message of `count` empty `have` entries: a few bytes each on the wire, far more
/// once decoded (issue 18).
pub fn empty_haves_message(count: u64) -> Vec<u8> {
    let mut data = vec![0x42, 0, 0];
    uleb128(&mut data, count);
    data.extend(std::iter::repeat_n(0u8, (count * 2) as usize));
    data.push(0); // no changes
    data
}

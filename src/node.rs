//! Assembling a node: open the store, start the runtime, bind the HTTP server.
//! `main` and the integration tests both start nodes through [`start`].

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use actix_web_prom::PrometheusMetricsBuilder;

use crate::admission::PreAuth;
use crate::automerge_repo::{AutomergeRepo, RepoConfig};
use crate::browser::{Browser, BrowserConfig};
use crate::config::Settings;
use crate::feed::FeedEdge;
use crate::http::{self, AppState};
use crate::identity::{Auth, Verifier};
use crate::mesh::{Mesh, MeshConfig};
use crate::metrics::Metrics;
use crate::runs::{Runs, RunsConfig};
use run_store::{self, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("user-token keys: {0}")]
    Keys(#[from] crate::identity::verifier::KeyError),
    #[error(transparent)]
    Webhooks(#[from] crate::feed::webhooks::WebhookError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A node serving on `addr`. Dropping it does not stop the server; await `server` or stop it.
pub struct RunningNode {
    pub addr: SocketAddr,
    pub server: actix_web::dev::ServerHandle,
    pub runs: Runs,
    pub mesh: Mesh,
    pub browser: Browser,
    pub automerge: AutomergeRepo,
    pub feed: web::Data<FeedEdge>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningNode {
    /// The edges that hold long-lived connections, to close when the node stops.
    pub fn edges(&self) -> Edges {
        Edges {
            mesh: self.mesh.clone(),
            browser: self.browser.clone(),
            automerge: self.automerge.clone(),
            feed: self.feed.clone(),
        }
    }
}

/// Every edge that holds long-lived connections. A new edge of that kind is added here, and
/// closes with the others.
#[derive(Clone)]
pub struct Edges {
    mesh: Mesh,
    browser: Browser,
    automerge: AutomergeRepo,
    feed: web::Data<FeedEdge>,
}

impl Edges {
    /// The node is stopping: each edge closes its connections ("going away") so they do not
    /// hold the server's graceful stop up.
    pub fn close(&self) {
        self.mesh.close();
        self.browser.close();
        self.automerge.close();
        self.feed.close();
    }
}

/// Starts a node on the current actix system, on the database `settings` name.
pub async fn start(settings: &Settings) -> Result<RunningNode, NodeError> {
    let db = &settings.database;
    let store = run_store::open(&db.url, db.pool_size, db.create_if_missing).await?;
    start_with_store(settings, store).await
}

/// [`start`] on a store opened already: the node bench runs one in its own process on a store
/// wrapped to measure what the database costs.
pub async fn start_with_store(
    settings: &Settings,
    store: Arc<dyn Store>,
) -> Result<RunningNode, NodeError> {
    // wss:// peers: rustls needs one process-wide crypto provider (ring, as awc is built).
    // A second node in one process finds it installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let metrics = Metrics::new().map_err(|e| NodeError::Metrics(e.to_string()))?;
    let runs = start_runtime(settings, store, &metrics, workers).await?;
    let mesh = Mesh::start(
        MeshConfig::from_settings(settings),
        &settings.peer_urls(),
        runs.clone(),
        metrics.clone(),
    );
    let auth = start_auth(settings)?;
    let admission = &settings.crdt.admission;
    let outgoing = crate::socket::OutgoingBudget::new(settings.crdt.memory.outgoing_bytes);
    let browser = Browser::start(
        BrowserConfig::from_settings(settings, &outgoing),
        PreAuth::from_settings(admission, admission.pre_auth_total),
        runs.clone(),
        Arc::new(mesh.clone()),
        auth.clone(),
        metrics.clone(),
    );
    mesh.presence().subscribe(browser.peer_presence());
    let automerge = AutomergeRepo::start(
        RepoConfig::from_settings(settings, &outgoing),
        PreAuth::from_settings(admission, admission.pre_auth_total),
        runs.clone(),
        metrics.clone(),
    );
    let feed = FeedEdge::start(runs.change_feed(), &settings.crdt.feed, &metrics).await?;
    let feed = web::Data::new(feed);
    let state = web::Data::new(AppState {
        runs: runs.clone(),
        mesh: mesh.clone(),
        browser: browser.clone(),
        viewers: Arc::new(browser.clone()),
        automerge: automerge.clone(),
        metrics: metrics.clone(),
        region: settings.crdt.region.clone(),
        node_id: settings.node_id().to_string(),
        origins: http::origin::AllowedOrigins::new(settings.crdt.admission.allowed_origins.urls()),
        auth,
        metrics_token: settings.crdt.api.metrics_token.clone(),
        incoming: http::Incoming {
            budget: crate::socket::MemoryBudget::new(settings.crdt.memory.incoming_bytes),
            deadline: std::time::Duration::from_millis(settings.crdt.memory.message_deadline_ms),
        },
        feed: feed.clone(),
        cluster_secret: settings
            .crdt
            .cluster
            .enabled
            .then(|| settings.crdt.cluster.secret.clone())
            .flatten(),
    });
    let (addr, server, task) = serve(settings, state, &metrics, workers)?;
    if let Some(ownership) = runs.ownership() {
        // Port 0 (tests): the other pods reach the port actually bound.
        let mut advertised = ownership.address();
        if let Ok(mut url) = url::Url::parse(&advertised) {
            if url.port() == Some(0) {
                let _ = url.set_port(Some(addr.port()));
                advertised = url.as_str().trim_end_matches('/').to_string();
            }
        }
        ownership.set_address(advertised);
        if let Some(secret) = &settings.crdt.cluster.secret {
            runs.set_transport(http::cluster_link::ClusterLink::start(secret.clone()));
        }
        runs.join_cluster().await?;
    }
    log::info!(
        "crdt-node {} (region {}) listening on http://{addr}",
        settings.node_id(),
        settings.crdt.region
    );
    Ok(RunningNode {
        addr,
        server,
        runs,
        mesh,
        browser,
        automerge,
        feed,
        task,
    })
}

/// The credentials every door takes: the API token, and user tokens when keys are configured
/// (a JWKS URL is fetched now and then refreshed in the background).
fn start_auth(settings: &Settings) -> Result<Arc<Auth>, NodeError> {
    let jwt = &settings.crdt.api.jwt;
    let users = Verifier::from_settings(jwt)?;
    if let (Some(users), Some(url)) = (&users, &jwt.jwks_url) {
        let every = std::time::Duration::from_secs(jwt.jwks_refresh_secs);
        users.refresh_from(url.clone(), every);
    }
    Ok(Arc::new(Auth::new(settings.crdt.api.token.clone(), users)))
}

/// Starts the runtime on `store`.
async fn start_runtime(
    settings: &Settings,
    store: Arc<dyn Store>,
    metrics: &Metrics,
    workers: usize,
) -> Result<Runs, NodeError> {
    log::info!(
        "storage: {} ({})",
        store.backend(),
        redact(&settings.database.url)
    );
    // One committer: appends commit one after another so that the log's cursors become
    // visible in order (see `run_store::Store::feed`). Several committers would only queue on
    // the append lock with smaller batches; one collects everything waiting while the
    // previous commit flushes.
    let committers = 1;
    let cluster = &settings.crdt.cluster;
    let ownership = cluster.enabled.then(|| {
        Arc::new(crate::runs::ownership::Ownership::new(
            store.clone(),
            settings.node_id(),
            &settings.crdt.region,
            cluster.advertise_url.as_deref().unwrap_or_default(),
            std::time::Duration::from_millis(cluster.lease_ms),
        ))
    });
    Ok(Runs::start(
        store,
        RunsConfig {
            region: settings.crdt.region.clone(),
            snapshot_every: settings.crdt.snapshot.every_events,
            snapshot_keep: settings.crdt.snapshot.keep,
            snapshot_min_interval: std::time::Duration::from_millis(
                settings.crdt.snapshot.min_interval_ms,
            ),
            snapshot_copy_max_changes: settings.crdt.snapshot.copy_max_changes,
            idle_timeout: settings.idle_timeout(),
            write_timeout: std::time::Duration::from_millis(settings.database.write_timeout_ms),
            max_loaded: settings.crdt.memory.max_loaded_runs,
            max_loaded_ops: settings.crdt.memory.max_loaded_ops,
            max_run_ops_per_sec: settings.crdt.memory.max_run_ops_per_sec,
            deletion_grace: std::time::Duration::from_secs(settings.crdt.runs.deletion_grace_secs),
            purge_every: std::time::Duration::from_secs(settings.crdt.runs.purge_every_secs),
        },
        metrics.clone(),
        workers,
        committers,
        ownership,
    ))
}

type Served = (
    SocketAddr,
    actix_web::dev::ServerHandle,
    tokio::task::JoinHandle<std::io::Result<()>>,
);

/// Binds the HTTP server (the API, the pages, every WebSocket door, the metrics) and runs it.
fn serve(
    settings: &Settings,
    state: web::Data<AppState>,
    metrics: &Metrics,
    workers: usize,
) -> Result<Served, NodeError> {
    let prometheus = PrometheusMetricsBuilder::new("crdt_node")
        .registry(metrics.registry.clone())
        .mask_unmatched_patterns("UNKNOWN")
        // A WebSocket's "request" lasts the whole session: it would swamp the latency figures.
        .exclude("/ws")
        .exclude_regex("^/ws/")
        .build()
        .map_err(|e| NodeError::Metrics(e.to_string()))?;
    let max_body = settings.server.max_body_bytes;
    let bind = (settings.server.bind.as_str(), settings.server.port);
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(http::body_budget::budgeted))
            .wrap(actix_web::middleware::from_fn(http::utf8_only))
            .wrap(prometheus.clone())
            .configure(|cfg| http::configure(cfg, state.clone(), max_body))
    })
    .workers(workers)
    // Small frames go out at once: with Nagle's algorithm a frame written while the last is
    // unacknowledged waits for the peer's delayed ACK (40 ms on Linux) or a round trip.
    .tcp_nodelay(true)
    // `main` handles SIGTERM/SIGINT itself: actix's own handler would stop the whole actix
    // system, run actors included, before their final snapshots.
    .disable_signals()
    .shutdown_timeout(settings.server.shutdown_grace_secs)
    .bind(bind)
    .map_err(|source| NodeError::Bind {
        addr: format!("{}:{}", bind.0, bind.1),
        source,
    })?;
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    Ok((addr, handle, tokio::spawn(server)))
}

/// A database URL without its password, for logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

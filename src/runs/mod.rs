//! The core runtime: one [`RunActor`] per loaded run, the [`Runs`] registry that finds or starts
//! them, and the [`SnapshotActor`] that writes snapshots.
//!
//! Everything that touches a run's document reaches it as a message to its actor. Committed
//! changes are published to subscribers given as `Recipient<RunChanged>`, so the core never
//! imports the edges (HTTP, mesh, browser sessions) that consume them.

mod api;
mod cluster;
mod deletion;
mod feed;
pub mod loader;
pub mod ownership;
mod remote;
mod run_actor;
mod snapshot_actor;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use crate::metrics::Metrics;
use run_doc::DocError;
use run_store::{GroupCommitter, Store};

pub use api::{
    BadInput, ChangesSince, FullDocument, Health, Mutate, MutationOutcome, RemoteChanges,
    RunActivity, RunsPage, SyncOutcome, SyncStep, SyncStepReply,
};
pub use cluster::Location;
pub use deletion::{RunTombstoned, Tombstone};
pub use feed::{ChangeFeed, FeedEvent, PAGE as FEED_PAGE};
pub use remote::{path as remote_path, Transport};
use run_actor::{FinalSnapshot, RunActor};
pub use run_store::{Attempted, Delivery, Webhook};
use snapshot_actor::SnapshotActor;

/// What the runtime needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct RunsConfig {
    pub region: String,
    pub snapshot_every: u64,
    pub snapshot_keep: usize,
    pub snapshot_min_interval: Duration,
    /// Largest run (in changes) snapshotted from a copy of its document; 0: none.
    pub snapshot_copy_max_changes: u64,
    pub idle_timeout: Duration,
    /// Longest an event-log transaction may take before it counts as the database out of reach.
    pub write_timeout: Duration,
    /// Runs loaded at most; past it the least recently used idle ones are unloaded.
    pub max_loaded: usize,
    /// Operations held by loaded runs' documents, in all, before clients' changes wait.
    pub max_loaded_ops: u64,
    /// Operations clients and services may add to one run per second.
    pub max_run_ops_per_sec: u64,
    /// How long a deleted run is kept (and can be restored) before it is purged.
    pub deletion_grace: Duration,
    /// How often deleted runs past their grace are looked for.
    pub purge_every: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The run takes no more from this door for now (its rate); try again shortly.
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Doc(#[from] DocError),
    #[error("{applied} of {total} changes applied, then one was rejected: {reason}")]
    PartiallyApplied {
        applied: usize,
        total: usize,
        reason: Box<DocError>,
    },
    #[error("the run's actor stopped before answering; try again")]
    Stopped,
    /// The run was deleted (and, if `purged`, nothing of it is left).
    #[error("{}", deleted_reason(.0))]
    Deleted(Tombstone),
    #[error("run {0} has no changes stored here")]
    NoSuchRun(Uuid),
    #[error("run {0} is not deleted")]
    NotDeleted(Uuid),
    /// Another pod of this region owns the run (the edges forward to it).
    #[error("another pod of this region serves this run; try again")]
    Elsewhere(run_store::Owner),
}

fn deleted_reason(t: &Tombstone) -> String {
    let when = t
        .decided_at_utc()
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    let by =
        t.by.as_deref()
            .map(|b| format!(" by {b}"))
            .unwrap_or_default();
    let purged = if t.purged {
        "; it was purged and cannot be restored"
    } else {
        ""
    };
    format!(
        "run {} was deleted at {when}{by} (in {}){purged}",
        t.run_id, t.region
    )
}

/// Where a committed change came from, so a subscriber can avoid echoing it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Local,
    /// `via` names the peer node that delivered it, if it came over the mesh.
    Remote {
        source_region: String,
        via: Option<String>,
    },
    /// Committed by another pod of this region (a shared database): the event carries no
    /// changes; whoever wants them syncs the run through its owner.
    Pod,
}

/// Published after changes are committed to the log.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RunChanged {
    pub run_id: Uuid,
    /// The new changes, concatenated in the wire format (`doc::parse_changes` reads it).
    pub changes: Arc<Vec<u8>>,
    /// The run's heads once these changes committed (what a subscriber holds after applying
    /// them). Their cursor is the log's (see `ChangeFeed`): it is known where the log is read.
    pub heads: Vec<automerge::ChangeHash>,
    pub lamport: u64,
    pub origin: Origin,
}

struct Entry {
    addr: Addr<RunActor>,
    incarnation: u64,
    /// When the run was last asked for, in ms since the registry started.
    last_used: AtomicU64,
}

struct Inner {
    shards: Vec<Mutex<HashMap<Uuid, Entry>>>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
    incarnations: AtomicU64,
    store: Arc<dyn Store>,
    committer: GroupCommitter,
    snapshots: Addr<SnapshotActor>,
    config: RunsConfig,
    metrics: Metrics,
    subscribers: Subscribers<RunChanged>,
    tombstone_subscribers: Subscribers<RunTombstoned>,
    /// Every committed change, read back from the log by cursor.
    changes: Arc<ChangeFeed>,
    /// Heads digests of runs whose durable state this process knows (loaded at least once
    /// since start); the mesh compares them to skip runs a peer already holds.
    digests: Vec<Mutex<HashMap<Uuid, [u8; 32]>>>,
    /// Set when a write found the database out of reach; cleared by the probe that then
    /// pings it until it answers. Meanwhile writes are refused at once.
    store_down: AtomicBool,
    /// Runs loaded since start whose stored changes did not all load again, with how many
    /// did not. Never expected: every door admits only what the loader takes back; reported
    /// loudly (health, metric, log) if it happens all the same.
    damaged: Mutex<HashMap<Uuid, usize>>,
    /// On a database the region's pods share: this pod's membership (one owner per run).
    ownership: Option<Arc<ownership::Ownership>>,
    /// Whether this pod's mesh pushes the region's changes to another region (then it must
    /// hear of the other pods' commits).
    carrying: AtomicBool,
    /// Whether the other pods' commits reach this pod's subscribers now (`follow_region` is
    /// subscribed to the region's log).
    following: tokio::sync::watch::Sender<bool>,
    /// How other pods are reached (the HTTP edge's), for runs they own.
    transport: std::sync::OnceLock<Arc<dyn remote::Transport>>,
    /// Registry entries (runs loaded or loading), bounded by `config.max_loaded`.
    loaded: AtomicUsize,
    /// Operations the loaded runs' documents hold, in all (each actor adds what it holds).
    ops_loaded: AtomicU64,
    started: std::time::Instant,
}

/// The run registry. Cheap to clone; lookups take one short lock on one of many shards, so
/// requests for different runs do not queue behind each other.
#[derive(Clone)]
pub struct Runs {
    inner: Arc<Inner>,
}

/// The runs a subscriber wants to hear of (the runs its rooms serve): kept by the subscriber,
/// read by the runtime on each commit. A service writing runs that no browser or client has
/// open then costs those edges nothing: no message, no wake-up of their threads.
#[derive(Clone, Default)]
pub struct Watched(Arc<RwLock<HashSet<Uuid>>>);

impl Watched {
    pub fn insert(&self, run_id: Uuid) {
        if let Ok(mut runs) = self.0.write() {
            runs.insert(run_id);
        }
    }

    pub fn remove(&self, run_id: Uuid) {
        if let Ok(mut runs) = self.0.write() {
            runs.remove(&run_id);
        }
    }

    pub fn contains(&self, run_id: Uuid) -> bool {
        self.0.read().is_ok_and(|runs| runs.contains(&run_id))
    }

    fn is_empty(&self) -> bool {
        self.0.read().is_ok_and(|runs| runs.is_empty())
    }
}

/// Who is told of one kind of event (committed changes, deletions), known only as recipients:
/// of every run's, or only of the runs in its [`Watched`].
struct Subscribers<M: Message<Result = ()> + Send>(RwLock<Vec<(Recipient<M>, Option<Watched>)>>);

impl<M: Message<Result = ()> + Send> Default for Subscribers<M> {
    fn default() -> Self {
        Subscribers(RwLock::new(Vec::new()))
    }
}

impl<M: Message<Result = ()> + Send + Clone> Subscribers<M> {
    fn add(&self, recipient: Recipient<M>, watched: Option<Watched>) {
        if let Ok(mut all) = self.0.write() {
            all.push((recipient, watched));
        }
    }

    fn wanted(watched: &Option<Watched>, run_id: Uuid) -> bool {
        watched.as_ref().is_none_or(|w| w.contains(run_id))
    }

    /// Whether a subscriber watching chosen runs watches any now.
    fn any_watched(&self) -> bool {
        self.0.read().is_ok_and(|all| {
            all.iter()
                .any(|(_, w)| w.as_ref().is_some_and(|w| !w.is_empty()))
        })
    }

    /// Whether anyone would be told of an event of `run_id`.
    fn wants(&self, run_id: Uuid) -> bool {
        self.0
            .read()
            .is_ok_and(|all| all.iter().any(|(_, w)| Self::wanted(w, run_id)))
    }

    fn publish(&self, event: M, run_id: Uuid) {
        if let Ok(all) = self.0.read() {
            for (recipient, watched) in all.iter() {
                if Self::wanted(watched, run_id) {
                    recipient.do_send(event.clone());
                }
            }
        }
    }
}

const SHARDS: usize = 64;
/// How often an unreachable database is probed.
const STORE_PROBE: Duration = Duration::from_millis(500);

impl Runs {
    /// Starts the runtime on the current actix system: `arbiters` worker threads for run
    /// actors, the group committer and the supervised snapshot actor.
    pub fn start(
        store: Arc<dyn Store>,
        config: RunsConfig,
        metrics: Metrics,
        arbiters: usize,
        committers: usize,
        ownership: Option<Arc<ownership::Ownership>>,
    ) -> Self {
        let committer = GroupCommitter::start(
            store.clone(),
            committers,
            run_store::CommitMetrics {
                batch_sizes: metrics.commit_batch.clone(),
                waits: metrics.commit_wait.clone(),
                durations: metrics.commit_duration.clone(),
            },
            config.write_timeout,
        );
        // On a thread of its own: building a snapshot is CPU work that must not delay the
        // group committer or the HTTP accept loop on the system thread.
        let snapshots = {
            let store = store.clone();
            let config = config.clone();
            let metrics = metrics.clone();
            let thread = Arbiter::new();
            Supervisor::start_in_arbiter(&thread.handle(), move |_| {
                SnapshotActor::new(store, config, metrics)
            })
        };
        let arbiters = (0..arbiters.max(1))
            .map(|_| Arbiter::new().handle())
            .collect();
        let changes = ChangeFeed::new(store.clone(), ownership.clone());
        actix::spawn(changes.clone().run_tail());
        let runs = Runs {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                arbiters,
                next_arbiter: AtomicUsize::new(0),
                incarnations: AtomicU64::new(1),
                store,
                committer,
                snapshots,
                config,
                metrics,
                subscribers: Subscribers::default(),
                tombstone_subscribers: Subscribers::default(),
                changes: changes.clone(),
                digests: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                store_down: AtomicBool::new(false),
                damaged: Mutex::new(HashMap::new()),
                ownership,
                carrying: AtomicBool::new(false),
                following: tokio::sync::watch::Sender::new(false),
                transport: std::sync::OnceLock::new(),
                loaded: AtomicUsize::new(0),
                ops_loaded: AtomicU64::new(0),
                started: std::time::Instant::now(),
            }),
        };
        actix::spawn(runs.clone().run_purges());
        runs
    }

    /// Adds a subscriber to every committed change of every run.
    pub fn subscribe(&self, recipient: Recipient<RunChanged>) {
        self.inner.subscribers.add(recipient, None);
    }

    /// Adds a subscriber to the committed changes of the runs in `watched`, as it is when each
    /// commits. A run added later needs no missed change: whoever watches it reads its state
    /// through the run's actor afterwards, which holds everything committed before.
    pub fn subscribe_watched(&self, recipient: Recipient<RunChanged>, watched: Watched) {
        self.inner.subscribers.add(recipient, Some(watched));
    }

    /// The change feed: every committed change of every run, by cursor.
    pub fn change_feed(&self) -> Arc<ChangeFeed> {
        self.inner.changes.clone()
    }

    /// Sends `msg` to the run's actor, starting (and loading) it first if needed.
    async fn send<M>(&self, run_id: Uuid, msg: M) -> Result<M::Result, RunError>
    where
        M: Message + Send + Clone + 'static,
        M::Result: Send,
        RunActor: Handler<M>,
    {
        if let Some(owner) = self.owner_elsewhere(run_id) {
            return Err(RunError::Elsewhere(owner));
        }
        self.send_here(run_id, msg).await
    }

    /// Asks the run's actor here; when another pod of the region owns the run, `elsewhere`
    /// takes the message to it. Alone (no cluster) the message is not kept for that second try.
    async fn ask_or_owner<M, T, F, Fut>(
        &self,
        run_id: Uuid,
        msg: M,
        elsewhere: F,
    ) -> Result<T, RunError>
    where
        M: Message<Result = Result<T, RunError>> + Send + Clone + 'static,
        T: Send + 'static,
        RunActor: Handler<M>,
        F: FnOnce(run_store::Owner, M) -> Fut,
        Fut: std::future::Future<Output = Result<T, RunError>>,
    {
        let kept = self.inner.ownership.is_some().then(|| msg.clone());
        match (self.send(run_id, msg).await, kept) {
            (Ok(Err(RunError::Elsewhere(owner))) | Err(RunError::Elsewhere(owner)), Some(msg)) => {
                elsewhere(owner, msg).await
            }
            (Ok(result), _) => result,
            (Err(e), _) => Err(e),
        }
    }

    /// As `send`, without trusting what this pod last heard of the run's owner: for a call
    /// another pod forwarded here (which believes this pod owns the run).
    async fn send_here<M>(&self, run_id: Uuid, msg: M) -> Result<M::Result, RunError>
    where
        M: Message + Send + Clone + 'static,
        M::Result: Send,
        RunActor: Handler<M>,
    {
        // An actor may stop (idle, failed) between lookup and delivery: then start a fresh one.
        for _ in 0..3 {
            let (addr, incarnation) = self.actor(run_id)?;
            match addr.send(msg.clone()).await {
                Ok(result) => return Ok(result),
                Err(_) => self.forget(run_id, incarnation),
            }
        }
        Err(RunError::Stopped)
    }

    /// The node is stopping (its server no longer accepts requests): waits for every run's
    /// queued writes to commit, then snapshots each run with events no snapshot covers, so
    /// the next start loads fast. Bounded by `deadline`; returns how many runs were snapshotted.
    /// On a shared database the runs are handed over first (`hand_over`, if not done yet).
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        use futures_util::StreamExt;
        let started = std::time::Instant::now();
        // On a shared database (if `hand_over` has not already): the runs first; those handed
        // over have stopped and are not snapshotted here (the snapshot schedule is their new
        // owner's).
        self.hand_over(deadline).await;
        let deadline = deadline.saturating_sub(started.elapsed());
        let actors = self.actors();
        let store = self.inner.store.clone();
        let keep = self.inner.config.snapshot_keep;
        let written = AtomicUsize::new(0);
        let work = futures_util::stream::iter(actors)
            .map(|addr| {
                let (store, written) = (store.clone(), &written);
                async move {
                    let Some(snapshot) = addr.send(FinalSnapshot).await.ok().flatten() else {
                        return;
                    };
                    match store.save_snapshot(&snapshot, keep).await {
                        Ok(()) => {
                            written.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => log::warn!("run {}: final snapshot failed: {e}", snapshot.run_id),
                    }
                }
            })
            .buffer_unordered(4)
            .collect::<()>();
        if tokio::time::timeout(deadline, work).await.is_err() {
            log::warn!(
                "final snapshots cut short after {} ms",
                deadline.as_millis()
            );
        }
        written.load(Ordering::Relaxed)
    }

    /// The store's WAL pages not yet copied back into its database file (SQLite only).
    pub fn wal_backlog(&self) -> Option<i64> {
        self.inner.store.wal_backlog()
    }

    /// Refuses a write at once while the database is known to be out of reach.
    pub fn check_store(&self) -> Result<(), RunError> {
        if self.inner.store_down.load(Ordering::Relaxed) {
            return Err(RunError::Unavailable(
                "database unavailable: nothing was written; retry once it is back".into(),
            ));
        }
        Ok(())
    }

    /// A write found the database out of reach: refuse writes until a probe reaches it again.
    fn store_unavailable(&self, e: &run_store::StoreError) {
        if self.inner.store_down.swap(true, Ordering::SeqCst) {
            return;
        }
        log::warn!("storage: database unavailable ({e}); refusing writes until it answers");
        let runs = self.clone();
        actix::spawn(async move {
            loop {
                tokio::time::sleep(STORE_PROBE).await;
                let ping = tokio::time::timeout(Duration::from_secs(2), runs.inner.store.ping());
                if let Ok(Ok(())) = ping.await {
                    runs.inner.store_down.store(false, Ordering::SeqCst);
                    log::info!("storage: the database answers again; writes resume");
                    return;
                }
            }
        });
    }

    /// The heads digest of the run's durable state, if known.
    pub fn digest(&self, run_id: Uuid) -> Option<[u8; 32]> {
        let shard = &self.inner.digests[self.shard_index(run_id)];
        let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        shard.get(&run_id).copied()
    }

    fn set_digest(&self, run_id: Uuid, digest: Option<[u8; 32]>) {
        let shard = &self.inner.digests[self.shard_index(run_id)];
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        match digest {
            Some(d) => shard.insert(run_id, d),
            None => shard.remove(&run_id),
        };
    }

    /// Records how many of the run's stored changes did not load (0: all did).
    fn report_unloadable(&self, run_id: Uuid, count: usize) {
        let mut damaged = self.inner.damaged.lock().unwrap_or_else(|p| p.into_inner());
        if count == 0 {
            damaged.remove(&run_id);
        } else {
            log::error!(
                "run {run_id}: {count} stored change(s) did not load; they stay in the log and \
                 the run is served without them and what depends on them"
            );
            damaged.insert(run_id, count);
        }
        let total: usize = damaged.values().sum();
        self.inner.metrics.unloadable_changes.set(total as i64);
    }

    /// Up to `at_most` damaged runs (see [`Inner::damaged`]), and how many changes each.
    pub fn damaged(&self, at_most: usize) -> Vec<(Uuid, usize)> {
        let damaged = self.inner.damaged.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(Uuid, usize)> = damaged.iter().map(|(r, n)| (*r, *n)).collect();
        out.sort();
        out.truncate(at_most);
        out
    }

    /// Whether an actor for the run is registered.
    pub fn is_loaded(&self, run_id: Uuid) -> bool {
        let shard = self.shard(run_id).lock().unwrap_or_else(|p| p.into_inner());
        shard.contains_key(&run_id)
    }

    fn shard_index(&self, run_id: Uuid) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        run_id.hash(&mut h);
        (h.finish() as usize) % SHARDS
    }

    fn shard(&self, run_id: Uuid) -> &Mutex<HashMap<Uuid, Entry>> {
        &self.inner.shards[self.shard_index(run_id)]
    }

    fn actor(&self, run_id: Uuid) -> Result<(Addr<RunActor>, u64), RunError> {
        let now = self.inner.started.elapsed().as_millis() as u64;
        {
            let shard = self.shard(run_id).lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = shard.get(&run_id) {
                if e.addr.connected() {
                    e.last_used.store(now, Ordering::Relaxed);
                    return Ok((e.addr.clone(), e.incarnation));
                }
            }
        }
        let max = self.inner.config.max_loaded;
        let loaded = self.inner.loaded.load(Ordering::Relaxed);
        if loaded >= max {
            // Make room: the least recently used idle runs unload (they are durable and load
            // again on demand); 1% at a time, so the scan is rare.
            self.evict(loaded + 1 - max + max / 100);
            // Past a tenth more than the cap (every run busy), new runs wait.
            if loaded >= max + max / 10 {
                return Err(RunError::Unavailable(format!(
                    "this node holds as many runs as it may ({max}); try again shortly"
                )));
            }
        }
        let mut shard = self.shard(run_id).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = shard.get(&run_id) {
            if e.addr.connected() {
                return Ok((e.addr.clone(), e.incarnation));
            }
        }
        let incarnation = self.inner.incarnations.fetch_add(1, Ordering::Relaxed);
        let i = self.inner.next_arbiter.fetch_add(1, Ordering::Relaxed) % self.inner.arbiters.len();
        let runs = self.clone();
        let addr = RunActor::start_in_arbiter(&self.inner.arbiters[i], move |_| {
            RunActor::new(run_id, incarnation, runs)
        });
        let replaced = shard.insert(
            run_id,
            Entry {
                addr: addr.clone(),
                incarnation,
                last_used: AtomicU64::new(now),
            },
        );
        if replaced.is_none() {
            self.inner.loaded.fetch_add(1, Ordering::Relaxed);
        }
        Ok((addr, incarnation))
    }

    /// Asks the `count` least recently used runs to unload if they are idle.
    fn evict(&self, count: usize) {
        let mut candidates: Vec<(u64, Addr<RunActor>)> = Vec::new();
        for shard in &self.inner.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            candidates.extend(
                shard
                    .values()
                    .map(|e| (e.last_used.load(Ordering::Relaxed), e.addr.clone())),
            );
        }
        let count = count.min(candidates.len());
        if count == 0 {
            return;
        }
        candidates.select_nth_unstable_by_key(count - 1, |(used, _)| *used);
        for (_, addr) in candidates.into_iter().take(count) {
            addr.do_send(run_actor::Evict);
        }
    }

    /// Whether the loaded runs have room for `incoming` more operations from a client. If
    /// not, the least recently used idle runs are asked to unload and the client waits: an
    /// Automerge operation costs about 185 bytes in memory, and a few KB of changes can carry
    /// a million of them. Changes from peers are never refused for this (the regions must
    /// converge); they are bounded per request.
    /// `own` is what the run being written holds already: a run is never refused for its own
    /// size (only other runs' memory can be given back by unloading them), or a run past the
    /// budget could never be written again.
    pub(crate) fn ops_room(&self, incoming: u64, own: u64) -> Result<(), RunError> {
        let max = self.inner.config.max_loaded_ops;
        let held = self.inner.ops_loaded.load(Ordering::Relaxed);
        let others = held.saturating_sub(own);
        if others.saturating_add(incoming) <= max {
            return Ok(());
        }
        self.evict((self.loaded() / 20).max(1));
        Err(RunError::Unavailable(format!(
            "this node holds as many operations as its memory budget allows ({held} of {max}); \
             try again shortly"
        )))
    }

    /// An actor's documents now hold `now` operations instead of `before`.
    pub(crate) fn count_ops(&self, before: u64, now: u64) {
        if now >= before {
            self.inner
                .ops_loaded
                .fetch_add(now - before, Ordering::Relaxed);
        } else {
            self.inner
                .ops_loaded
                .fetch_sub(before - now, Ordering::Relaxed);
        }
    }

    /// Runs loaded or loading now.
    pub fn loaded(&self) -> usize {
        self.inner.loaded.load(Ordering::Relaxed)
    }

    /// Removes the registry entry of one incarnation of a run's actor (not a newer one).
    fn forget(&self, run_id: Uuid, incarnation: u64) {
        let mut shard = self.shard(run_id).lock().unwrap_or_else(|p| p.into_inner());
        if shard
            .get(&run_id)
            .is_some_and(|e| e.incarnation == incarnation)
        {
            shard.remove(&run_id);
            self.inner.loaded.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The actors of every run loaded or loading now.
    fn actors(&self) -> Vec<Addr<RunActor>> {
        self.inner
            .shards
            .iter()
            .flat_map(|s| {
                let shard = s.lock().unwrap_or_else(|p| p.into_inner());
                shard.values().map(|e| e.addr.clone()).collect::<Vec<_>>()
            })
            .collect()
    }

    fn has_subscribers(&self, run_id: Uuid) -> bool {
        self.inner.subscribers.wants(run_id)
    }

    fn publish(&self, event: RunChanged) {
        let run_id = event.run_id;
        self.inner.subscribers.publish(event, run_id);
    }
}

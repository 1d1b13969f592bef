//! A run actor's life: loading the run, unloading it when idle, surviving a panic inside
//! Automerge, rolling back when the database is out of reach, failing.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use run_doc::{Projection, RunDoc};

use super::warming::Warming;
use super::write_queue::Batch;
use super::{Reply, RunActor};
use crate::runs::loader::{self, LoadError, Loaded, Stored};
use crate::runs::{RunError, Tombstone};
use run_store::Claim;

/// How long a run this incarnation has not written stays loaded after its last read.
const UNWRITTEN_LINGER: Duration = Duration::from_secs(5);

impl RunActor {
    /// A run loaded only to be read holds nothing that is not in storage: reads of unknown run
    /// ids, and a mesh catch-up that visits every run, must not fill memory for the whole idle
    /// timeout, so such a run is unloaded soon after its last use. A written run stays for
    /// the idle timeout.
    fn unload_if_unwritten(&mut self, ctx: &mut Context<Self>) {
        let linger = UNWRITTEN_LINGER.min(self.runs.inner.config.idle_timeout);
        ctx.run_later(linger, move |act, ctx| {
            if act.written || !act.unloadable() {
                return;
            }
            if act.last_active.elapsed() >= linger {
                act.runs.forget(act.run_id, act.incarnation);
                ctx.stop();
            } else {
                act.unload_if_unwritten(ctx);
            }
        });
    }

    /// Whether unloading loses nothing: no write in flight (it must answer first), and no
    /// held-back changes (they exist only here; the peers that sent them count them as sent).
    fn unloadable(&self) -> bool {
        // A loading run has requests waiting for it.
        self.warming.is_none()
            && self.writes.is_idle()
            && !self.doc.as_ref().is_some_and(RunDoc::has_parked)
    }

    /// Runs `f` on the document, turning a panic inside Automerge on input from elsewhere into
    /// an error instead of the death of this arbiter's thread and every run on it. The
    /// document may be half-changed, so the run is unloaded and reloads from its log.
    pub(super) fn guarded<T>(
        &mut self,
        ctx: &mut Context<Self>,
        f: impl FnOnce(&mut RunDoc) -> Result<T, RunError>,
    ) -> Result<T, RunError> {
        let doc = self.doc()?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(doc))) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let reason = format!("Automerge failed on changes from elsewhere: {what}");
                self.fail_once_settled(reason.clone(), ctx);
                Err(RunError::Unavailable(reason))
            }
        }
    }

    /// The database is out of reach: refuses every uncommitted write (nothing of them was
    /// acknowledged) and returns the document to what the log holds, under a fresh actor id, so
    /// reads go on serving durable state. Writes resume when the database answers again.
    pub(super) fn roll_back(
        &mut self,
        reason: String,
        batch: Batch<Reply>,
        ctx: &mut Context<Self>,
    ) {
        let (heads, lamport) = self.writes.durable().clone();
        let rolled = self.doc.as_mut().map(|d| d.rolled_back(&heads, lamport));
        let Some(Ok(doc)) = rolled else {
            return self.fail(reason, Some(batch), ctx);
        };
        log::warn!(
            "run {}: {reason}; writes refused until it returns",
            self.run_id
        );
        for write in self.writes.refuse_all(Some(batch)) {
            let _ = write.reply.send(Err(RunError::Unavailable(reason.clone())));
        }
        self.doc = Some(doc);
        // Acknowledged operations stay remembered; the refused ones were never done.
        self.recent_ops
            .retain(|_, outcome| outcome.lamport <= lamport);
        let ops = &self.recent_ops;
        self.recent_order.retain(|k| ops.contains_key(k));
        self.record_digest();
    }

    /// As `fail`, but an append in flight may still commit: it answers and publishes first,
    /// and the actor stops when it completes. Meanwhile nothing is served.
    fn fail_once_settled(&mut self, reason: String, ctx: &mut Context<Self>) {
        if self.writes.is_idle() {
            self.fail(reason, None, ctx);
        } else {
            log::error!("run {}: {reason}; unloading it", self.run_id);
            self.failed = Some(reason);
            self.doc = None;
            self.runs.set_digest(self.run_id, None);
        }
    }

    /// Gives the run's claim up (counted out of the owned runs); the caller releases it, or
    /// not when another pod holds the run already.
    pub(super) fn drop_claim(&mut self) -> Option<run_store::Fence> {
        let fence = self.fence.take()?;
        self.runs.inner.metrics.runs_owned.dec();
        Some(fence)
    }

    /// Refuses every uncommitted write and stops; see the module comment of `run_actor`.
    pub(super) fn fail(
        &mut self,
        reason: String,
        batch: Option<Batch<Reply>>,
        ctx: &mut Context<Self>,
    ) {
        log::error!("run {}: {reason}; unloading it", self.run_id);
        for write in self.writes.refuse_all(batch) {
            let _ = write.reply.send(Err(RunError::Unavailable(reason.clone())));
        }
        self.failed = Some(reason);
        self.doc = None;
        self.runs.set_digest(self.run_id, None);
        self.runs.forget(self.run_id, self.incarnation);
        ctx.stop();
    }

    /// Builds the document off this thread. With a projection that covers all that is stored,
    /// reads are answered from it meanwhile and other requests wait in `warming`; without
    /// one, every message waits.
    fn build(
        &mut self,
        stored: Stored,
        projection: Option<Arc<Projection>>,
        ctx: &mut Context<Self>,
    ) {
        let store = self.runs.inner.store.clone();
        let region = self.runs.inner.config.region.clone();
        let run_id = self.run_id;
        let seed = projection.clone();
        let work =
            async move { loader::load_from(store.as_ref(), run_id, &region, stored, seed).await }
                .into_actor(self)
                .map(|result, act, ctx| {
                    match result {
                        Ok(loaded) => act.loaded(loaded, ctx),
                        Err(e) => act.load_failed(&e, ctx),
                    }
                    act.warmed(ctx);
                });
        match projection {
            Some(projection) => {
                self.warming = Some(Warming::new(projection.state.clone()));
                ctx.spawn(work);
            }
            None => {
                ctx.wait(work);
            }
        }
    }

    /// The database refused this actor's append: another pod of the region claimed the run
    /// (this one's lease lapsed, or it was told to leave). Nothing uncommitted was stored;
    /// every waiting write is refused, and the next request finds the new owner.
    pub(super) fn deposed(&mut self, batch: Batch<Reply>, ctx: &mut Context<Self>) {
        log::warn!(
            "run {}: another pod of the region owns it now; unloading it",
            self.run_id
        );
        self.runs
            .inner
            .metrics
            .ownership_moves
            .with_label_values(&["deposed"])
            .inc();
        // The claim is gone: nothing to release when this actor stops.
        self.drop_claim();
        self.fail(
            "another pod of this region took the run over; try again".into(),
            Some(batch),
            ctx,
        );
    }

    /// Another member holds the run: answer the waiting requests so, and stop.
    fn held_elsewhere(&mut self, owner: run_store::Owner, ctx: &mut Context<Self>) {
        self.elsewhere = Some(owner);
        self.runs.forget(self.run_id, self.incarnation);
        ctx.run_later(Duration::from_millis(100), |_, ctx| ctx.stop());
    }

    fn load_failed(&mut self, e: &LoadError, ctx: &mut Context<Self>) {
        let reason = format!("loading the run failed: {e}");
        log::warn!("run {}: {reason}", self.run_id);
        self.failed = Some(reason);
        // Waiting requests are answered with the error; new requests start afresh.
        self.runs.forget(self.run_id, self.incarnation);
        ctx.run_later(Duration::from_millis(100), |_, ctx| ctx.stop());
    }

    /// The run is loaded: serve it.
    fn loaded(&mut self, loaded: Loaded, ctx: &mut Context<Self>) {
        self.unreadable = loaded.unreadable;
        self.runs.report_unloadable(self.run_id, loaded.unreadable);
        let skipped = loaded.legacy_skipped as u64;
        self.runs.inner.metrics.legacy_skipped.inc_by(skipped);
        let mut doc = loaded.doc;
        let durable = (doc.heads(), doc.lamport());
        self.writes = super::WriteQueue::new(loaded.last_seq, durable);
        let config = &self.runs.inner.config;
        self.snapshots = super::SnapshotSchedule::new(
            config.snapshot_every,
            config.snapshot_min_interval,
            loaded.snapshot_seq,
        );
        self.lamport_gauge(doc.lamport());
        self.doc = Some(doc);
        self.count_ops();
        self.record_digest();
        self.report_event_count(ctx);
        self.unload_if_unwritten(ctx);
    }
}

/// A run this pod serves: its fence (on a shared database), tombstone and what is stored.
type Here = (
    Option<run_store::Fence>,
    Option<Tombstone>,
    Option<(Stored, Option<Arc<Projection>>)>,
);

/// What starting an actor found.
enum Start {
    /// The run is this pod's (with its fence on a shared database): serve it.
    Here(Box<Here>),
    /// Another pod of the region holds it.
    Elsewhere(run_store::Owner),
}

/// This pod's lease lapsed: another pod may hold the run now. Writes waiting are refused, and
/// the actor stops once an append in flight answers (the database decides that one by the
/// fence), so nothing stale is served.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Depose;

impl Handler<Depose> for RunActor {
    type Result = ();

    fn handle(&mut self, _: Depose, ctx: &mut Context<Self>) {
        let reason = "this pod's lease lapsed; another pod may serve the run: try again";
        self.fail_once_settled(reason.into(), ctx);
    }
}

/// Unload if idle: the registry is past its cap and this run is among the least recently used.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Evict;

impl Handler<Evict> for RunActor {
    type Result = ();

    fn handle(&mut self, _: Evict, ctx: &mut Context<Self>) {
        if self.unloadable() {
            log::debug!(
                "run {}: unloaded to stay within the loaded-runs cap",
                self.run_id
            );
            self.runs.forget(self.run_id, self.incarnation);
            ctx.stop();
        }
    }
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.runs.inner.metrics.runs_loaded.inc();
        let store = self.runs.inner.store.clone();
        let ownership = self.runs.inner.ownership.clone();
        let run_id = self.run_id;
        // `wait` holds every message until storage is read. On a database pods share, the run
        // is claimed first, so the load sees every write of its previous owner. A deleted run
        // is not loaded.
        ctx.wait(
            async move {
                let fence = match &ownership {
                    Some(ownership) => match ownership.claim(run_id).await? {
                        Claim::Owned(fence) => Some(fence),
                        Claim::Held(owner) => return Ok(Start::Elsewhere(owner)),
                    },
                    None => None,
                };
                let tombstone = store.tombstone(run_id).await?.map(Tombstone::from);
                if tombstone.as_ref().is_some_and(|t| t.deleted) {
                    return Ok(Start::Here(Box::new((fence, tombstone, None))));
                }
                let stored = loader::fetch_projected(store.as_ref(), run_id).await?;
                Ok(Start::Here(Box::new((fence, tombstone, Some(stored)))))
            }
            .into_actor(self)
            .map(|result: Result<_, LoadError>, act, ctx| match result {
                Ok(Start::Elsewhere(owner)) => act.held_elsewhere(owner, ctx),
                Ok(Start::Here(here)) => {
                    let (fence, tombstone, stored) = *here;
                    if fence.is_some() {
                        let metrics = &act.runs.inner.metrics;
                        metrics
                            .ownership_moves
                            .with_label_values(&["claimed"])
                            .inc();
                        metrics.runs_owned.inc();
                    }
                    act.fence = fence;
                    act.tombstone = tombstone;
                    match stored {
                        Some((stored, projection)) => act.build(stored, projection, ctx),
                        None => act.unload_if_unwritten(ctx),
                    }
                }
                Err(e) => act.load_failed(&e, ctx),
            }),
        );
        let idle = self.runs.inner.config.idle_timeout;
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        ctx.run_interval(tick, move |act, ctx| {
            if act.last_active.elapsed() >= idle && act.writes.is_idle() && act.warming.is_none() {
                act.runs.forget(act.run_id, act.incarnation);
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.runs.forget(self.run_id, self.incarnation);
        if let Some(fence) = self.drop_claim() {
            // Unloaded: the run is free for whichever pod is asked for it next.
            let metrics = self.runs.inner.metrics.clone();
            if let Some(ownership) = self.runs.inner.ownership.clone() {
                let run_id = self.run_id;
                actix::spawn(async move {
                    match ownership.release(run_id, &fence).await {
                        Ok(()) => metrics
                            .ownership_moves
                            .with_label_values(&["released"])
                            .inc(),
                        // Kept until this pod leaves or its lease lapses; claimable then.
                        Err(e) => log::warn!("run {run_id}: releasing it failed: {e}"),
                    }
                });
            }
        }
        self.doc = None;
        self.count_ops();
        let metrics = &self.runs.inner.metrics;
        metrics.runs_loaded.dec();
        // A newer incarnation may already be serving the run; its series stays.
        let had_series = matches!(self.gauge.take(), Some(Some(_)));
        if had_series && !self.runs.is_loaded(self.run_id) {
            let _ = metrics
                .lamport_clock
                .remove_label_values(&[&self.run_id.to_string()]);
        }
    }
}

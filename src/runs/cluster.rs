//! The runtime's side of a region whose pods share one database: joining and renewing,
//! where a run is served (`locate`), following the other pods' commits, handing runs over on
//! the way out. The membership itself (claims, fences, roles) is `ownership`; calls to another
//! pod's runs are `remote`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::run_actor::{self, Handover};
use super::{ownership, Origin, RunChanged, RunError, Runs};

/// How often a pod that follows nobody's runs looks again whether it should.
const FOLLOW_CHECK: Duration = Duration::from_millis(200);

/// Where a run is served, for an edge that can forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Here,
    /// Another pod of this region: its address.
    At(run_store::Owner),
}

impl Runs {
    /// This pod's membership, on a database the region's pods share.
    pub fn ownership(&self) -> Option<&Arc<ownership::Ownership>> {
        self.inner.ownership.as_ref()
    }

    /// Joins the region's pods (once the server is bound) and renews the lease until the node
    /// leaves. A lease found lapsed, or not renewed for a whole lease, deposes every run here:
    /// another pod may hold them now.
    pub async fn join_cluster(&self) -> Result<(), run_store::StoreError> {
        let Some(ownership) = self.inner.ownership.clone() else {
            return Ok(());
        };
        ownership.join().await?;
        actix::spawn(self.clone().follow_region());
        let runs = self.clone();
        actix::spawn(async move {
            let mut tick = tokio::time::interval(ownership.renew_every());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // When a renewal last succeeded, by this pod's own clock.
            let mut renewed = std::time::Instant::now();
            let mut lapsed = false;
            loop {
                tick.tick().await;
                if ownership.is_leaving() {
                    return;
                }
                match ownership.renew().await {
                    Ok(running) => {
                        renewed = std::time::Instant::now();
                        if !running {
                            log::warn!("cluster: this pod's lease had lapsed; giving up its runs");
                            runs.depose_all();
                        }
                        lapsed = false;
                    }
                    Err(e) => {
                        log::warn!("cluster: renewing the lease failed: {e}");
                        // Past its lease another pod may hold any of these runs: stop serving
                        // them (reads included) until the database answers again.
                        if renewed.elapsed() >= ownership.lease() && !lapsed {
                            log::warn!("cluster: no renewal for a whole lease; giving up its runs");
                            runs.depose_all();
                            lapsed = true;
                        }
                    }
                }
            }
        });
        Ok(())
    }

    /// Every loaded run gives up serving (this pod's claims may be others' now).
    fn depose_all(&self) {
        for addr in self.actors() {
            addr.do_send(run_actor::Depose);
        }
    }

    pub(super) fn owner_elsewhere(&self, run_id: Uuid) -> Option<run_store::Owner> {
        self.inner.ownership.as_ref()?.elsewhere(run_id)
    }

    /// Where the run is served: here (claimed and loaded, or no cluster), or by another pod.
    /// Reads only: nothing is claimed or loaded here for a request that may yet be refused
    /// (unauthorized, or a browser that never joins); the route's own call claims the run.
    pub async fn locate(&self, run_id: Uuid) -> Result<Location, RunError> {
        let Some(ownership) = &self.inner.ownership else {
            return Ok(Location::Here);
        };
        if self.is_loaded(run_id) {
            return Ok(Location::Here);
        }
        if let Some(owner) = ownership.elsewhere(run_id) {
            return Ok(Location::At(owner));
        }
        match ownership.holder(run_id).await {
            Ok(Some(owner)) if *owner.member != **ownership.member() => Ok(Location::At(owner)),
            Ok(_) => Ok(Location::Here),
            Err(e) => Err(RunError::Unavailable(e.to_string())),
        }
    }

    /// The owner this pod forwarded to did not answer: ask the database next time.
    pub fn owner_unreachable(&self, run_id: Uuid) {
        if let Some(ownership) = &self.inner.ownership {
            ownership.forget(run_id);
        }
    }

    /// The region's pods as the shared database knows them (with the runs each owns), and
    /// which is this one; `None` without a cluster.
    pub async fn cluster_members(
        &self,
    ) -> Result<Option<(Arc<str>, Vec<run_store::Member>)>, RunError> {
        let Some(ownership) = &self.inner.ownership else {
            return Ok(None);
        };
        let members = self
            .inner
            .store
            .members()
            .await
            .map_err(|e| RunError::Unavailable(e.to_string()))?;
        Ok(Some((ownership.member().clone(), members)))
    }

    /// Whether anything here wants to hear of the other pods' commits.
    fn others_wanted(&self) -> bool {
        self.inner.carrying.load(Ordering::SeqCst) || self.inner.subscribers.any_watched()
    }

    /// The mesh pushes (or no longer pushes) the region's changes to another region.
    pub fn set_carrying(&self, carrying: bool) {
        self.inner.carrying.store(carrying, Ordering::SeqCst);
    }

    /// Waits, up to `within`, until the other pods' commits reach this pod's subscribers;
    /// whether they do. A pod that starts carrying the region's changes reads the recently
    /// active runs after this: a commit either is among them or reaches it through the log.
    /// Reading them first left a gap, the commits between that read and the subscription.
    pub async fn following_region(&self, within: Duration) -> bool {
        let mut following = self.inner.following.subscribe();
        let waited = tokio::time::timeout(within, following.wait_for(|on| *on)).await;
        matches!(waited, Ok(Ok(_)))
    }

    /// On a shared database: tells this pod's subscribers of commits to runs other pods own
    /// (`Origin::Pod`: rooms and mesh links then take a sync step through the owner). The
    /// change feed reads the shared log; a run loaded here published its own commits already.
    async fn follow_region(self) {
        loop {
            // Nobody to tell (no room watching a run, no region carried): the shared log is
            // not read for this pod at all.
            if !self.others_wanted() {
                tokio::time::sleep(FOLLOW_CHECK).await;
                continue;
            }
            let mut events = match self.inner.changes.subscribe().await {
                Ok(events) => events,
                Err(e) => {
                    log::warn!("cluster: following the region's log failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.inner.following.send_replace(true);
            loop {
                let event = match tokio::time::timeout(FOLLOW_CHECK, events.recv()).await {
                    Ok(event) => event,
                    Err(_) if self.others_wanted() => continue,
                    Err(_) => {
                        // Cleared before the second look: whoever starts wanting the commits
                        // after it finds the flag false and waits for the next subscription;
                        // whoever started before it keeps this one.
                        self.inner.following.send_replace(false);
                        if self.others_wanted() {
                            self.inner.following.send_replace(true);
                            continue;
                        }
                        break;
                    }
                };
                match event {
                    Ok(event) => {
                        if self.is_loaded(event.run_id) {
                            continue;
                        }
                        let changed = RunChanged {
                            run_id: event.run_id,
                            changes: Arc::new(Vec::new()),
                            heads: Vec::new(),
                            lamport: 0,
                            origin: Origin::Pod,
                        };
                        self.inner.subscribers.publish(changed, event.run_id);
                    }
                    // Fell behind the ring: later commits still wake the rooms.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        log::warn!("cluster: {n} commits of other pods passed unannounced");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        self.inner.following.send_replace(false);
                        break;
                    }
                }
            }
        }
    }

    /// On a shared database, the pod is stopping (SIGTERM): it claims nothing more, every
    /// run it holds is released as soon as its queued writes are durable (and unloaded), then
    /// it leaves the region's pods. Done before the server stops, whose graceful stop can wait
    /// on idle connections for the whole grace: the other pods serve the runs meanwhile.
    pub async fn hand_over(&self, deadline: Duration) {
        use futures_util::StreamExt;
        let Some(ownership) = &self.inner.ownership else {
            return;
        };
        if ownership.is_leaving() {
            return;
        }
        ownership.start_leaving();
        let started = std::time::Instant::now();
        let actors = self.actors();
        let count = actors.len();
        let handed = futures_util::stream::iter(actors)
            .map(|addr| async move {
                if let Ok(Some((run_id, fence))) = addr.send(Handover).await {
                    if let Err(e) = ownership.release(run_id, &fence).await {
                        log::warn!("run {run_id}: releasing it failed: {e}");
                    }
                }
            })
            .buffer_unordered(32)
            .collect::<()>();
        if tokio::time::timeout(deadline, handed).await.is_err() {
            log::warn!(
                "handing runs over cut short after {} ms",
                deadline.as_millis()
            );
        }
        match ownership.leave().await {
            Ok(()) => log::info!(
                "cluster: left; {count} run(s) handed over in {} ms",
                started.elapsed().as_millis()
            ),
            Err(e) => log::warn!("cluster: leaving failed ({e}); the lease will lapse"),
        }
    }
}

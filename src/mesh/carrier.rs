//! Which pod of a region carries the region's changes to each other region, when the region's
//! pods share one database (`runs::ownership`).
//!
//! Every pod may hold links to other regions (each dials its configured peers, and peers'
//! links land on any pod), and every pod hears of every commit of the region (its own runs'
//! from their actors, the others' through the shared log). Were each to push, a change would
//! reach another region once per pod. So for each other region one pod with a live link to it
//! holds the role `mesh:<region>` (`run_store` roles: one live member at a time), and only it
//! pushes to that region. Links of the other pods still answer what arrives on them, and
//! catch up on connect. A pod that takes the role over syncs, on its links to that region,
//! every run active within the last lease and a margin for the pods' clocks (the runs list of
//! the shared database): what nobody may have pushed while the role had no holder. It reads
//! that list only once it follows the region's log (if that takes a while, at a later look),
//! so each commit is in the list or comes through the log; reading it first lost the commits
//! made in between (they reached the other region only with the run's next change).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::directory::MeshState;
use super::session::SyncRun;
use crate::runs::ownership::Ownership;
use crate::runs::Runs;

/// How often links are looked at for a region to claim or give up.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// Past the lease, how far back a new holder looks for runs nobody may have pushed: the pods'
/// clocks stamp the activity it reads.
const CLOCK_MARGIN: Duration = Duration::from_secs(10);
/// How long a new holder waits to follow the region's log before it reads the recent runs.
const FOLLOW_WAIT: Duration = Duration::from_secs(5);
/// Runs a new holder syncs at most (the rest wait for their next change or a reconnect).
const MAX_RESYNC: usize = 100_000;

/// The regions this pod pushes to. Alone (no cluster) it pushes to every region.
#[derive(Clone, Default)]
pub struct Carrier {
    held: Arc<RwLock<Option<HashSet<String>>>>,
    /// Told whether this pod carries any region (it then follows the other pods' commits).
    runs: Option<Runs>,
    /// Regions this pod took over whose recently active runs are still to be synced.
    unsynced: Arc<Mutex<HashSet<String>>>,
}

impl Carrier {
    /// Whether this pod pushes the region's changes to `region`.
    pub fn carries(&self, region: &str) -> bool {
        match &*self.held.read().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(held) => held.contains(region),
        }
    }

    /// The runs active within `window`, most recent first (at most `MAX_RESYNC`).
    async fn active_within(runs: &Runs, window: Duration) -> Vec<Uuid> {
        let since =
            chrono::Utc::now().naive_utc() - chrono::Duration::from_std(window).unwrap_or_default();
        let mut out = Vec::new();
        let mut after = None;
        while out.len() < MAX_RESYNC {
            let Ok(page) = runs.recent_runs(after.as_ref(), 500).await else {
                break;
            };
            let more = page.next.is_some();
            for r in &page.runs {
                if r.last_activity < since {
                    return out;
                }
                out.push(r.run_id);
            }
            if !more {
                break;
            }
            after = page.next;
        }
        out
    }

    /// On a shared database: keeps the roles of the regions this pod has links to, until the
    /// node stops.
    pub fn start(mesh: MeshState, ownership: Arc<Ownership>, runs: Runs) -> Carrier {
        let carrier = Carrier {
            held: Arc::new(RwLock::new(Some(HashSet::new()))),
            runs: Some(runs),
            unsynced: Arc::default(),
        };
        let keeper = carrier.clone();
        actix::spawn(async move {
            let mut renewed = Instant::now();
            loop {
                tokio::time::sleep(LOOK_EVERY).await;
                let renew = renewed.elapsed() >= ownership.renew_every();
                if renew {
                    renewed = Instant::now();
                }
                keeper.look(&mesh, &ownership, renew).await;
            }
        });
        carrier
    }

    async fn look(&self, mesh: &MeshState, ownership: &Ownership, renew: bool) {
        let links = mesh.primaries_by_region();
        let linked: HashSet<String> = links.iter().map(|(p, _)| p.region.clone()).collect();
        let held = self
            .held
            .read()
            .map(|h| h.clone().unwrap_or_default())
            .unwrap_or_default();
        // Whether the other pods' commits reach this pod: asked once per look, so that a
        // database too slow to answer delays one look, not one per region.
        let mut following: Option<bool> = None;
        for region in &linked {
            let had = held.contains(region);
            if !had || renew {
                let holds = ownership
                    .claim_role(&role(region))
                    .await
                    .unwrap_or_else(|e| {
                        log::warn!("mesh: claiming the role for {region} failed: {e}");
                        had
                    });
                self.set(region, holds);
                if holds && !had {
                    log::info!("mesh: this pod carries the region's changes to {region}");
                    self.mark_unsynced(region, true);
                }
            }
            if !self.is_unsynced(region) {
                continue;
            }
            // The other pods' commits from now on reach the links through the region's log;
            // those before are in the runs list read next. Until the log is followed the list
            // is not read (a commit in between would reach neither way): the next look tries
            // again, well inside the list's window.
            let ready = match (&self.runs, following) {
                (None, _) => true,
                (Some(_), Some(known)) => known,
                (Some(runs), None) => {
                    let now = runs.following_region(FOLLOW_WAIT).await;
                    following = Some(now);
                    now
                }
            };
            if !ready {
                log::warn!("mesh: not yet following the region's log; {region} is synced later");
                continue;
            }
            self.mark_unsynced(region, false);
            // What nobody may have pushed while the role had no holder.
            let window = ownership.lease() + LOOK_EVERY * 2 + CLOCK_MARGIN;
            let runs: Vec<Uuid> = match &self.runs {
                Some(runs) => Self::active_within(runs, window).await,
                None => Vec::new(),
            };
            for (peer, session) in links.iter().filter(|(p, _)| &p.region == region) {
                log::debug!(
                    "mesh: syncing {} recent runs with {}",
                    runs.len(),
                    peer.node_id
                );
                for run in &runs {
                    session.addr.do_send(SyncRun(*run));
                }
            }
        }
        for region in held.difference(&linked) {
            self.set(region, false);
            if let Err(e) = ownership.release_role(&role(region)).await {
                log::warn!("mesh: giving up the role for {region} failed: {e}");
            }
        }
    }

    fn is_unsynced(&self, region: &str) -> bool {
        let unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        unsynced.contains(region)
    }

    fn mark_unsynced(&self, region: &str, unsynced: bool) {
        let mut regions = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        if unsynced {
            regions.insert(region.to_string());
        } else {
            regions.remove(region);
        }
    }

    fn set(&self, region: &str, holds: bool) {
        if !holds {
            self.mark_unsynced(region, false);
        }
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = held.as_mut() {
            if holds {
                held.insert(region.to_string());
            } else {
                held.remove(region);
            }
            if let Some(runs) = &self.runs {
                runs.set_carrying(!held.is_empty());
            }
        }
    }
}

fn role(region: &str) -> String {
    format!("mesh:{region}")
}

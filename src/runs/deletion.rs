//! Deleting runs: the runtime's side. A deletion (or a restore) is a decision recorded as the
//! run's tombstone, made by this region's API or taken from another region's; the later
//! decision wins everywhere, so regions agree without coordinating. Every decision about a run
//! is made by its actor, one at a time (`run_actor::deletion`); this module is the API, the
//! message subscribers get, and the purge of deleted runs past their grace period.

use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use super::run_actor::{Call, Decide};
use super::{RunError, Runs};

/// The last decision about a run's deletion: deleted, or restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    pub run_id: Uuid,
    pub deleted: bool,
    /// When it was decided, unix milliseconds: the later decision wins...
    pub decided_at: i64,
    /// ...and on a tie, the greater region.
    pub region: String,
    pub by: Option<String>,
    /// Nothing is left of the run but this (its events and snapshots are purged).
    pub purged: bool,
}

impl Tombstone {
    pub fn supersedes(&self, other: &Tombstone) -> bool {
        run_store::Tombstone::from(self).supersedes(&other.into())
    }

    /// The same decision (whether either side has purged the run since aside).
    pub fn same_decision(&self, other: &Tombstone) -> bool {
        (self.deleted, self.decided_at, &self.region)
            == (other.deleted, other.decided_at, &other.region)
    }

    pub fn decided_at_utc(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::from_timestamp_millis(self.decided_at)
    }
}

impl From<&Tombstone> for run_store::Tombstone {
    fn from(t: &Tombstone) -> Self {
        run_store::Tombstone {
            run_id: t.run_id,
            deleted: t.deleted,
            decided_at: t.decided_at,
            region: t.region.clone(),
            by: t.by.clone(),
            purged: t.purged,
        }
    }
}

impl From<run_store::Tombstone> for Tombstone {
    fn from(t: run_store::Tombstone) -> Self {
        Tombstone {
            run_id: t.run_id,
            deleted: t.deleted,
            decided_at: t.decided_at,
            region: t.region,
            by: t.by,
            purged: t.purged,
        }
    }
}

/// Published when a run is deleted or restored here, by this region or another's decision.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RunTombstoned {
    pub tombstone: Tombstone,
    /// The peer node the decision came from, if it came over the mesh (not echoed back).
    pub via: Option<String>,
}

/// Deleted runs purged per round; the next round takes the rest.
const PURGE_BATCH: i64 = 100;

impl Runs {
    /// Deletes the run in this region (the mesh carries the decision to the others). Its
    /// document is dropped from memory; reads and writes answer `Deleted` from now on.
    pub async fn delete(&self, run_id: Uuid, by: Option<String>) -> Result<Tombstone, RunError> {
        self.send(run_id, Call(Decide::Delete { by })).await?
    }

    /// Brings a deleted run back, unless it was purged.
    pub async fn restore(&self, run_id: Uuid, by: Option<String>) -> Result<Tombstone, RunError> {
        self.send(run_id, Call(Decide::Restore { by })).await?
    }

    /// Another region's decision; returns the decision in force here afterwards (this one
    /// unless a later one was known).
    pub async fn take_tombstone(
        &self,
        tombstone: Tombstone,
        via: String,
    ) -> Result<Tombstone, RunError> {
        let run_id = tombstone.run_id;
        // Another pod of the region holds the run: the decision is its to take.
        let (t, v) = (tombstone.clone(), via.clone());
        self.ask_or_owner(
            run_id,
            Call(Decide::Peer { tombstone, via }),
            |owner, _| async move { self.remote_tombstone(&owner, &t, v).await },
        )
        .await
    }

    /// Adds a subscriber to every deletion and restore.
    pub fn subscribe_tombstones(&self, recipient: Recipient<RunTombstoned>) {
        self.inner.tombstone_subscribers.add(recipient, None);
    }

    pub(super) fn publish_tombstone(&self, event: RunTombstoned) {
        let run_id = event.tombstone.run_id;
        self.inner.tombstone_subscribers.publish(event, run_id);
    }

    /// Purges deleted runs past the grace period, every `purge_every`, until the node stops.
    pub(super) async fn run_purges(self) {
        let config = &self.inner.config;
        let (grace, every) = (config.deletion_grace, config.purge_every);
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.purge_due(grace).await {
                log::warn!("purging deleted runs failed: {e}; trying again in {every:?}");
            }
        }
    }

    /// One purge round: every run deleted longer ago than `grace`.
    async fn purge_due(&self, grace: Duration) -> Result<usize, RunError> {
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let before = chrono::Utc::now()
            .timestamp_millis()
            .saturating_sub(grace_ms);
        let mut purged = 0;
        loop {
            let due = self
                .inner
                .store
                .purge_due(before, PURGE_BATCH)
                .await
                .map_err(|e| RunError::Unavailable(e.to_string()))?;
            let (n, before_round) = (due.len(), purged);
            for run_id in due {
                // Through the run's actor: a restore cannot cross the purge.
                let t = match self.send(run_id, Call(Decide::Purge)).await {
                    Ok(Ok(t)) => t,
                    // Its owner, another pod of the region, purges it.
                    Ok(Err(RunError::Elsewhere(_))) | Err(RunError::Elsewhere(_)) => continue,
                    // One run that cannot be purged now does not hold up the others.
                    Ok(Err(e)) | Err(e) => {
                        log::warn!("run {run_id}: not purged this round: {e}");
                        continue;
                    }
                };
                if t.purged {
                    purged += 1;
                    self.inner.metrics.runs_purged.inc();
                    log::info!("run {run_id}: deleted at {:?}, purged", t.decided_at_utc());
                }
            }
            // A full page none of which could be purged would come back the same.
            if (n as i64) < PURGE_BATCH || purged == before_round {
                return Ok(purged);
            }
        }
    }
}

//! `SnapshotActor`: listens for event counts and writes full snapshots.
//!
//! Each committed append tells this actor how many events the run has logged since its last
//! snapshot. At `snapshot_every` it asks the run for its document's bytes and writes them with
//! the Lamport clock and the log position they cover, keeping the newest `snapshot_keep` per
//! run. It holds no document itself, and one run never has two snapshots in progress.

use std::collections::HashSet;
use std::sync::Arc;

use actix::prelude::*;
use uuid::Uuid;

use super::run_actor::{CaptureSnapshot, RunActor, SnapshotWritten};
use super::{RunError, RunsConfig};
use crate::metrics::Metrics;
use crate::store::{Snapshot, Store};

#[derive(Message)]
#[rtype(result = "()")]
pub struct EventCount {
    pub run_id: Uuid,
    pub since_snapshot: i64,
    pub run: Addr<RunActor>,
}

pub struct SnapshotActor {
    store: Arc<dyn Store>,
    config: RunsConfig,
    metrics: Metrics,
    in_progress: HashSet<Uuid>,
}

impl SnapshotActor {
    pub fn new(store: Arc<dyn Store>, config: RunsConfig, metrics: Metrics) -> Self {
        SnapshotActor {
            store,
            config,
            metrics,
            in_progress: HashSet::new(),
        }
    }
}

impl Actor for SnapshotActor {
    type Context = Context<Self>;
}

impl Supervised for SnapshotActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        log::warn!("snapshot actor restarting");
        self.in_progress.clear();
    }
}

#[derive(Debug, thiserror::Error)]
enum SnapshotError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("the run stopped before its snapshot was taken")]
    RunGone,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl Handler<EventCount> for SnapshotActor {
    type Result = ();

    fn handle(&mut self, msg: EventCount, ctx: &mut Self::Context) {
        if msg.since_snapshot < self.config.snapshot_every as i64
            || !self.in_progress.insert(msg.run_id)
        {
            return;
        }
        let store = self.store.clone();
        let region = self.config.region.clone();
        let keep = self.config.snapshot_keep;
        let run_id = msg.run_id;
        let run = msg.run;
        let work = async move {
            let capture = run
                .send(CaptureSnapshot)
                .await
                .map_err(|_| SnapshotError::RunGone)??;
            let snapshot = Snapshot {
                id: Uuid::new_v4(),
                run_id,
                lamport: i64::try_from(capture.lamport).unwrap_or(i64::MAX),
                region,
                created_at: chrono::Utc::now().naive_utc(),
                event_count: i32::try_from(capture.event_count).unwrap_or(i32::MAX),
                data: capture.data,
            };
            store.save_snapshot(&snapshot, keep).await?;
            run.do_send(SnapshotWritten {
                event_count: capture.event_count,
            });
            Ok::<usize, SnapshotError>(snapshot.data.len())
        };
        ctx.spawn(work.into_actor(self).map(move |result, act, _| {
            act.in_progress.remove(&run_id);
            match result {
                Ok(size) => {
                    act.metrics.snapshot_size.observe(size as f64);
                    log::debug!("run {run_id}: snapshot of {size} bytes written");
                }
                Err(e) => {
                    act.metrics.snapshot_failures.inc();
                    log::warn!("run {run_id}: snapshot failed: {e}");
                }
            }
        }));
    }
}

//! Decisions about the run's deletion, made one at a time: the actor's mailbox waits while one
//! is recorded, so a restore cannot cross a purge or another region's decision. A decision is
//! answered only once it is stored; a deleted run drops its document and answers every other
//! request with `RunError::Deleted`.

use actix::prelude::*;
use tokio::sync::oneshot;

use super::handlers::{ready, Answer};
use super::RunActor;
use crate::runs::deletion::{RunTombstoned, Tombstone};
use crate::runs::run_actor::Call;
use crate::runs::RunError;

#[derive(Debug, Clone)]
pub(crate) enum Decide {
    Delete {
        by: Option<String>,
    },
    Restore {
        by: Option<String>,
    },
    /// Another region's decision, delivered by the peer node `via`.
    Peer {
        tombstone: Tombstone,
        via: String,
    },
    /// Purge the run if it is still deleted (the store says when it is due).
    Purge,
}

impl Message for Call<Decide> {
    type Result = Result<Tombstone, RunError>;
}

impl Handler<Call<Decide>> for RunActor {
    type Result = Answer<Tombstone>;

    fn handle(&mut self, Call(msg): Call<Decide>, ctx: &mut Self::Context) -> Self::Result {
        if self.warming.is_some() {
            return self.defer(Call(msg), ctx);
        }
        self.last_active = std::time::Instant::now();
        let current = self.tombstone.clone();
        let deleted = current.as_ref().filter(|t| t.deleted).cloned();
        let (next, via) = match msg {
            Decide::Delete { by } => {
                if let Some(t) = deleted {
                    return ready(Ok(t));
                }
                if self.writes.last_seq() == 0 {
                    return ready(Err(RunError::NoSuchRun(self.run_id)));
                }
                (self.decision(true, by), None)
            }
            Decide::Restore { by } => match deleted {
                Some(t) if t.purged => return ready(Err(RunError::Deleted(t))),
                Some(_) => (self.decision(false, by), None),
                None if current.is_none() && self.writes.last_seq() == 0 => {
                    return ready(Err(RunError::NoSuchRun(self.run_id)))
                }
                None => return ready(Err(RunError::NotDeleted(self.run_id))),
            },
            Decide::Peer { tombstone, via } => {
                if let Some(c) = current.filter(|c| !tombstone.supersedes(c)) {
                    return ready(Ok(c));
                }
                (tombstone, Some(via))
            }
            Decide::Purge => {
                return match deleted {
                    Some(t) if !t.purged => self.purge(t, ctx),
                    Some(t) => ready(Ok(t)),
                    None => ready(current.ok_or(RunError::NotDeleted(self.run_id))),
                };
            }
        };
        self.record(next, via, ctx)
    }
}

impl RunActor {
    /// A decision of this region, later than any known for the run (whatever the clocks say).
    fn decision(&self, deleted: bool, by: Option<String>) -> Tombstone {
        let now = chrono::Utc::now().timestamp_millis();
        let after = self.tombstone.as_ref().map_or(0, |t| t.decided_at + 1);
        Tombstone {
            run_id: self.run_id,
            deleted,
            decided_at: now.max(after),
            region: self.runs.inner.config.region.clone(),
            by,
            purged: false,
        }
    }

    /// Stores the decision, then acts on it if it is news here, and answers with the decision
    /// in force (this one, or a later one already stored).
    fn record(
        &mut self,
        next: Tombstone,
        via: Option<String>,
        ctx: &mut Context<Self>,
    ) -> Answer<Tombstone> {
        let store = self.runs.inner.store.clone();
        let stored = run_store::Tombstone::from(&next);
        let work = async move {
            store.save_tombstone(&stored).await?;
            store.tombstone(stored.run_id).await
        };
        self.store_then(work, ctx, move |result, act, ctx| match result {
            Ok(Some(now)) => {
                let now = Tombstone::from(now);
                if act.tombstone.as_ref() != Some(&now) {
                    act.decided(now.clone(), via, ctx);
                }
                Ok(now)
            }
            Ok(None) => Err(RunError::Unavailable(
                "the run's tombstone was not stored".into(),
            )),
            Err(e) => Err(RunError::Unavailable(e.to_string())),
        })
    }

    /// Runs `work` on storage while the mailbox waits (no other request or decision meets the
    /// run half-decided), then answers with what `then` makes of its result.
    fn store_then<R: 'static, T: 'static>(
        &mut self,
        work: impl std::future::Future<Output = R> + 'static,
        ctx: &mut Context<Self>,
        then: impl FnOnce(R, &mut Self, &mut Context<Self>) -> Result<T, RunError> + 'static,
    ) -> Answer<T> {
        let (tx, rx) = oneshot::channel();
        ctx.wait(work.into_actor(self).map(move |result, act, ctx| {
            let _ = tx.send(then(result, act, ctx));
        }));
        Box::pin(async move { rx.await.map_err(|_| RunError::Stopped)? })
    }

    /// Acts on a stored decision: a deleted run lets its document go; a restored one stops,
    /// and the next request loads it afresh.
    fn decided(&mut self, t: Tombstone, via: Option<String>, ctx: &mut Context<Self>) {
        let metrics = &self.runs.inner.metrics;
        let action = if t.deleted { "deleted" } else { "restored" };
        metrics.run_tombstones.with_label_values(&[action]).inc();
        log::info!(
            "run {}: {action} (decided in {} by {:?}{})",
            self.run_id,
            t.region,
            t.by,
            via.as_deref()
                .map(|v| format!(", learnt from {v}"))
                .unwrap_or_default()
        );
        self.tombstone = Some(t.clone());
        self.runs.publish_tombstone(RunTombstoned {
            tombstone: t.clone(),
            via,
        });
        if t.deleted {
            // Writes waiting behind the append in flight are refused; that one was applied
            // before the decision and is answered when it commits.
            for write in self.writes.refuse_waiting() {
                let _ = write.reply.send(Err(RunError::Deleted(t.clone())));
            }
            self.doc = None;
            self.read = None;
            self.recent_ops.clear();
            self.recent_order.clear();
            self.count_ops();
            self.runs.set_digest(self.run_id, None);
        } else if self.writes.is_idle() {
            self.runs.forget(self.run_id, self.incarnation);
            ctx.stop();
        } else {
            // An append from before the deletion is still in flight: it answers first, then
            // the actor stops (see `flush`), and the next request loads the run.
            self.failed = Some("the run was restored and is loading again".into());
        }
    }

    fn purge(&mut self, t: Tombstone, ctx: &mut Context<Self>) -> Answer<Tombstone> {
        let store = self.runs.inner.store.clone();
        let run_id = self.run_id;
        let work = async move { store.purge_run(run_id).await };
        self.store_then(work, ctx, move |result, act, _| match result {
            Ok(purged) => {
                let t = Tombstone { purged, ..t };
                act.tombstone = Some(t.clone());
                Ok(t)
            }
            Err(e) => Err(RunError::Unavailable(e.to_string())),
        })
    }
}

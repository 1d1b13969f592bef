//! Group commit: appends from many runs share one transaction.
//!
//! Each run actor has at most one append in flight (so its log stays in order), but thousands
//! of runs append at once. Committer tasks take every append waiting in the queue, write them
//! in a single transaction and answer each caller. Under light load a batch is one append and
//! costs one commit; under heavy load one commit carries hundreds, so durability does not cost
//! throughput. The node runs one committer: appends are serialized anyway (the change feed's
//! cursors must become visible in order), and one committer collects everything that waited
//! while the previous commit flushed, where several would queue with smaller batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Histogram;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::{NewEvent, Store, StoreError};

type Reply = oneshot::Sender<Result<(), Arc<StoreError>>>;

struct Request {
    events: Vec<NewEvent>,
    reply: Reply,
    queued: Instant,
}

/// What the committer reports, so that an operator sees where a durable write's time goes.
#[derive(Clone)]
pub struct CommitMetrics {
    /// Appends each transaction carried.
    pub batch_sizes: Histogram,
    /// Seconds each append waited for its transaction to begin (behind the one in flight).
    pub waits: Histogram,
    /// Seconds each commit of a batch took, from its transaction's first statement to its
    /// commit (a batch refused in part: its retries included); each one-by-one retry of a
    /// refused batch is a commit of its own.
    pub durations: Histogram,
}

#[derive(Clone)]
pub struct GroupCommitter {
    queue: mpsc::UnboundedSender<Request>,
}

/// Most events one transaction carries.
const MAX_BATCH_EVENTS: usize = 4096;

impl GroupCommitter {
    /// Starts `committers` tasks on the current runtime, reporting to `metrics`.
    /// A transaction not done within `timeout` fails as "database unavailable": a database
    /// that stops answering without closing its connections must not hold writes forever.
    pub fn start(
        store: Arc<dyn Store>,
        committers: usize,
        metrics: CommitMetrics,
        timeout: Duration,
    ) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..committers.max(1) {
            tokio::spawn(run_committer(
                store.clone(),
                rx.clone(),
                metrics.clone(),
                timeout,
            ));
        }
        GroupCommitter { queue }
    }

    /// Appends `events` durably; resolves once their transaction has committed.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<(), Arc<StoreError>> {
        let (reply, done) = oneshot::channel();
        self.queue
            .send(Request {
                events,
                reply,
                queued: Instant::now(),
            })
            .map_err(|_| Arc::new(StoreError::CommitterStopped))?;
        done.await
            .map_err(|_| Arc::new(StoreError::CommitterStopped))?
    }
}

/// Appends the batch; when the database refuses some runs' appends as fenced (another pod owns
/// them now), those callers are told so and the rest are appended again together, rather than
/// one by one. Returns what is left to answer and its outcome.
async fn commit_unfenced(
    store: &dyn Store,
    mut batch: Vec<Request>,
    timeout: Duration,
) -> (Vec<Request>, Result<usize, StoreError>) {
    loop {
        let events: Vec<NewEvent> = batch
            .iter()
            .flat_map(|r| r.events.iter().cloned())
            .collect();
        let result = append(store, &events, timeout).await;
        let fenced = match &result {
            Err(StoreError::Fenced(runs)) if batch.len() > 1 => runs.clone(),
            _ => return (batch, result),
        };
        let (refused, rest): (Vec<Request>, Vec<Request>) = batch
            .into_iter()
            .partition(|r| r.events.iter().any(|e| fenced.contains(&e.run_id)));
        for request in refused {
            let mine: Vec<uuid::Uuid> = fenced
                .iter()
                .filter(|run| request.events.iter().any(|e| e.run_id == **run))
                .copied()
                .collect();
            let _ = request.reply.send(Err(Arc::new(StoreError::Fenced(mine))));
        }
        if rest.is_empty() {
            return (rest, Ok(0));
        }
        batch = rest;
    }
}

/// Appends within `timeout`; past it the outcome is unknown, and it counts as out of reach.
async fn append(
    store: &dyn Store,
    events: &[NewEvent],
    timeout: Duration,
) -> Result<usize, StoreError> {
    match tokio::time::timeout(timeout, store.append(events)).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(format!(
            "the database did not answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

async fn run_committer(
    store: Arc<dyn Store>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>,
    metrics: CommitMetrics,
    timeout: Duration,
) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut size = first.events.len();
            let mut batch = vec![first];
            while size < MAX_BATCH_EVENTS {
                match rx.try_recv() {
                    Ok(next) => {
                        size += next.events.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let began = Instant::now();
        metrics.batch_sizes.observe(batch.len() as f64);
        for request in &batch {
            let waited = began.saturating_duration_since(request.queued);
            metrics.waits.observe(waited.as_secs_f64());
        }
        let (batch, result) = commit_unfenced(store.as_ref(), batch, timeout).await;
        metrics.durations.observe(began.elapsed().as_secs_f64());
        match result {
            Ok(_) => {
                for request in batch {
                    let _ = request.reply.send(Ok(()));
                }
            }
            // Out of reach (or a single append): fail fast, every caller gets the error now.
            Err(e) if batch.len() == 1 || !e.is_refusal() => {
                log::warn!("commit of {} appends failed: {e}", batch.len());
                let e = Arc::new(e);
                for request in batch {
                    let _ = request.reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                // One bad append must not fail its neighbours: retry each on its own.
                log::warn!(
                    "group commit of {} appends failed ({e}); retrying them one by one",
                    batch.len()
                );
                for request in batch {
                    let began = Instant::now();
                    let result = append(store.as_ref(), &request.events, timeout)
                        .await
                        .map(|_| ())
                        .map_err(Arc::new);
                    metrics.batch_sizes.observe(1.0);
                    metrics.durations.observe(began.elapsed().as_secs_f64());
                    let _ = request.reply.send(result);
                }
            }
        }
    }
}

//! The node's Prometheus metrics: the specification's names, registered beside actix-web-prom's
//! HTTP metrics and served at `/actuator/prometheus`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Sync messages, by direction (`in`, `out`).
    pub sync_messages: IntCounterVec,
    /// Sync messages that failed to decode or apply, by reason.
    pub sync_failures: IntCounterVec,
    pub snapshot_size: Histogram,
    pub peers_connected: IntGauge,
    /// Lamport clock per loaded run; a run's series is removed when it is unloaded. At most
    /// [`MAX_RUN_SERIES`] runs have one at a time (see [`Metrics::run_clock`]).
    pub lamport_clock: IntGaugeVec,
    run_series: Arc<AtomicUsize>,
    pub runs_loaded: IntGauge,
    /// Runs this pod owns among the region's pods (a shared database).
    pub runs_owned: IntGauge,
    /// Ownership changes this pod made or met: claimed, released, deposed.
    pub ownership_moves: IntCounterVec,
    /// Requests this pod forwarded to a run's owner, by door.
    pub forwarded: IntCounterVec,
    /// Stored changes of loaded runs that did not load again (kept in the log, reported).
    pub unloadable_changes: IntGauge,
    pub snapshot_failures: prometheus::IntCounter,
    /// Snapshots written, by what they were built from: `memory` (a copy of the run's document
    /// while it held only what is durable) or `storage` (the newest snapshot and the log).
    pub snapshots_written: IntCounterVec,
    /// Appends carried by each event-log transaction (group commit at work).
    pub commit_batch: Histogram,
    /// Each append's wait for its event-log transaction to begin.
    pub commit_wait: Histogram,
    /// Each commit of the event log (see `run_store::CommitMetrics::durations`).
    pub commit_duration: Histogram,
    /// SQLite's WAL pages not yet copied back into the database file, set at each scrape.
    pub wal_backlog: IntGauge,
    /// Legacy (OT) rows skipped as malformed when replaying a run's log.
    pub legacy_skipped: prometheus::IntCounter,
    /// Schema breaches found in changes from foreign Automerge clients (kept, reported).
    pub schema_violations: IntCounter,
    /// Open automerge-repo connections.
    pub repo_sessions: IntGauge,
    /// automerge-repo messages received and sent, by type and direction.
    pub repo_messages: IntCounterVec,
    /// automerge-repo connections the node closed, by reason.
    pub repo_closed: IntCounterVec,
    /// Open browser sessions.
    pub browser_sessions: IntGauge,
    /// Browser session frames, by direction (`in`, `out`).
    pub browser_frames: IntCounterVec,
    /// Browser sessions closed by the node, by reason (`too_slow`, `timeout`, `unauthorized`, …).
    pub browser_closed: IntCounterVec,
    /// Open change-feed streams (SSE).
    pub feed_streams: IntGauge,
    /// Events sent down change-feed streams.
    pub feed_streamed: IntCounter,
    /// Webhook delivery attempts, by outcome (`delivered`, `retry`, `dead`, `gone`).
    pub webhook_attempts: IntCounterVec,
    /// Deliveries waiting in the outbox.
    pub webhook_outbox: IntGauge,
    /// Deliveries dead-lettered (kept until replayed or their subscription is removed).
    pub webhook_dead_letters: IntGauge,
    /// Seconds from a change's commit to its endpoint's 2xx.
    pub webhook_lag: Histogram,
    /// Runs deleted and restored here, by this region's decision or another's.
    pub run_tombstones: IntCounterVec,
    /// Deleted runs purged after their grace period.
    pub runs_purged: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let sync_messages = counters(
            &r,
            "crdt_sync_messages_total",
            "Total sync messages sent and received",
            &["direction"],
        )?;
        let browser_frames = counters(
            &r,
            "crdt_browser_frames_total",
            "Browser session frames sent and received",
            &["direction"],
        )?;
        // Make the labelled series visible from the start, at zero.
        for d in ["in", "out"] {
            sync_messages.with_label_values(&[d]);
            browser_frames.with_label_values(&[d]);
        }
        let snapshot_sizes = prometheus::exponential_buckets(256.0, 4.0, 10)?;
        let batch_sizes = vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
        let commit_seconds = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ];
        Ok(Metrics {
            sync_messages,
            sync_failures: counters(&r, "crdt_sync_failures_total", "Failed sync attempts", &["reason"])?,
            snapshot_size: histogram(&r, "crdt_snapshot_size_bytes", "Size of CRDT snapshots", snapshot_sizes)?,
            peers_connected: gauge(&r, "crdt_mesh_peers_connected", "Number of connected peers")?,
            lamport_clock: register(&r, IntGaugeVec::new(
                Opts::new("crdt_lamport_clock", "Current Lamport timestamp per loaded run"),
                &["run_id"],
            )?)?,
            run_series: Arc::new(AtomicUsize::new(0)),
            runs_loaded: gauge(&r, "crdt_runs_loaded", "Runs loaded in memory")?,
            runs_owned: gauge(&r, "crdt_cluster_runs_owned", "Runs this pod owns among the region's pods")?,
            ownership_moves: counters(
                &r,
                "crdt_cluster_ownership_moves_total",
                "Run ownership changes on this pod: claimed, released, deposed",
                &["action"],
            )?,
            forwarded: counters(
                &r,
                "crdt_cluster_forwarded_requests_total",
                "Requests forwarded to the pod that owns their run, by door",
                &["door"],
            )?,
            unloadable_changes: gauge(
                &r,
                "crdt_stored_changes_unloadable",
                "Stored changes of runs loaded since start that could not be loaded again (kept in the log)",
            )?,
            snapshots_written: counters(
                &r,
                "crdt_snapshots_written_total",
                "Snapshots written, by what they were built from (memory, storage)",
                &["source"],
            )?,
            snapshot_failures: counter(&r, "crdt_snapshot_failures_total", "Snapshots that failed to be written")?,
            commit_batch: histogram(&r, "crdt_commit_batch_appends", "Appends carried by each event-log transaction", batch_sizes)?,
            commit_wait: histogram(
                &r,
                "crdt_commit_wait_seconds",
                "Time each append waited for its event-log transaction to begin",
                commit_seconds.clone(),
            )?,
            commit_duration: histogram(
                &r,
                "crdt_commit_duration_seconds",
                "Time each event-log commit took, from its first statement (retries of a batch refused in part included)",
                commit_seconds,
            )?,
            wal_backlog: gauge(
                &r,
                "crdt_sqlite_wal_backlog_pages",
                "SQLite: pages in the WAL not yet copied back into the database file, as the last checkpoint left them (0 on PostgreSQL)",
            )?,
            legacy_skipped: counter(
                &r,
                "crdt_legacy_events_skipped_total",
                "Legacy operational-transform events skipped as malformed during replay",
            )?,
            schema_violations: counter(
                &r,
                "crdt_schema_violations_total",
                "Run-schema breaches found in changes from foreign Automerge clients (the changes are kept)",
            )?,
            repo_sessions: gauge(&r, "crdt_automerge_repo_connections", "Open automerge-repo WebSocket connections")?,
            repo_messages: counters(
                &r,
                "crdt_automerge_repo_messages_total",
                "automerge-repo messages received and sent, by type",
                &["type", "direction"],
            )?,
            repo_closed: counters(
                &r,
                "crdt_automerge_repo_connections_closed_total",
                "automerge-repo connections the node closed, by reason",
                &["reason"],
            )?,
            browser_sessions: gauge(&r, "crdt_browser_sessions", "Open browser sessions")?,
            browser_frames,
            browser_closed: counters(
                &r,
                "crdt_browser_sessions_closed_total",
                "Browser sessions the node closed, by reason",
                &["reason"],
            )?,
            feed_streams: gauge(&r, "crdt_feed_streams", "Open change-feed (SSE) streams")?,
            feed_streamed: counter(&r, "crdt_feed_events_streamed_total", "Events sent down change-feed streams")?,
            webhook_attempts: counters(
                &r,
                "crdt_webhook_attempts_total",
                "Webhook delivery attempts, by outcome",
                &["outcome"],
            )?,
            webhook_outbox: gauge(&r, "crdt_webhook_outbox_pending", "Webhook deliveries waiting in the outbox")?,
            webhook_dead_letters: gauge(&r, "crdt_webhook_dead_letters", "Webhook deliveries dead-lettered")?,
            run_tombstones: counters(
                &r,
                "crdt_run_tombstones_total",
                "Runs deleted and restored here, by action",
                &["action"],
            )?,
            runs_purged: counter(&r, "crdt_runs_purged_total", "Deleted runs purged after their grace period")?,
            webhook_lag: histogram(
                &r,
                "crdt_webhook_delivery_lag_seconds",
                "Seconds from a change's commit to its webhook endpoint's 2xx",
                prometheus::exponential_buckets(0.005, 2.0, 16)?,
            )?,
            registry: r,
        })
    }
}

/// Registers `metric` and hands it back.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counters(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    register(registry, IntCounter::new(name, help)?)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    register(registry, IntGauge::new(name, help)?)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, prometheus::Error> {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?,
    )
}

/// Runs that may have a `crdt_lamport_clock` series at once: a series per run id is a label
/// per run, and a node holding many runs (or a client touching many ids) must not grow the
/// scrape without bound. The first runs loaded have one; the others do not until some unload.
pub const MAX_RUN_SERIES: usize = 1_000;

/// A run's place among the `crdt_lamport_clock` series, given back when dropped.
pub struct RunClock {
    pub gauge: IntGauge,
    count: Arc<AtomicUsize>,
}

impl Drop for RunClock {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// The clock series of run `run_id`, unless [`MAX_RUN_SERIES`] runs already have one.
    pub fn run_clock(&self, run_id: &str) -> Option<RunClock> {
        let taken = self.run_series.fetch_add(1, Ordering::Relaxed);
        if taken >= MAX_RUN_SERIES {
            self.run_series.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RunClock {
            gauge: self.lamport_clock.with_label_values(&[run_id]),
            count: self.run_series.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_run_series_runs_have_a_clock_series() {
        let metrics = Metrics::new().unwrap();
        let held: Vec<RunClock> = (0..MAX_RUN_SERIES)
            .map(|i| metrics.run_clock(&format!("run-{i}")).expect("a place"))
            .collect();
        assert!(metrics.run_clock("one-too-many").is_none());
        let families = metrics.registry.gather();
        let series = families
            .iter()
            .find(|f| f.name() == "crdt_lamport_clock")
            .map_or(0, |f| f.get_metric().len());
        assert_eq!(series, MAX_RUN_SERIES);
        drop(held);
        assert!(metrics.run_clock("now-there-is-room").is_some());
    }
}

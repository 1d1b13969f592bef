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
    pub snapshot_failures: prometheus::IntCounter,
    /// Appends carried by each event-log transaction (group commit at work).
    pub commit_batch: Histogram,
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
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let sync_messages = IntCounterVec::new(
            Opts::new(
                "crdt_sync_messages_total",
                "Total sync messages sent and received",
            ),
            &["direction"],
        )?;
        let sync_failures = IntCounterVec::new(
            Opts::new("crdt_sync_failures_total", "Failed sync attempts"),
            &["reason"],
        )?;
        let snapshot_size = Histogram::with_opts(
            HistogramOpts::new("crdt_snapshot_size_bytes", "Size of CRDT snapshots")
                .buckets(prometheus::exponential_buckets(256.0, 4.0, 10)?),
        )?;
        let peers_connected =
            IntGauge::new("crdt_mesh_peers_connected", "Number of connected peers")?;
        let lamport_clock = IntGaugeVec::new(
            Opts::new(
                "crdt_lamport_clock",
                "Current Lamport timestamp per loaded run",
            ),
            &["run_id"],
        )?;
        let runs_loaded = IntGauge::new("crdt_runs_loaded", "Runs loaded in memory")?;
        let snapshot_failures = prometheus::IntCounter::new(
            "crdt_snapshot_failures_total",
            "Snapshots that failed to be written",
        )?;
        let commit_batch = Histogram::with_opts(
            HistogramOpts::new(
                "crdt_commit_batch_appends",
                "Appends carried by each event-log transaction",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )?;
        let legacy_skipped = prometheus::IntCounter::new(
            "crdt_legacy_events_skipped_total",
            "Legacy operational-transform events skipped as malformed during replay",
        )?;
        registry.register(Box::new(legacy_skipped.clone()))?;
        let browser_sessions = IntGauge::new("crdt_browser_sessions", "Open browser sessions")?;
        let browser_frames = IntCounterVec::new(
            Opts::new(
                "crdt_browser_frames_total",
                "Browser session frames sent and received",
            ),
            &["direction"],
        )?;
        let browser_closed = IntCounterVec::new(
            Opts::new(
                "crdt_browser_sessions_closed_total",
                "Browser sessions the node closed, by reason",
            ),
            &["reason"],
        )?;
        let schema_violations = IntCounter::new(
            "crdt_schema_violations_total",
            "Run-schema breaches found in changes from foreign Automerge clients (the changes are kept)",
        )?;
        let repo_sessions = IntGauge::new(
            "crdt_automerge_repo_connections",
            "Open automerge-repo WebSocket connections",
        )?;
        let repo_messages = IntCounterVec::new(
            Opts::new(
                "crdt_automerge_repo_messages_total",
                "automerge-repo messages received and sent, by type",
            ),
            &["type", "direction"],
        )?;
        let repo_closed = IntCounterVec::new(
            Opts::new(
                "crdt_automerge_repo_connections_closed_total",
                "automerge-repo connections the node closed, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(schema_violations.clone()))?;
        registry.register(Box::new(repo_sessions.clone()))?;
        registry.register(Box::new(repo_messages.clone()))?;
        registry.register(Box::new(repo_closed.clone()))?;
        registry.register(Box::new(browser_sessions.clone()))?;
        registry.register(Box::new(browser_frames.clone()))?;
        registry.register(Box::new(browser_closed.clone()))?;
        registry.register(Box::new(commit_batch.clone()))?;
        registry.register(Box::new(sync_messages.clone()))?;
        registry.register(Box::new(sync_failures.clone()))?;
        registry.register(Box::new(snapshot_size.clone()))?;
        registry.register(Box::new(peers_connected.clone()))?;
        registry.register(Box::new(lamport_clock.clone()))?;
        registry.register(Box::new(runs_loaded.clone()))?;
        registry.register(Box::new(snapshot_failures.clone()))?;
        // Make the labelled series visible from the start, at zero.
        for d in ["in", "out"] {
            sync_messages.with_label_values(&[d]);
            browser_frames.with_label_values(&[d]);
        }
        Ok(Metrics {
            registry,
            sync_messages,
            sync_failures,
            snapshot_size,
            peers_connected,
            lamport_clock,
            run_series: Arc::new(AtomicUsize::new(0)),
            runs_loaded,
            snapshot_failures,
            commit_batch,
            legacy_skipped,
            schema_violations,
            repo_sessions,
            repo_messages,
            repo_closed,
            browser_sessions,
            browser_frames,
            browser_closed,
        })
    }
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

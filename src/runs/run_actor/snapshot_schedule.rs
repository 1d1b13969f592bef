//! When a run asks for a snapshot: every `every` committed events, but a hot run at most once
//! per `min_interval` (a full snapshot costs time in proportion to the whole run, and more
//! often than that buys little recovery).
//!
//! A long run is snapshotted every tenth of its length instead ([`SHARE`]): a snapshot saves
//! the whole run, so at a fixed spacing its cost per event grew with the run (saving is about
//! 0.84 µs per change, so a run of 10,000 changes paid 84 µs per event at every 100 events,
//! more than the write itself), and over a run's life the snapshots cost the square of its
//! length. Spaced by a tenth, a snapshot costs each event about ten changes' saving whatever
//! the run's length, and a load replays about a tenth of the run after its snapshot (more while
//! the minimum interval holds a hot run's snapshot back, or a snapshot fails).

use std::time::{Duration, Instant};

/// A run past `every * SHARE` events is snapshotted every `1 / SHARE` of its length.
const SHARE: i64 = 10;

pub(crate) struct SnapshotSchedule {
    every: u64,
    min_interval: Duration,
    /// The log position the newest stored snapshot covers.
    covered: i64,
    last_asked: Option<Instant>,
    /// A delayed ask is scheduled.
    waiting: bool,
}

/// What the run should do about snapshots now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Due {
    Nothing,
    /// Ask again after this long (the run schedules it and calls [`SnapshotSchedule::woke`]).
    Later(Duration),
    /// Ask the snapshot actor now, with this many events since the last snapshot.
    Now(i64),
}

impl SnapshotSchedule {
    pub fn new(every: u64, min_interval: Duration, covered: i64) -> Self {
        SnapshotSchedule {
            every,
            min_interval,
            covered,
            last_asked: None,
            waiting: false,
        }
    }

    pub fn covered(&self) -> i64 {
        self.covered
    }

    /// A snapshot covering the log up to `seq` is stored.
    pub fn written(&mut self, seq: i64) {
        self.covered = self.covered.max(seq);
    }

    /// The delayed ask fired.
    pub fn woke(&mut self) {
        self.waiting = false;
    }

    /// Events after the newest snapshot that make the next one due.
    fn spacing(&self) -> i64 {
        let every = i64::try_from(self.every).unwrap_or(i64::MAX);
        every.max(self.covered / SHARE)
    }

    /// Whether the log, committed up to `committed`, is due a snapshot at `now`.
    pub fn check(&mut self, committed: i64, now: Instant) -> Due {
        let since = committed - self.covered;
        if since < self.spacing() || self.waiting {
            return Due::Nothing;
        }
        let wait = self.last_asked.map_or(Duration::ZERO, |t| {
            self.min_interval
                .saturating_sub(now.saturating_duration_since(t))
        });
        if !wait.is_zero() {
            self.waiting = true;
            return Due::Later(wait);
        }
        self.last_asked = Some(now);
        Due::Now(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_n_events_but_not_more_often_than_the_interval() {
        let t0 = Instant::now();
        let mut s = SnapshotSchedule::new(100, Duration::from_secs(5), 0);
        assert_eq!(s.check(99, t0), Due::Nothing);
        assert_eq!(s.check(100, t0), Due::Now(100));
        s.written(100);
        assert_eq!(
            s.check(250, t0 + Duration::from_secs(2)),
            Due::Later(Duration::from_secs(3))
        );
        assert_eq!(
            s.check(260, t0 + Duration::from_secs(3)),
            Due::Nothing,
            "one delayed ask"
        );
        s.woke();
        assert_eq!(s.check(260, t0 + Duration::from_secs(5)), Due::Now(160));
        s.written(90);
        assert_eq!(s.covered(), 100, "an older snapshot covers nothing new");
    }

    #[test]
    fn a_long_run_is_snapshotted_every_tenth_of_its_length() {
        let t0 = Instant::now();
        let later = |secs| t0 + Duration::from_secs(secs);
        // Up to ten times `every`, the spacing is `every`.
        let mut s = SnapshotSchedule::new(100, Duration::ZERO, 900);
        assert_eq!(s.check(999, t0), Due::Nothing);
        assert_eq!(s.check(1000, t0), Due::Now(100));
        // A snapshot at 10,000 events: the next is due 1,000 events later, not 100.
        let mut s = SnapshotSchedule::new(100, Duration::ZERO, 10_000);
        assert_eq!(s.check(10_100, t0), Due::Nothing);
        assert_eq!(s.check(10_999, later(1)), Due::Nothing);
        assert_eq!(s.check(11_000, later(2)), Due::Now(1000));
        // The spacing grows with what the newest snapshot covers.
        s.written(11_000);
        assert_eq!(s.check(12_000, later(3)), Due::Nothing);
        assert_eq!(s.check(12_100, later(4)), Due::Now(1100));
        // A larger `every` still wins over the tenth.
        let mut s = SnapshotSchedule::new(5000, Duration::ZERO, 10_000);
        assert_eq!(s.check(14_999, t0), Due::Nothing);
        assert_eq!(s.check(15_000, t0), Due::Now(5000));
    }
}

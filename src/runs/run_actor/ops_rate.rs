//! How fast clients and services may grow one run: operations per second, as a token bucket.
//!
//! Each request is bounded (`run_doc::MAX_OPS_PER_REQUEST`) and the node's loaded operations
//! are a budget, but a run's own operations do not count against the budget it is growing in
//! (or a large run could never be written again), so without this one client could grow one
//! run by a request's worth over and over. A request is taken while the bucket holds anything
//! and is charged what it actually applied (a mutation's cost is known only once made), so the
//! bucket may go into debt; the next requests wait until it refills (an automerge-repo step of
//! several waiting messages is one request, so its debt can reach that many requests' worth).
//! Peers are not charged: the regions must converge, and a peer's changes were charged where
//! they came in.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) struct OpsRate {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl OpsRate {
    /// `per_sec` operations a second, `burst` at once (a full bucket).
    pub fn new(per_sec: u64, burst: u64, now: Instant) -> Self {
        OpsRate {
            per_sec: per_sec as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.last = now;
    }

    /// Whether a request may go ahead now; else how long until it may.
    pub fn check(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens > 0.0 {
            return Ok(());
        }
        Err(Duration::from_secs_f64(
            (-self.tokens / self.per_sec).max(0.001),
        ))
    }

    /// Charges what a request applied.
    pub fn charge(&mut self, ops: u64, now: Instant) {
        self.refill(now);
        self.tokens -= ops as f64;
    }

    pub fn per_sec(&self) -> u64 {
        self.per_sec as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_grows_at_most_at_its_rate_after_a_burst() {
        let t0 = Instant::now();
        let mut rate = OpsRate::new(1_000, 2_000, t0);
        // A full bucket takes a request of the whole burst, and more in debt.
        assert!(rate.check(t0).is_ok());
        rate.charge(2_500, t0);
        let wait = rate.check(t0).expect_err("in debt: wait");
        assert!(
            wait >= Duration::from_millis(499) && wait <= Duration::from_millis(501),
            "{wait:?}"
        );
        assert!(rate.check(t0 + Duration::from_millis(400)).is_err());
        assert!(rate.check(t0 + Duration::from_millis(600)).is_ok());
        // Refilling stops at the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(rate.check(later).is_ok());
        rate.charge(2_000, later);
        assert!(
            rate.check(later).is_err(),
            "the bucket held the burst, no more"
        );
    }
}

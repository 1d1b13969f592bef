//! Admission of WebSocket connections that have not proved themselves yet (a mesh link before
//! its AUTH, a browser session before its JOIN, an automerge-repo connection before its
//! `join`). Each door keeps its own pool: at most so many unproven connections from one
//! address, and so many in all; each connection has a short time to prove itself, and frees
//! its place the moment it does.
//!
//! A flood from many addresses cannot keep a real peer or client out: when the pool is full,
//! the oldest unproven connection is evicted (closed 1013) to make room for the newcomer, so
//! a flooder's sockets push out each other while a real client proves itself within a round
//! trip. A connection that brings its proof on the upgrade request (a verified token, a mesh
//! peer's signed header) never enters the pool at all.
//!
//! A flood seldom comes from one address but usually from one provider's network: at most
//! `pre-auth-per-range` unproven connections come from one /24 (IPv4) or /64 (IPv6), half the
//! pool by default, so such a flood is refused once it holds its share instead of evicting the
//! clients of every other network.
//!
//! Addresses are the TCP peer's: behind a proxy every client shares the proxy's address, so
//! raise `pre-auth-per-address` there (forwarded headers can be forged, so they are not read).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use crate::config::Admission as Settings;
use crate::socket::FrameLimit;

/// One door's pool of unproven connections: cheap to clone.
#[derive(Clone)]
pub struct PreAuth {
    inner: Arc<Inner>,
}

struct Inner {
    max_total: usize,
    max_per_address: usize,
    max_per_range: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    /// By network: the address's /24 (IPv4) or /64 (IPv6).
    by_range: HashMap<IpAddr, usize>,
    /// Unproven connections that can be evicted, oldest first (by admission number).
    waiting: std::collections::BTreeMap<u64, FrameLimit>,
    next: u64,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections from this address are still to prove themselves; try again")]
    Address,
    #[error(
        "too many connections from this network (/24 or /64) are still to prove themselves; try again"
    )]
    Range,
    #[error("too many connections are still to prove themselves; try again")]
    Full,
}

/// Holds one place in the pool until dropped (when the connection proved itself or ended).
pub struct PreAuthSlot {
    inner: Arc<Inner>,
    address: Option<IpAddr>,
    /// Its admission number: the order evictions follow.
    number: u64,
    /// The socket's frame limit, raised when the slot is given up: a proven connection may
    /// send what the edge takes, an unproven one only a few KiB.
    on_proof: Option<FrameLimit>,
}

impl PreAuthSlot {
    /// Raises `limit` when this slot is given up (the connection proved itself); until then
    /// the connection may be evicted through it.
    pub fn raising(mut self, limit: &FrameLimit) -> Self {
        self.inner.lock().waiting.insert(self.number, limit.clone());
        self.on_proof = Some(limit.clone());
        self
    }
}

impl PreAuth {
    pub fn new(max_total: usize, max_per_address: usize, max_per_range: usize) -> Self {
        PreAuth {
            inner: Arc::new(Inner {
                max_total,
                max_per_address,
                max_per_range,
                counts: Mutex::new(Counts::default()),
            }),
        }
    }

    /// A pool with the configured per-address and per-network bounds and `max_total` places
    /// (one network never holds more than half of a smaller pool).
    pub fn from_settings(s: &Settings, max_total: usize) -> Self {
        let per_range = s.pre_auth_per_range.min((max_total / 2).max(1));
        Self::new(max_total, s.pre_auth_per_address, per_range)
    }

    /// A place for one more unproven connection from `address`, if there is room.
    pub fn admit(&self, address: Option<IpAddr>) -> Result<PreAuthSlot, Refused> {
        let mut counts = self.inner.lock();
        if let Some(ip) = address {
            if counts.by_address.get(&ip).copied().unwrap_or(0) >= self.inner.max_per_address {
                return Err(Refused::Address);
            }
            if counts.by_range.get(&range_of(ip)).copied().unwrap_or(0) >= self.inner.max_per_range
            {
                return Err(Refused::Range);
            }
        }
        if counts.total >= self.inner.max_total {
            // Evicted connections close within moments; until they have, at most twice the
            // pool is held.
            if counts.total >= self.inner.max_total * 2 {
                return Err(Refused::Full);
            }
            let Some((_, oldest)) = counts.waiting.pop_first() else {
                return Err(Refused::Full);
            };
            oldest.evict();
        }
        if let Some(ip) = address {
            *counts.by_address.entry(ip).or_default() += 1;
            *counts.by_range.entry(range_of(ip)).or_default() += 1;
        }
        counts.total += 1;
        counts.next += 1;
        Ok(PreAuthSlot {
            inner: self.inner.clone(),
            address,
            number: counts.next,
            on_proof: None,
        })
    }

    /// Unproven connections held now.
    pub fn held(&self) -> usize {
        self.inner.lock().total
    }
}

/// Gives one place of `key` back, forgetting keys that hold none.
fn release(counts: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    if let Some(n) = counts.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// The network an address belongs to: its /24 for IPv4 (IPv4-mapped IPv6 too), its /64 for
/// IPv6 (what one subscriber or one host is given).
fn range_of(ip: IpAddr) -> IpAddr {
    let v4 = |a: Ipv4Addr| {
        let [x, y, z, _] = a.octets();
        IpAddr::V4(Ipv4Addr::new(x, y, z, 0))
    };
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(mapped) => v4(mapped),
            None => {
                let s = a.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding them.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        if let Some(limit) = &self.on_proof {
            limit.raise();
        }
        let mut counts = self.inner.lock();
        counts.waiting.remove(&self.number);
        counts.total = counts.total.saturating_sub(1);
        if let Some(ip) = self.address {
            release(&mut counts.by_address, ip);
            release(&mut counts.by_range, range_of(ip));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    #[test]
    fn one_address_cannot_take_the_whole_pool() {
        let pool = PreAuth::new(10, 3, 100);
        let flood: Vec<_> = (0..3)
            .map(|_| pool.admit(ip("10.0.0.9")).unwrap())
            .collect();
        assert_eq!(pool.admit(ip("10.0.0.9")).err(), Some(Refused::Address));
        let real = pool
            .admit(ip("10.0.0.1"))
            .expect("another address still gets in");
        assert_eq!(pool.held(), 4);
        drop(flood);
        drop(real);
        assert_eq!(pool.held(), 0);
        assert!(
            pool.admit(ip("10.0.0.9")).is_ok(),
            "places come back when dropped"
        );
    }

    #[test]
    fn a_full_pool_evicts_its_oldest_unproven_connection_for_a_newcomer() {
        let pool = PreAuth::new(3, 2, 100);
        let limits: Vec<FrameLimit> = (0..3).map(|_| FrameLimit::new(16, 1024)).collect();
        let flood: Vec<_> = limits
            .iter()
            .enumerate()
            .map(|(i, l)| pool.admit(ip(&format!("10.0.1.{i}"))).unwrap().raising(l))
            .collect();
        let real = pool.admit(ip("10.0.0.1")).expect("a newcomer gets in");
        assert!(limits[0].is_evicted(), "the oldest is evicted");
        assert!(!limits[1].is_evicted() && !limits[2].is_evicted());
        drop(flood);
        drop(real);
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn the_pool_is_bounded_in_all() {
        let pool = PreAuth::new(4, 2, 100);
        let held: Vec<_> = (0..4)
            .map(|i| pool.admit(ip(&format!("10.0.0.{i}"))).unwrap())
            .collect();
        // None of these can be evicted (no socket attached).
        assert_eq!(pool.admit(ip("10.0.0.200")).err(), Some(Refused::Full));
        drop(held);
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn one_network_holds_at_most_its_share() {
        let pool = PreAuth::new(10, 2, 4);
        let flood: Vec<_> = (0..4)
            .map(|i| pool.admit(ip(&format!("203.0.113.{i}"))).unwrap())
            .collect();
        // A fifth address of the same /24 is refused, not given someone else's place.
        assert_eq!(pool.admit(ip("203.0.113.77")).err(), Some(Refused::Range));
        assert!(
            pool.admit(ip("203.0.114.1")).is_ok(),
            "the next /24 is another network"
        );
        // IPv6: a /64 is one network; IPv4-mapped addresses count as their IPv4 network.
        let v6: Vec<_> = (1..=4)
            .map(|i| pool.admit(ip(&format!("2001:db8:1:2::{i}"))).unwrap())
            .collect();
        assert_eq!(
            pool.admit(ip("2001:db8:1:2:ffff::9")).err(),
            Some(Refused::Range)
        );
        assert_eq!(
            pool.admit(ip("::ffff:203.0.113.200")).err(),
            Some(Refused::Range)
        );
        drop(flood);
        assert!(pool.admit(ip("203.0.113.77")).is_ok(), "places come back");
        drop(v6);
    }
}

//! A WebSocket door: who may knock (admission of sockets that have not proved themselves),
//! how many may be in at once, and closing every session when the node stops.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use std::time::Instant;

use prometheus::{IntCounterVec, IntGauge};
use tokio::sync::watch;

use super::{EdgeSocket, Timing};
use crate::admission::{PreAuth, PreAuthSlot, Refused};
use crate::socket::Channels;

/// Why a door did not let a socket in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotAdmitted {
    /// Too many sockets (from this address, or in all) have not proved themselves yet.
    #[error(transparent)]
    Busy(Refused),
    /// The door holds as many sessions as it takes, or the node is stopping.
    #[error(
        "this node has as many sessions of this kind as it accepts; try another node or later"
    )]
    Full,
}

pub struct Door {
    inner: Arc<Inner>,
}

struct Inner {
    max_open: usize,
    open: AtomicUsize,
    /// The open-sessions gauge of this door.
    gauge: IntGauge,
    /// Sessions this door closed, by reason.
    closed: IntCounterVec,
    pre_auth: PreAuth,
    next_id: AtomicU64,
    /// Set when the node stops: every session closes ("going away"), new ones are refused.
    closing: watch::Sender<bool>,
}

/// An admitted socket's place among the unproven ones (if it has to prove itself) and seat.
pub type Admitted = (Option<PreAuthSlot>, Seat);

/// One place among the door's open sessions, held until dropped.
pub struct Seat(Arc<Inner>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge.dec();
    }
}

impl Door {
    /// A door for at most `max_open` sessions, counted in `gauge`; their closes in `closed`.
    pub fn new(max_open: usize, gauge: IntGauge, closed: IntCounterVec, pre_auth: PreAuth) -> Self {
        Door {
            inner: Arc::new(Inner {
                max_open,
                open: AtomicUsize::new(0),
                gauge,
                closed,
                pre_auth,
                next_id: AtomicU64::new(1),
                closing: watch::Sender::new(false),
            }),
        }
    }

    /// A place among the sockets that have not proved themselves yet, for one from `address`.
    pub fn pre_auth(&self, address: Option<IpAddr>) -> Result<PreAuthSlot, Refused> {
        self.inner.pre_auth.admit(address)
    }

    /// A place for one more session, if the door has room and the node is not stopping.
    pub fn seat(&self) -> Option<Seat> {
        if *self.inner.closing.borrow() {
            return None;
        }
        let taken = self.inner.open.fetch_add(1, Ordering::Relaxed);
        self.inner.gauge.inc();
        let seat = Seat(self.inner.clone());
        (taken < self.inner.max_open).then_some(seat)
    }

    /// Admits a socket from `address`: a place among the unproven ones (none when the
    /// upgrade request already proved who it is) and a seat.
    pub fn admit(&self, address: Option<IpAddr>, proven: bool) -> Result<Admitted, NotAdmitted> {
        // The seat first: a socket that gets none must not evict an unproven one.
        let seat = self.seat().ok_or(NotAdmitted::Full)?;
        let pre_auth = match proven {
            true => None,
            false => Some(self.pre_auth(address).map_err(NotAdmitted::Busy)?),
        };
        Ok((pre_auth, seat))
    }

    /// The socket of an admitted session, with a queue of `queue` frames; the channels are
    /// the socket tasks' ends (`socket::serve`).
    pub fn socket(
        &self,
        queue: usize,
        (pre_auth, seat): Admitted,
        timing: Timing,
    ) -> (EdgeSocket, Channels) {
        let (io, out, shutdown) = crate::socket::channels(queue);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let socket = EdgeSocket {
            id,
            out,
            shutdown: Some(shutdown),
            last_heard: Instant::now(),
            pre_auth,
            _seat: seat,
            closed: self.inner.closed.clone(),
            timing,
            closing: self.inner.closing.subscribe(),
        };
        (socket, io)
    }

    /// Whether the node is stopping.
    #[cfg(test)]
    fn is_closing(&self) -> bool {
        *self.inner.closing.borrow()
    }

    /// Closes every session ("going away") and refuses new ones: the node is stopping.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seats_are_bounded_counted_and_returned() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let closed = IntCounterVec::new(prometheus::Opts::new("c", "c"), &["reason"]).unwrap();
        let door = Door::new(2, gauge.clone(), closed, PreAuth::new(4, 2, 4));
        let a = door.seat().expect("room");
        let b = door.seat().expect("room");
        assert!(door.seat().is_none(), "full");
        assert_eq!(gauge.get(), 2, "the refused seat is given back");
        drop(a);
        let c = door.seat().expect("a place came free");
        door.close();
        assert!(door.seat().is_none(), "a stopping node takes no one");
        assert!(door.is_closing());
        drop((b, c));
        assert_eq!(door.admit(None, false).err(), Some(NotAdmitted::Full));
        assert_eq!(gauge.get(), 0);
    }
}

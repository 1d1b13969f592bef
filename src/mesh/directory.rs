//! The mesh's directory: every link (configured or inbound) and its health, the authenticated
//! sessions broadcasts go to, which regions take part in which run (`register-peer`), and the
//! sync states kept between connections so a reconnect costs only what was missed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use actix::Addr;
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::presence::{PeerPresence, PresenceRelay};
use super::session::PeerSession;
use crate::socket::Out;

pub const MAX_REGIONS_PER_RUN: usize = 32;
/// Saved sync states per peer node; beyond this a reconnect syncs the rest from scratch.
const MAX_SAVED_STATES: usize = 200_000;
/// Saved sync states over all peer nodes.
const MAX_SAVED_TOTAL: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
#[error("a run takes at most {MAX_REGIONS_PER_RUN} regions")]
pub struct TooManyRegions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// Counters a link's session updates on every frame, read by the status page.
#[derive(Default)]
pub struct LinkStats {
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    /// Unix milliseconds of the last frame received; 0 before any.
    pub last_seen_ms: AtomicI64,
    /// Last measured ping round trip in microseconds; 0 before any.
    pub rtt_us: AtomicU64,
}

impl LinkStats {
    pub fn heard(&self) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.last_seen_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }
}

/// What the rest of the node may do with an authenticated session.
#[derive(Clone)]
pub struct SessionHandle {
    pub addr: Addr<PeerSession>,
    pub out: mpsc::Sender<Out>,
    pub stats: Arc<LinkStats>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub node_id: String,
    pub region: String,
}

struct Link {
    direction: Direction,
    url: Option<String>,
    remote: Option<String>,
    peer: Option<PeerIdentity>,
    connected_since: Option<chrono::DateTime<chrono::Utc>>,
    attempts: u64,
    reconnects: u64,
    last_error: Option<String>,
    stats: Arc<LinkStats>,
    session: Option<SessionHandle>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    pub id: u64,
    pub direction: Direction,
    pub url: Option<String>,
    pub remote_addr: Option<String>,
    pub region: Option<String>,
    pub node_id: Option<String>,
    pub connected: bool,
    pub connected_since: Option<String>,
    pub last_seen: Option<String>,
    pub rtt_ms: Option<f64>,
    pub connect_attempts: u64,
    pub reconnects: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionConflict {
    pub region: String,
    pub node_ids: BTreeSet<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSnapshot {
    pub peers: Vec<LinkStatus>,
    /// Distinct peer nodes with at least one authenticated link.
    pub connected_peers: usize,
    pub registrations: BTreeMap<Uuid, BTreeSet<String>>,
    pub region_conflicts: Vec<RegionConflict>,
}

struct Directory {
    me: PeerIdentity,
    next_id: u64,
    links: BTreeMap<u64, Link>,
    registrations: BTreeMap<Uuid, BTreeSet<String>>,
    saved_sync: HashMap<String, HashMap<Uuid, Vec<u8>>>,
    conflicts: BTreeMap<String, BTreeSet<String>>,
}

impl Directory {
    fn connected_nodes(&self) -> BTreeSet<&str> {
        self.links
            .values()
            .filter(|l| l.session.is_some())
            .filter_map(|l| l.peer.as_ref().map(|p| p.node_id.as_str()))
            .collect()
    }
}

/// Whether two node ids are pods of one StatefulSet (`name-0`, `name-1`, …): the replicas of
/// one region's deployment, which share the region legitimately.
pub fn same_set(a: &str, b: &str) -> bool {
    fn set(id: &str) -> Option<&str> {
        let (name, ordinal) = id.rsplit_once('-')?;
        (!name.is_empty() && !ordinal.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit()))
            .then_some(name)
    }
    a == b || matches!((set(a), set(b)), (Some(x), Some(y)) if x == y)
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct MeshState {
    inner: Arc<RwLock<Directory>>,
    gauge: prometheus::IntGauge,
    closing: Arc<AtomicBool>,
    presence: Arc<PresenceRelay>,
}

impl MeshState {
    pub fn new(node_id: &str, region: &str, gauge: prometheus::IntGauge) -> Self {
        gauge.set(0);
        MeshState {
            inner: Arc::new(RwLock::new(Directory {
                me: PeerIdentity {
                    node_id: node_id.to_string(),
                    region: region.to_string(),
                },
                next_id: 1,
                links: BTreeMap::new(),
                registrations: BTreeMap::new(),
                saved_sync: HashMap::new(),
                conflicts: BTreeMap::new(),
            })),
            gauge,
            closing: Arc::new(AtomicBool::new(false)),
            presence: PresenceRelay::new(),
        }
    }

    pub fn presence(&self) -> &PresenceRelay {
        &self.presence
    }

    /// The node is shutting down: links are closed and not redialled.
    pub fn close(&self) -> Vec<SessionHandle> {
        self.closing.store(true, Ordering::SeqCst);
        self.read()
            .links
            .values()
            .filter_map(|l| l.session.clone())
            .collect()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A new link: a configured peer (kept across reconnects) or an inbound connection.
    pub fn add_link(
        &self,
        direction: Direction,
        url: Option<String>,
        remote: Option<String>,
    ) -> (u64, Arc<LinkStats>) {
        let mut dir = self.write();
        let id = dir.next_id;
        dir.next_id += 1;
        let stats = Arc::new(LinkStats::default());
        dir.links.insert(
            id,
            Link {
                direction,
                url,
                remote,
                peer: None,
                connected_since: None,
                attempts: 0,
                reconnects: 0,
                last_error: None,
                stats: stats.clone(),
                session: None,
            },
        );
        (id, stats)
    }

    /// A configured link starts a connection attempt; returns fresh counters for it.
    pub fn attempt(&self, link: u64, remote: String) -> Arc<LinkStats> {
        let mut dir = self.write();
        match dir.links.get_mut(&link) {
            Some(l) => {
                l.attempts += 1;
                l.remote = Some(remote);
                l.stats = Arc::new(LinkStats::default());
                l.stats.clone()
            }
            None => Arc::new(LinkStats::default()),
        }
    }

    pub fn link_error(&self, link: u64, error: String) {
        if let Some(l) = self.write().links.get_mut(&link) {
            l.last_error = Some(error);
        }
    }

    /// Records an authenticated session. Returns a warning when the peer's region is already
    /// claimed by another node (this one or a connected peer).
    pub fn link_up(&self, link: u64, peer: PeerIdentity, session: SessionHandle) -> Option<String> {
        let node_id = peer.node_id.clone();
        let mut dir = self.write();
        let mut claimants: BTreeSet<String> = dir
            .links
            .iter()
            .filter(|(id, l)| **id != link && l.session.is_some())
            .filter_map(|(_, l)| l.peer.as_ref())
            .filter(|p| p.region == peer.region && !same_set(&p.node_id, &peer.node_id))
            .map(|p| p.node_id.clone())
            .collect();
        if dir.me.region == peer.region && !same_set(&dir.me.node_id, &peer.node_id) {
            claimants.insert(dir.me.node_id.clone());
        }
        let warning = if claimants.is_empty() {
            None
        } else {
            claimants.insert(peer.node_id.clone());
            let text = format!(
                "region {} is claimed by more than one node: {}",
                peer.region,
                claimants.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            dir.conflicts
                .entry(peer.region.clone())
                .or_default()
                .extend(claimants);
            Some(text)
        };
        if let Some(l) = dir.links.get_mut(&link) {
            if l.connected_since.is_some() {
                l.reconnects += 1;
            }
            l.peer = Some(peer);
            l.connected_since = Some(chrono::Utc::now());
            l.last_error = None;
            l.session = Some(session);
        }
        self.gauge.set(dir.connected_nodes().len() as i64);
        drop(dir);
        self.presence.notify(PeerPresence::NodeUp(node_id));
        warning
    }

    /// A link's session ended. Inbound links disappear; configured ones stay, disconnected.
    pub fn link_down(&self, link: u64, error: Option<String>) {
        let mut dir = self.write();
        let mut peer = None;
        let remove = match dir.links.get_mut(&link) {
            Some(l) => {
                if l.session.is_some() {
                    peer = l.peer.as_ref().map(|p| p.node_id.clone());
                }
                l.session = None;
                if error.is_some() {
                    l.last_error = error;
                }
                l.direction == Direction::Inbound
            }
            None => false,
        };
        if remove {
            dir.links.remove(&link);
        }
        let connected = dir.connected_nodes();
        self.gauge.set(connected.len() as i64);
        let gone = peer.filter(|p| !connected.contains(p.as_str()));
        drop(dir);
        if let Some(node) = gone {
            self.presence.forget_origin(&node);
            self.presence.notify(PeerPresence::NodeDown(node));
        }
    }

    /// One session per connected peer node, for broadcasts: two links to one node would
    /// otherwise carry every change twice. The newest link: an older one may be half-open,
    /// not yet found dead, and what is queued on it would be lost with it.
    pub fn primaries(&self) -> Vec<(String, SessionHandle)> {
        self.primaries_where(|_| true)
            .into_iter()
            .map(|(peer, s)| (peer.node_id, s))
            .collect()
    }

    /// The primary sessions, with each peer's identity (its region).
    pub fn primaries_by_region(&self) -> Vec<(PeerIdentity, SessionHandle)> {
        self.primaries_where(|_| true)
    }

    /// The primary sessions to nodes of `region`.
    pub fn sessions_in(&self, region: &str) -> Vec<SessionHandle> {
        self.primaries_where(|p| p.region == region)
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    fn primaries_where(
        &self,
        keep: impl Fn(&PeerIdentity) -> bool,
    ) -> Vec<(PeerIdentity, SessionHandle)> {
        let dir = self.read();
        type Best<'a> = (
            chrono::DateTime<chrono::Utc>,
            &'a PeerIdentity,
            &'a SessionHandle,
        );
        let mut best: BTreeMap<&str, Best<'_>> = BTreeMap::new();
        for l in dir.links.values() {
            if let (Some(peer), Some(s), Some(since)) = (&l.peer, &l.session, l.connected_since) {
                if !keep(peer) {
                    continue;
                }
                let entry = best
                    .entry(peer.node_id.as_str())
                    .or_insert((since, peer, s));
                if since > entry.0 {
                    *entry = (since, peer, s);
                }
            }
        }
        best.into_values()
            .map(|(_, peer, s)| (peer.clone(), s.clone()))
            .collect()
    }

    pub fn save_sync_states(&self, node_id: &str, states: Vec<(Uuid, Vec<u8>)>) {
        if states.is_empty() {
            return;
        }
        let mut dir = self.write();
        let total: usize = dir.saved_sync.values().map(HashMap::len).sum();
        if total >= MAX_SAVED_TOTAL && !dir.saved_sync.contains_key(node_id) {
            return;
        }
        let saved = dir.saved_sync.entry(node_id.to_string()).or_default();
        for (run, bytes) in states {
            if saved.len() < MAX_SAVED_STATES || saved.contains_key(&run) {
                saved.insert(run, bytes);
            }
        }
    }

    pub fn saved_sync_state(&self, node_id: &str, run: Uuid) -> Option<Vec<u8>> {
        self.read().saved_sync.get(node_id)?.get(&run).cloned()
    }

    /// Records that `region` takes part in `run_id`; true if it was not recorded before.
    /// A run holds at most [`MAX_REGIONS_PER_RUN`] regions.
    pub fn register(&self, run_id: Uuid, region: &str) -> Result<bool, TooManyRegions> {
        let mut dir = self.write();
        let regions = dir.registrations.entry(run_id).or_default();
        if regions.len() >= MAX_REGIONS_PER_RUN && !regions.contains(region) {
            return Err(TooManyRegions);
        }
        Ok(regions.insert(region.to_string()))
    }

    pub fn snapshot(&self) -> MeshSnapshot {
        let dir = self.read();
        let time = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339());
        let peers = dir
            .links
            .iter()
            .map(|(id, l)| {
                let seen = l.stats.last_seen_ms.load(Ordering::Relaxed);
                let rtt = l.stats.rtt_us.load(Ordering::Relaxed);
                LinkStatus {
                    id: *id,
                    direction: l.direction,
                    url: l.url.clone(),
                    remote_addr: l.remote.clone(),
                    region: l.peer.as_ref().map(|p| p.region.clone()),
                    node_id: l.peer.as_ref().map(|p| p.node_id.clone()),
                    connected: l.session.is_some(),
                    connected_since: l
                        .session
                        .as_ref()
                        .and(l.connected_since)
                        .map(|t| t.to_rfc3339()),
                    last_seen: (seen > 0).then(|| time(seen)).flatten(),
                    rtt_ms: (rtt > 0).then(|| rtt as f64 / 1000.0),
                    connect_attempts: l.attempts,
                    reconnects: l.reconnects,
                    messages_in: l.stats.messages_in.load(Ordering::Relaxed),
                    messages_out: l.stats.messages_out.load(Ordering::Relaxed),
                    last_error: l.last_error.clone(),
                }
            })
            .collect();
        MeshSnapshot {
            peers,
            connected_peers: dir.connected_nodes().len(),
            registrations: dir.registrations.clone(),
            region_conflicts: dir
                .conflicts
                .iter()
                .map(|(region, nodes)| RegionConflict {
                    region: region.clone(),
                    node_ids: nodes.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_set;

    #[test]
    fn pods_of_one_statefulset_share_a_region() {
        assert!(same_set("crdt-node-0", "crdt-node-1"));
        assert!(same_set("a", "a"));
        assert!(!same_set("crdt-node-0", "other-node-1"));
        assert!(!same_set("node-0-us-east-1", "node-1-us-east-1"));
        assert!(!same_set("crdt-node", "crdt-node-1"));
    }
}

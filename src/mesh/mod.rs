//! The mesh between regions. This version keeps the mesh's directory: the configured peers and
//! which regions take part in which run (`register-peer`). Peer sessions build on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use uuid::Uuid;

pub const MAX_REGIONS_PER_RUN: usize = 32;

#[derive(Debug, thiserror::Error)]
#[error("a run takes at most {MAX_REGIONS_PER_RUN} regions")]
pub struct TooManyRegions;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    pub url: String,
    pub region: Option<String>,
    pub node_id: Option<String>,
    pub connected: bool,
}

#[derive(Default)]
struct Directory {
    peers: Vec<PeerStatus>,
    registrations: BTreeMap<Uuid, BTreeSet<String>>,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct MeshState {
    inner: Arc<RwLock<Directory>>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSnapshot {
    pub peers: Vec<PeerStatus>,
    pub connected_peers: usize,
    pub registrations: BTreeMap<Uuid, BTreeSet<String>>,
}

impl MeshState {
    pub fn new(peer_urls: &[String]) -> Self {
        let peers = peer_urls
            .iter()
            .map(|url| PeerStatus {
                url: url.clone(),
                region: None,
                node_id: None,
                connected: false,
            })
            .collect();
        MeshState {
            inner: Arc::new(RwLock::new(Directory {
                peers,
                registrations: BTreeMap::new(),
            })),
        }
    }

    /// Records that `region` takes part in `run_id`; true if it was not recorded before.
    /// A run holds at most [`MAX_REGIONS_PER_RUN`] regions.
    pub fn register(&self, run_id: Uuid, region: &str) -> Result<bool, TooManyRegions> {
        let mut dir = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let regions = dir.registrations.entry(run_id).or_default();
        if regions.len() >= MAX_REGIONS_PER_RUN && !regions.contains(region) {
            return Err(TooManyRegions);
        }
        Ok(regions.insert(region.to_string()))
    }

    pub fn is_connected(&self, region: &str) -> bool {
        let dir = self.inner.read().unwrap_or_else(|p| p.into_inner());
        dir.peers
            .iter()
            .any(|p| p.connected && p.region.as_deref() == Some(region))
    }

    pub fn snapshot(&self) -> MeshSnapshot {
        let dir = self.inner.read().unwrap_or_else(|p| p.into_inner());
        MeshSnapshot {
            connected_peers: dir.peers.iter().filter(|p| p.connected).count(),
            peers: dir.peers.clone(),
            registrations: dir.registrations.clone(),
        }
    }
}

//! Presence as the mesh carries it: who views which run, ephemeral, never stored.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often a node re-announces the viewers it has.
pub const REFRESH: Duration = Duration::from_secs(10);
/// How long an announcement holds without a refresh.
pub const PRESENCE_TTL: Duration = Duration::from_secs(30);
/// Most distinct users one announcement may list.
pub const MAX_USERS: usize = 1000;

/// One user viewing a run on the announcing node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceUser {
    pub user: String,
    /// Open sessions of this user on the run, on the announcing node.
    pub sessions: u32,
}

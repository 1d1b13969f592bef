//! crdt-node: the runtime (`runs`), the edges (`http`, `mesh`, `browser`, `automerge_repo`) and
//! what they share. ARCHITECTURE.md (beside Cargo.toml) is the map; README.md the guide.
pub mod admission;
pub mod api_error;
pub mod automerge_repo;
pub mod browser;
pub mod config;
pub mod edge_kit;
pub mod feed;
pub mod http;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod runs;
pub mod socket;
pub mod sync_driver;

//! The node's wire formats, as plain data with no IO: what every outside byte is decoded by
//! before the node acts on it (and what the fuzz targets exercise).
//!
//! - [`mesh`]: node-to-node JSON frames on `/ws`, the handshake's proofs;
//! - [`presence`]: who views which run, as the mesh announces it;
//! - [`browser`]: browser session frames on `/ws/runs/{runId}`;
//! - [`automerge_repo`]: automerge-repo's CBOR messages and document ids;
//! - [`close`]: the WebSocket close codes every door uses;
//! - [`cluster`]: calls between the pods of a region that share one database.

pub mod automerge_repo;
pub mod browser;
pub mod close;
pub mod cluster;
pub mod mesh;
pub mod presence;

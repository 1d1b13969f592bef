//! crdt-node library: see README.md and ../DESIGN for the architecture.
pub mod doc;
pub mod store;
pub mod config;
pub mod metrics;
pub mod runs;
pub mod http;
pub mod mesh;
pub mod node;

//! crdt-node library: see README.md and ../DESIGN for the architecture.
pub mod doc;
pub mod store;

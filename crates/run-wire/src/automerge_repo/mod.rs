//! automerge-repo's network protocol: CBOR messages ([`wire`]) and document ids ([`doc_id`]).

pub mod doc_id;
pub mod wire;

//! A run's read model, kept beside its snapshot: the state as `/state` shows it at the
//! snapshot's heads, and where each graft sits in the document's list.
//!
//! Loading a large run costs what Automerge costs to inflate it (50,000 grafts: most of a
//! second) and its first read what the graft index costs to build (as much again). With the
//! projection the node answers a cold run's reads and retried grafts at once while the document
//! loads, and builds the graft index by walking the list once instead of reading every graft.
//! It is the node's own record, written in the same row as the document it describes; anything
//! that does not match (another version, a list of another length) is ignored and rebuilt.

use std::io::Read;
use std::sync::Arc;

use automerge::{AutoCommit, ObjType, ReadDoc, ValueRef};
use flate2::{read::DeflateDecoder, write::DeflateEncoder, Compression};
use serde::{Deserialize, Serialize};

use super::genesis::GRAFTS;
use super::state::{root_obj, Graft, RunState, SharedState};
use super::DocError;

/// Bumped whenever `RunState` or this layout changes meaning: older projections are ignored.
const VERSION: u32 = 2;

/// A projection inflates to at most this (a cap on the node's own bytes, against a torn row).
const MAX_INFLATED: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct Projection {
    /// What `/state` answers at the snapshot's heads, with its JSON as stored: a loading run's
    /// readers get both without a copy or a second serialization.
    pub state: Arc<SharedState>,
    /// The grafts list in document order, when the list follows the schema: each entry is the
    /// position of its graft in `state.grafts`, or a graft hidden behind another with its id.
    list: Option<Vec<ListEntry>>,
}

/// A projection as stored: the state as its JSON text, kept whole to be served as it is.
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    state: String,
    list: Option<Vec<ListEntry>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum ListEntry {
    Shown(u32),
    Hidden(Graft),
}

impl Projection {
    pub(super) fn new(state: RunState, list: Option<Vec<ListEntry>>) -> Self {
        Projection {
            state: Arc::new(SharedState::new(state)),
            list,
        }
    }

    /// The same list with another state (for tests that mark a stored projection).
    pub fn with_state(&self, state: RunState) -> Self {
        Projection {
            state: Arc::new(SharedState::new(state)),
            list: self.list.clone(),
        }
    }

    /// JSON, deflated: a 50,000-graft run's state is 8 MB of JSON, and it is written with every
    /// snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let stored = Stored {
            version: VERSION,
            state: self.state.json().to_owned(),
            list: self.list.clone(),
        };
        let mut out = DeflateEncoder::new(Vec::new(), Compression::fast());
        // Writing to a Vec and serializing plain data cannot fail.
        let _ = serde_json::to_writer(&mut out, &stored);
        out.finish().unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Projection, DocError> {
        let bad = |e: String| DocError::InvalidChanges(format!("unreadable projection: {e}"));
        let mut json = Vec::new();
        DeflateDecoder::new(bytes)
            .take(MAX_INFLATED)
            .read_to_end(&mut json)
            .map_err(|e| bad(e.to_string()))?;
        let stored: Stored = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
        if stored.version != VERSION {
            return Err(bad(format!("version {}", stored.version)));
        }
        let state: RunState =
            serde_json::from_str(&stored.state).map_err(|e| bad(e.to_string()))?;
        Ok(Projection {
            state: Arc::new(SharedState::with_json(state, stored.state)),
            list: stored.list,
        })
    }

    /// The list's entries in document order, each with its graft, when the projection has
    /// them and they match the document's list (same length, every entry a map).
    pub(super) fn graft_objects(
        &self,
        doc: &AutoCommit,
    ) -> Option<(automerge::ObjId, Vec<(automerge::ObjId, Graft)>)> {
        let entries = self.list.as_ref()?;
        let list = root_obj(doc, GRAFTS, ObjType::List).ok()?;
        let mut out = Vec::with_capacity(entries.len());
        let mut items = doc.list_range(&list, ..);
        for entry in entries {
            let item = items.next()?;
            if !matches!(item.value, ValueRef::Object(ObjType::Map)) {
                return None;
            }
            let graft = match entry {
                ListEntry::Shown(i) => self.state.grafts.get(*i as usize)?.clone(),
                ListEntry::Hidden(g) => g.clone(),
            };
            out.push((item.id(), graft));
        }
        items.next().is_none().then_some((list, out))
    }
}

/// Writes `bytes` through a deflate encoder (for tests of torn rows).
#[cfg(test)]
pub(super) fn deflate(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = DeflateEncoder::new(Vec::new(), Compression::fast());
    let _ = out.write_all(bytes);
    out.finish().unwrap_or_default()
}

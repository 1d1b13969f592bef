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
use super::state::{root_obj, Graft, RunState};
use super::DocError;

/// Bumped whenever `RunState` or this layout changes meaning: older projections are ignored.
const VERSION: u32 = 1;

/// A projection inflates to at most this (a cap on the node's own bytes, against a torn row).
const MAX_INFLATED: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    version: u32,
    /// What `/state` answers at the snapshot's heads; shared, not copied, with the readers of
    /// a run that is loading.
    #[serde(with = "shared")]
    pub state: Arc<RunState>,
    /// The grafts list in document order, when the list follows the schema: each entry is the
    /// position of its graft in `state.grafts`, or a graft hidden behind another with its id.
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
            version: VERSION,
            state: Arc::new(state),
            list,
        }
    }

    /// JSON, deflated: a 50,000-graft run's state is 8 MB of JSON, and it is written with every
    /// snapshot.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = DeflateEncoder::new(Vec::new(), Compression::fast());
        // Writing to a Vec and serializing plain data cannot fail.
        let _ = serde_json::to_writer(&mut out, self);
        out.finish().unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Projection, DocError> {
        let bad = |e: String| DocError::InvalidChanges(format!("unreadable projection: {e}"));
        let mut json = Vec::new();
        DeflateDecoder::new(bytes)
            .take(MAX_INFLATED)
            .read_to_end(&mut json)
            .map_err(|e| bad(e.to_string()))?;
        let projection: Projection =
            serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
        if projection.version != VERSION {
            return Err(bad(format!("version {}", projection.version)));
        }
        Ok(projection)
    }

    /// The graft readers see under `id`.
    pub fn graft(&self, id: &str) -> Option<&Graft> {
        self.state.grafts.iter().find(|g| g.id == id)
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

/// The state (de)serialized as itself, held in an `Arc`.
mod shared {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::RunState;

    pub fn serialize<S: Serializer>(state: &Arc<RunState>, s: S) -> Result<S::Ok, S::Error> {
        state.as_ref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<RunState>, D::Error> {
        RunState::deserialize(d).map(Arc::new)
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

//! Automerge change bytes from outside: splitting, parsing and the Lamport stamp they carry.
//!
//! The wire format for "changes" (HTTP sync, mesh `CRDT_SYNC`, `GET …/changes`) is Automerge
//! change chunks concatenated, as `get_changes` + `raw_bytes` produce them. Automerge parses one
//! chunk at a time, so we split the concatenation using the chunk header (magic bytes, checksum,
//! type, LEB128 length) and let Automerge verify each chunk fully.

use automerge::Change;
use serde::{Deserialize, Serialize};

use super::DocError;

use super::bounds::{self, Budget};

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Chunk types that hold one change (plain or compressed); a document chunk is type 0.
const CHANGE_CHUNK_TYPES: [u8; 2] = [1, 2];
const COMPRESSED: u8 = 2;
const DOCUMENT: u8 = 0;
/// Compressed changes larger than this are refused: each is inflated whole before its
/// operations can be counted.
const MAX_COMPRESSED_CHUNK: usize = 64 * 1024;

/// Parses concatenated change chunks from outside; every byte must belong to a valid change,
/// and together they must fit one request's [`Budget`].
pub fn parse_changes(bytes: &[u8]) -> Result<Vec<Change>, DocError> {
    split_changes(bytes, Some(&mut Budget::default()))
}

/// As [`parse_changes`], for changes another node committed (see [`Budget::peer`]).
pub fn parse_peer_changes(bytes: &[u8]) -> Result<Vec<Change>, DocError> {
    split_changes(bytes, Some(&mut Budget::peer()))
}

/// As [`parse_changes`], for this node's own changes (to re-frame them): no bounds on size,
/// which only guard against what others send.
pub fn parse_own_changes(bytes: &[u8]) -> Result<Vec<Change>, DocError> {
    split_changes(bytes, None)
}

fn split_changes(bytes: &[u8], mut budget: Option<&mut Budget>) -> Result<Vec<Change>, DocError> {
    if bytes.is_empty() {
        return Err(DocError::InvalidChanges("no change bytes".into()));
    }
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let len = chunk_len(rest).map_err(|why| {
            DocError::InvalidChanges(format!(
                "chunk {} (at byte {}): {why}",
                out.len(),
                bytes.len() - rest.len()
            ))
        })?;
        let (chunk, tail) = rest.split_at(len);
        if let Some(budget) = budget.as_deref_mut() {
            if chunk[8] == COMPRESSED && len > MAX_COMPRESSED_CHUNK {
                return Err(DocError::TooLarge(format!(
                    "chunk {} is a compressed change of {len} bytes; send changes over \
                     {MAX_COMPRESSED_CHUNK} bytes uncompressed",
                    out.len()
                )));
            }
            // Counted before Automerge reads it: a few bytes can encode millions of ops.
            budget.admit(chunk)?;
        }
        // Automerge 0.12 panics on some malformed chunks (found by the `sync_changes` fuzz
        // target): bytes from outside must be an error, never a dead thread.
        let parsed = std::panic::catch_unwind(|| Change::try_from(chunk));
        let change = match parsed {
            Ok(Ok(change)) => change,
            Ok(Err(e)) => {
                return Err(DocError::InvalidChanges(format!(
                    "chunk {} is not an Automerge change: {e}",
                    out.len()
                )))
            }
            Err(_) => {
                return Err(DocError::InvalidChanges(format!(
                    "chunk {} is a malformed Automerge change",
                    out.len()
                )))
            }
        };
        out.push(change);
        rest = tail;
    }
    Ok(out)
}

/// The total length (header included) of the change chunk at the start of `bytes`.
fn chunk_len(bytes: &[u8]) -> Result<usize, String> {
    let total = bounds::chunk_len(bytes)?;
    let chunk_type = bytes[8];
    if !CHANGE_CHUNK_TYPES.contains(&chunk_type) {
        return Err(format!("chunk type {chunk_type} is not a change"));
    }
    Ok(total)
}

pub(super) fn read_uleb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, byte) in bytes.iter().take(10).enumerate() {
        let low = u64::from(byte & 0x7f);
        value |= low.checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// The changes of a whole saved document from outside (a `CRDT_FULL_SYNC` state, or the
/// document chunk Automerge's sync protocol sends when most of a document is missing).
pub fn parse_document(bytes: &[u8]) -> Result<Vec<Change>, DocError> {
    parse_document_within(bytes, &mut Budget::default())
}

/// As [`parse_document`], for a document a peer node sends (see [`Budget::peer`]).
pub fn parse_peer_document(bytes: &[u8]) -> Result<Vec<Change>, DocError> {
    parse_document_within(bytes, &mut Budget::peer())
}

/// As [`parse_document`], for a document this node saved itself: no bounds.
pub fn parse_own_document(bytes: &[u8]) -> Result<Vec<Change>, DocError> {
    let mut doc = load_document(bytes)
        .map_err(|e| DocError::InvalidChanges(format!("not an Automerge document: {e}")))?;
    Ok(doc.get_changes(&[]))
}

fn parse_document_within(bytes: &[u8], budget: &mut Budget) -> Result<Vec<Change>, DocError> {
    // Every chunk is checked before Automerge's loader sees any: it trusts the counts inside,
    // and some few hundred bytes make it allocate gigabytes (`fuzz/known/`).
    let sizes = budget.admit_all(bytes).map_err(|e| match e {
        DocError::InvalidChanges(why) => {
            DocError::InvalidChanges(format!("not an Automerge document: {why}"))
        }
        other => other,
    })?;
    if !sizes.first().is_some_and(|s| s.is_document) {
        return Err(DocError::InvalidChanges(
            "not an Automerge document: it does not start with a document chunk".into(),
        ));
    }
    // Walked and within bounds: now Automerge may read it.
    parse_own_document(bytes)
}

/// Loads a saved document. Automerge 0.12 panics on some malformed documents (found by the
/// `snapshot_load` fuzz target); bytes from outside must never take a thread down with them.
pub fn load_document(bytes: &[u8]) -> Result<automerge::AutoCommit, String> {
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        automerge::AutoCommit::load(bytes)
    }));
    match loaded {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("malformed document (Automerge failed to read it)".into()),
    }
}

/// Change chunks or a document chunk from outside: whichever `bytes` starts with.
pub fn parse_changes_or_document(bytes: &[u8]) -> Result<Vec<Change>, DocError> {
    parse_within(bytes, &mut Budget::default())
}

/// As [`parse_changes_or_document`], charging a budget shared with other parts of a request.
pub(super) fn parse_within(bytes: &[u8], budget: &mut Budget) -> Result<Vec<Change>, DocError> {
    if bytes.len() > 8 && bytes[..4] == MAGIC && bytes[8] == DOCUMENT {
        parse_document_within(bytes, budget)
    } else {
        split_changes(bytes, Some(budget))
    }
}

/// Concatenates changes into the wire format `parse_changes` reads.
pub fn concat_changes<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Vec<u8> {
    let mut out = Vec::new();
    for change in changes {
        out.extend_from_slice(change.raw_bytes());
    }
    out
}

/// What every change made by a crdt-node carries in its commit message: the Lamport timestamp
/// and region of the mutation. A receiver advances its clock from it, whatever path the change
/// took (HTTP, mesh, a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub lamport: u64,
    pub region: String,
    /// Who made the change (the writer a node's mutation was made for), so every region
    /// reads the same author from the change itself. Absent on changes made before it was
    /// recorded, and on replayed legacy rows (whose bytes must stay as they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Set on a revert: the heads whose state the change brings back.
    #[serde(default, rename = "revertTo", skip_serializing_if = "Option::is_none")]
    pub revert_to: Option<Vec<String>>,
    /// Set on a checkpoint: its label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

impl Stamp {
    pub fn to_message(&self) -> String {
        // Serializing two plain fields cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The stamp in a change's message, if it has one (changes from other clients may not).
    pub fn of(change: &Change) -> Option<Stamp> {
        change.message().and_then(Stamp::parse)
    }

    /// A stamp is trusted only when it is well-formed: a region as the log stores it and a
    /// timestamp within [`super::MAX_LAMPORT`].
    pub fn parse(message: &str) -> Option<Stamp> {
        let mut stamp: Stamp = serde_json::from_str(message).ok()?;
        let ok = super::rules::is_region(&stamp.region) && stamp.lamport <= super::MAX_LAMPORT;
        // A user the rules would not take is not believed (the rest of the stamp still is).
        if let Some(user) = &stamp.user {
            if super::rules::name("user", Some(user)).is_err() {
                stamp.user = None;
            }
        }
        ok.then_some(stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{transaction::Transactable, AutoCommit, ROOT};

    fn two_changes() -> Vec<Change> {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "a", 1).unwrap();
        doc.commit();
        doc.put(ROOT, "b", "x".repeat(300)).unwrap();
        doc.commit();
        doc.get_changes(&[])
    }

    #[test]
    fn concatenated_changes_round_trip() {
        let changes = two_changes();
        let bytes = concat_changes(&changes);
        let parsed = parse_changes(&bytes).unwrap();
        let hashes: Vec<_> = parsed.iter().map(|c| c.hash()).collect();
        assert_eq!(hashes, changes.iter().map(|c| c.hash()).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_garbage_truncation_and_documents() {
        assert!(parse_changes(b"").is_err());
        assert!(parse_changes(b"hello world, not automerge").is_err());
        let bytes = concat_changes(&two_changes());
        assert!(parse_changes(&bytes[..bytes.len() - 1]).is_err());
        let mut corrupted = bytes.clone();
        let last = corrupted.len() - 3;
        corrupted[last] ^= 0xff;
        assert!(
            parse_changes(&corrupted).is_err(),
            "a flipped byte must fail the checksum"
        );
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "a", 1).unwrap();
        let err = parse_changes(&doc.save()).unwrap_err().to_string();
        assert!(err.contains("not a change"), "{err}");
    }

    #[test]
    fn stamp_round_trips_through_a_commit_message() {
        let stamp = Stamp {
            lamport: 42,
            region: "us-east-1".into(),
            user: Some("ann".into()),
            revert_to: None,
            checkpoint: None,
        };
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "a", 1).unwrap();
        doc.commit_with(
            automerge::transaction::CommitOptions::default().with_message(stamp.to_message()),
        );
        let change = doc.get_last_local_change().unwrap();
        assert_eq!(Stamp::of(&change), Some(stamp));
    }
}

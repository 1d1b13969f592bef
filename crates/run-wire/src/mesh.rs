//! The mesh wire protocol: JSON text frames over a WebSocket at `/ws`.
//!
//! A link opens with a two-step handshake that both ends run at once:
//! 1. `HELLO {nodeId, region, protocolVersion, nonce}` — who I am, and a fresh random nonce;
//! 2. `AUTH {proof}` — HMAC-SHA256, keyed with the mesh secret, over the peer's nonce, my nonce
//!    and my identity. The secret never crosses the wire, and a recorded proof is worthless on
//!    another link because the peer's nonce differs.
//!
//! After both ends have verified the other's proof, the seed's `CRDT_SYNC` and
//! `CRDT_FULL_SYNC` flow, plus the frames this node adds: `CRDT_RUNS` (which runs a node holds,
//! sent on connect), `CRDT_SYNC_MESSAGE` (Automerge's sync protocol, for catch-up) and `ERROR`
//! (why a frame was rejected) and `PRESENCE` (who views a run; never stored).

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const PROTOCOL_VERSION: u32 = 1;

/// One frame of the mesh protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Frame {
    #[serde(rename_all = "camelCase")]
    Hello {
        node_id: String,
        region: String,
        protocol_version: u32,
        nonce: String,
    },
    #[serde(rename_all = "camelCase")]
    Auth { proof: String },
    /// New changes of one run (the seed's incremental sync).
    #[serde(rename = "CRDT_SYNC", rename_all = "camelCase")]
    CrdtSync {
        run_id: String,
        source_region: String,
        /// Base64 of concatenated Automerge change chunks.
        changes: String,
        /// The sender's Lamport clock for the run.
        timestamp: u64,
    },
    /// A whole run (the seed's full sync): base64 of `Automerge::save()`.
    #[serde(rename = "CRDT_FULL_SYNC", rename_all = "camelCase")]
    CrdtFullSync {
        run_id: String,
        source_region: String,
        state: String,
        timestamp: u64,
    },
    /// One page of the run ids the sender holds; `done` marks the last page. `digests`, when
    /// present, holds per run a hex digest of its heads (or null when unknown): a run with the
    /// same digest on both sides is already in sync and is skipped.
    #[serde(rename = "CRDT_RUNS", rename_all = "camelCase")]
    CrdtRuns {
        run_ids: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digests: Option<Vec<Option<String>>>,
        done: bool,
    },
    /// Base64 of one encoded Automerge sync-protocol message for a run.
    #[serde(rename = "CRDT_SYNC_MESSAGE", rename_all = "camelCase")]
    CrdtSyncMessage {
        run_id: String,
        source_region: String,
        message: String,
        timestamp: u64,
    },
    /// Who views a run on node `origin` (ephemeral; see `presence`).
    #[serde(rename_all = "camelCase")]
    Presence {
        run_id: String,
        origin: String,
        region: String,
        epoch: u64,
        seq: u64,
        users: Vec<crate::presence::PresenceUser>,
    },
    /// The last decision about a run's deletion (`deleted: false`: restored). Every region
    /// keeps the later decision: `decidedAt` (unix ms), then the greater `region`. Sent when a
    /// run is deleted or restored, relayed once onwards, and sent back for any frame about a
    /// deleted run.
    #[serde(rename = "RUN_TOMBSTONE", rename_all = "camelCase")]
    RunTombstone {
        run_id: String,
        deleted: bool,
        decided_at: i64,
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// Why the peer's frame was rejected; the link stays open.
    #[serde(rename_all = "camelCase")]
    Error {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_id: Option<String>,
    },
}

impl Frame {
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Auth { .. } => "AUTH",
            Frame::CrdtSync { .. } => "CRDT_SYNC",
            Frame::CrdtFullSync { .. } => "CRDT_FULL_SYNC",
            Frame::CrdtRuns { .. } => "CRDT_RUNS",
            Frame::CrdtSyncMessage { .. } => "CRDT_SYNC_MESSAGE",
            Frame::Presence { .. } => "PRESENCE",
            Frame::RunTombstone { .. } => "RUN_TOMBSTONE",
            Frame::Error { .. } => "ERROR",
        }
    }

    pub fn encode(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(text: &str) -> Result<Frame, String> {
        serde_json::from_str(text).map_err(|e| {
            // Name the type when the JSON is otherwise fine, so the peer learns what we lack.
            if text.len() > 64 * 1024 {
                return format!("malformed frame: {e}");
            }
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v) => match v.get("type").and_then(|t| t.as_str()) {
                    Some(t) if !KNOWN.contains(&t) => format!("unknown message type {t:?}"),
                    _ => format!("malformed frame: {e}"),
                },
                Err(_) => format!("frame is not JSON: {e}"),
            }
        })
    }
}

const KNOWN: [&str; 9] = [
    "PRESENCE",
    "RUN_TOMBSTONE",
    "HELLO",
    "AUTH",
    "CRDT_SYNC",
    "CRDT_FULL_SYNC",
    "CRDT_RUNS",
    "CRDT_SYNC_MESSAGE",
    "ERROR",
];

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(field: &str, text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("{field} is not base64: {e}"))
}

/// A fresh random nonce (256 bits from two v4 UUIDs, hex).
pub fn nonce() -> String {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    format!("{}{}", a.simple(), b.simple())
}

/// Which end of a link a node is: the one that dialled, or the one that accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Acceptor,
}

impl Role {
    pub fn other(self) -> Role {
        match self {
            Role::Initiator => Role::Acceptor,
            Role::Acceptor => Role::Initiator,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::Initiator => "initiator",
            Role::Acceptor => "acceptor",
        }
    }
}

/// The two nonces of a link, by role.
#[derive(Debug, Clone, Copy)]
pub struct Nonces<'a> {
    pub initiator: &'a str,
    pub acceptor: &'a str,
}

fn mac(secret: &str, role: Role, nonces: Nonces<'_>, node_id: &str, region: &str) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    // Length-prefixed fields: no two different tuples hash the same bytes. The role is in the
    // MAC so a proof made on one link cannot be replayed by a relay as the other end's.
    let fields = [
        "crdt-mesh/1",
        role.label(),
        nonces.initiator,
        nonces.acceptor,
        node_id,
        region,
    ];
    for field in fields {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field.as_bytes());
    }
    mac
}

/// The proof a node in `role` gives on a link: over both nonces and its own identity.
pub fn prove(secret: &str, role: Role, nonces: Nonces<'_>, node_id: &str, region: &str) -> String {
    hex::encode(
        mac(secret, role, nonces, node_id, region)
            .finalize()
            .into_bytes(),
    )
}

/// Checks, in constant time, the proof of the node in `role` that claimed `node_id` and
/// `region` in its HELLO.
pub fn verify(
    secret: &str,
    proof: &str,
    role: Role,
    nonces: Nonces<'_>,
    node_id: &str,
    region: &str,
) -> bool {
    let Ok(bytes) = hex::decode(proof) else {
        return false;
    };
    mac(secret, role, nonces, node_id, region)
        .verify_slice(&bytes)
        .is_ok()
}

/// The header a dialling node proves itself with on the upgrade request: `<unix ms>.<hex
/// HMAC>`. It lets the socket skip the pool of unproven ones (a flood cannot keep a real peer
/// out); the handshake still authenticates the link, so a replayed header gains no more.
pub const UPGRADE_PROOF_HEADER: &str = "x-crdt-mesh-proof";
/// How far a proof's time may be from the receiver's clock.
pub const UPGRADE_PROOF_WINDOW_MS: u64 = 60_000;

fn upgrade_mac(secret: &str, at_ms: u64) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(b"crdt-mesh-upgrade/1");
    mac.update(&at_ms.to_be_bytes());
    mac
}

/// The upgrade proof at `at_ms` (ms since the Unix epoch).
pub fn prove_upgrade(secret: &str, at_ms: u64) -> String {
    let tag = upgrade_mac(secret, at_ms).finalize().into_bytes();
    format!("{at_ms}.{}", hex::encode(tag))
}

/// Whether `header` is an upgrade proof made with `secret` within the window of `now_ms`.
pub fn verify_upgrade(secret: &str, header: &str, now_ms: u64) -> bool {
    let Some((at, tag)) = header.split_once('.') else {
        return false;
    };
    let (Ok(at_ms), Ok(tag)) = (at.parse::<u64>(), hex::decode(tag)) else {
        return false;
    };
    at_ms.abs_diff(now_ms) <= UPGRADE_PROOF_WINDOW_MS
        && upgrade_mac(secret, at_ms).verify_slice(&tag).is_ok()
}

/// The length of a frame carrying `bytes` of Automerge data in base64, with room for the rest.
pub fn encoded_len(bytes: usize) -> usize {
    bytes.div_ceil(3) * 4 + 512
}

/// `CRDT_SYNC` frames carrying `changes` in order, each under `max_frame`. A single change
/// over the limit goes alone (and is refused by the sender's size check, with a log line).
pub fn change_frames(
    run: uuid::Uuid,
    region: &str,
    lamport: u64,
    changes: &[automerge::Change],
    max_frame: usize,
) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut batch: Vec<&automerge::Change> = Vec::new();
    let mut size = 0;
    let mut flush = |batch: &mut Vec<&automerge::Change>| {
        if !batch.is_empty() {
            frames.push(Frame::CrdtSync {
                run_id: run.to_string(),
                source_region: region.to_string(),
                changes: b64(&run_doc::concat_changes(batch.drain(..))),
                timestamp: lamport,
            });
        }
    };
    for change in changes {
        let len = change.raw_bytes().len();
        if !batch.is_empty() && encoded_len(size + len) > max_frame {
            flush(&mut batch);
            size = 0;
        }
        batch.push(change);
        size += len;
    }
    flush(&mut batch);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_frames_keep_their_field_names() {
        let f = Frame::CrdtSync {
            run_id: "r".into(),
            source_region: "us-east-1".into(),
            changes: "AA==".into(),
            timestamp: 7,
        };
        let v: serde_json::Value = serde_json::from_str(&f.encode()).unwrap();
        assert_eq!(v["type"], "CRDT_SYNC");
        assert_eq!(v["runId"], "r");
        assert_eq!(v["sourceRegion"], "us-east-1");
        assert_eq!(v["timestamp"], 7);
        let full = Frame::CrdtFullSync {
            run_id: "r".into(),
            source_region: "x".into(),
            state: "AA==".into(),
            timestamp: 1,
        };
        assert!(full.encode().contains("\"type\":\"CRDT_FULL_SYNC\""));
        assert!(full.encode().contains("\"state\":\"AA==\""));
        assert_eq!(Frame::decode(&full.encode()).unwrap(), full);
    }

    #[test]
    fn bad_frames_say_why() {
        assert!(Frame::decode("nonsense").unwrap_err().contains("not JSON"));
        assert!(Frame::decode(r#"{"type":"NOPE"}"#)
            .unwrap_err()
            .contains("unknown message type \"NOPE\""));
        assert!(Frame::decode(r#"{"type":"CRDT_SYNC","runId":1}"#)
            .unwrap_err()
            .contains("malformed"));
    }

    #[test]
    fn upgrade_proofs_bind_the_secret_and_a_time_window() {
        let now = 1_800_000_000_000;
        let proof = prove_upgrade("s3cret", now);
        assert!(verify_upgrade("s3cret", &proof, now + 1_000));
        assert!(!verify_upgrade("other", &proof, now));
        assert!(!verify_upgrade(
            "s3cret",
            &proof,
            now + UPGRADE_PROOF_WINDOW_MS + 1
        ));
        assert!(!verify_upgrade("s3cret", "garbage", now));
        let forged = format!("{}.{}", now + 1, proof.split_once('.').unwrap().1);
        assert!(!verify_upgrade("s3cret", &forged, now));
    }

    #[test]
    fn proofs_bind_secret_nonces_role_and_identity() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        let n = Nonces {
            initiator: &a,
            acceptor: &b,
        };
        let p = prove("s3cret", Role::Initiator, n, "node-b", "eu-central-1");
        assert!(verify(
            "s3cret",
            &p,
            Role::Initiator,
            n,
            "node-b",
            "eu-central-1"
        ));
        assert!(!verify(
            "wrong",
            &p,
            Role::Initiator,
            n,
            "node-b",
            "eu-central-1"
        ));
        let other = nonce();
        let swapped = Nonces {
            initiator: &other,
            acceptor: &b,
        };
        assert!(!verify(
            "s3cret",
            &p,
            Role::Initiator,
            swapped,
            "node-b",
            "eu-central-1"
        ));
        assert!(!verify(
            "s3cret",
            &p,
            Role::Initiator,
            n,
            "node-x",
            "eu-central-1"
        ));
        assert!(!verify(
            "s3cret",
            &p,
            Role::Initiator,
            n,
            "node-b",
            "us-east-1"
        ));
        assert!(!verify(
            "s3cret",
            "zz",
            Role::Initiator,
            n,
            "node-b",
            "eu-central-1"
        ));
        // An acceptor's proof relayed as an initiator's (the nonces swapped by the relay).
        let relayed = prove("s3cret", Role::Acceptor, n, "node-b", "eu-central-1");
        let mirrored = Nonces {
            initiator: &b,
            acceptor: &a,
        };
        assert!(!verify(
            "s3cret",
            &relayed,
            Role::Initiator,
            mirrored,
            "node-b",
            "eu-central-1"
        ));
        assert!(!verify(
            "s3cret",
            &relayed,
            Role::Initiator,
            n,
            "node-b",
            "eu-central-1"
        ));
    }
}

//! Pod-to-pod calls inside a region whose pods share one database: a pod that does not own a
//! run asks the owner to take one step of the run's work for it (a sync step with a peer,
//! changes from another region, the whole document), so that every door of every pod works
//! while only the owner holds the run.
//!
//! The caller keeps the per-peer sync state and sends it with each step, as the runtime's
//! `SyncStep` does in-process; the owner keeps nothing per caller. Bodies are CBOR; each call
//! carries a proof ([`prove`]): an HMAC of the region's cluster secret over the time, the path,
//! the body's length and digest, so only the region's pods can make one, none can be altered or
//! replayed after its window, and the receiver checks it before it reads the body.

use std::collections::BTreeSet;

use automerge::sync::{self, BloomFilter, Capability, Have};
use automerge::ChangeHash;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

/// The header that carries a call's proof: `<unix ms>.<hex HMAC>`.
pub const PROOF_HEADER: &str = "x-crdt-cluster-proof";
/// How far a proof's time may be from the receiver's clock.
pub const PROOF_WINDOW_MS: u64 = 30_000;
/// The largest call or reply body (a peer's sync message or a whole document).
pub const MAX_BODY: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a cluster message: {0}")]
    Malformed(String),
}

fn hashes(list: &[ChangeHash]) -> Vec<ByteBuf> {
    list.iter()
        .map(|h| ByteBuf::from(h.as_ref().to_vec()))
        .collect()
}

fn unhash(list: Vec<ByteBuf>) -> Result<Vec<ChangeHash>, WireError> {
    list.into_iter()
        .map(|b| {
            ChangeHash::try_from(b.as_slice())
                .map_err(|_| WireError::Malformed("a change hash is not 32 bytes".into()))
        })
        .collect()
}

/// A peer's whole sync state, as it travels with each step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncState {
    shared_heads: Vec<ByteBuf>,
    last_sent_heads: Vec<ByteBuf>,
    their_heads: Option<Vec<ByteBuf>>,
    their_need: Option<Vec<ByteBuf>>,
    /// (last sync heads, bloom filter bytes) per have.
    their_have: Option<Vec<(Vec<ByteBuf>, ByteBuf)>>,
    sent_hashes: Vec<ByteBuf>,
    in_flight: bool,
    have_responded: bool,
    /// 1: message v1, 2: message v2, 3: sync reset.
    their_capabilities: Option<Vec<u8>>,
    read_only: bool,
    peer_read_only: bool,
    needs_reset: bool,
}

impl From<&sync::State> for SyncState {
    fn from(s: &sync::State) -> Self {
        SyncState {
            shared_heads: hashes(&s.shared_heads),
            last_sent_heads: hashes(&s.last_sent_heads),
            their_heads: s.their_heads.as_deref().map(hashes),
            their_need: s.their_need.as_deref().map(hashes),
            their_have: s.their_have.as_ref().map(|haves| {
                haves
                    .iter()
                    .map(|h| (hashes(&h.last_sync), ByteBuf::from(h.bloom.to_bytes())))
                    .collect()
            }),
            sent_hashes: s
                .sent_hashes
                .iter()
                .map(|h| ByteBuf::from(h.as_ref().to_vec()))
                .collect(),
            in_flight: s.in_flight,
            have_responded: s.have_responded,
            their_capabilities: s.their_capabilities.as_ref().map(|caps| {
                caps.iter()
                    .map(|c| match c {
                        Capability::MessageV1 => 1,
                        Capability::MessageV2 => 2,
                        Capability::SyncReset => 3,
                    })
                    .collect()
            }),
            read_only: s.read_only,
            peer_read_only: s.peer_read_only,
            needs_reset: s.needs_reset,
        }
    }
}

impl SyncState {
    pub fn into_state(self) -> Result<sync::State, WireError> {
        let mut s = sync::State::new();
        s.shared_heads = unhash(self.shared_heads)?;
        s.last_sent_heads = unhash(self.last_sent_heads)?;
        s.their_heads = self.their_heads.map(unhash).transpose()?;
        s.their_need = self.their_need.map(unhash).transpose()?;
        s.their_have = self
            .their_have
            .map(|haves| {
                haves
                    .into_iter()
                    .map(|(last_sync, bloom)| {
                        Ok(Have {
                            last_sync: unhash(last_sync)?,
                            bloom: BloomFilter::try_from(bloom.as_slice()).map_err(|e| {
                                WireError::Malformed(format!("a bloom filter: {e}"))
                            })?,
                        })
                    })
                    .collect::<Result<Vec<_>, WireError>>()
            })
            .transpose()?;
        s.sent_hashes = unhash(self.sent_hashes)?
            .into_iter()
            .collect::<BTreeSet<_>>();
        s.in_flight = self.in_flight;
        s.have_responded = self.have_responded;
        s.their_capabilities = self
            .their_capabilities
            .map(|caps| {
                caps.into_iter()
                    .map(|c| match c {
                        1 => Ok(Capability::MessageV1),
                        2 => Ok(Capability::MessageV2),
                        3 => Ok(Capability::SyncReset),
                        other => Err(WireError::Malformed(format!("capability {other}"))),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        s.read_only = self.read_only;
        s.peer_read_only = self.peer_read_only;
        s.needs_reset = self.needs_reset;
        Ok(s)
    }
}

/// A step's messages as an optional byte string when there are none or one, the form every
/// earlier pod reads and writes, so pods of two versions keep stepping each other's runs
/// during a rolling update; several go as an array, which only pods of this version read (an
/// earlier one refuses the call as malformed and the client resyncs).
mod step_messages {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_bytes::ByteBuf;

    pub fn serialize<S: Serializer>(messages: &[ByteBuf], s: S) -> Result<S::Ok, S::Error> {
        match messages {
            [] => s.serialize_none(),
            [one] => s.serialize_some(one),
            several => several.serialize(s),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Several(Vec<ByteBuf>),
        One(ByteBuf),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ByteBuf>, D::Error> {
        Ok(match Option::<Form>::deserialize(d)? {
            None => Vec::new(),
            Some(Form::One(one)) => vec![one],
            Some(Form::Several(several)) => several,
        })
    }
}

/// A call to the run's owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Call {
    /// One step of the sync protocol with a peer of the caller's (a node of another region,
    /// or an automerge-repo client).
    SyncStep {
        state: Box<SyncState>,
        /// The peer's messages, taken in order (none: offer what it may lack). Written as pods
        /// before several messages per step wrote one (null or bytes) unless there are several.
        #[serde(with = "step_messages")]
        incoming: Vec<ByteBuf>,
        source_region: String,
        via: String,
        client: Option<String>,
        author: Option<String>,
    },
    /// Changes from another region (concatenated in the wire format).
    ApplyChanges {
        changes: ByteBuf,
        source_region: String,
        lamport: Option<u64>,
        via: Option<String>,
    },
    /// The whole durable document.
    FullDocument,
    /// Another region's decision about the run's deletion, which a peer node sent.
    Tombstone { decision: Decision, via: String },
    /// Every durable change the holder of `heads` lacks.
    ChangesSince { heads: Vec<ByteBuf> },
}

impl Call {
    pub fn changes_since(heads: &[ChangeHash]) -> Call {
        Call::ChangesSince {
            heads: hashes(heads),
        }
    }

    /// The heads of a `ChangesSince`.
    pub fn heads(heads: Vec<ByteBuf>) -> Result<Vec<ChangeHash>, WireError> {
        unhash(heads)
    }
}

/// A decision about a run's deletion (the runtime's `Tombstone`, less the run id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Decision {
    pub deleted: bool,
    pub decided_at: i64,
    pub region: String,
    pub by: Option<String>,
    pub purged: bool,
}

/// Why the owner did not do a call, as the runtime's `RunError` says it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Failure {
    Unavailable(String),
    Busy(String),
    /// The run was deleted: the decision.
    Deleted(Decision),
    NoSuchRun,
    /// The owner refused the input (the reason).
    Refused(String),
    /// The run moved on again: the caller asks the database who holds it now.
    Moved,
}

/// The owner's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    SyncStep {
        state: Box<SyncState>,
        outgoing: Option<ByteBuf>,
        applied: usize,
        lamport: u64,
        error: Option<String>,
        /// 1: too large, 2: malformed, 3: forbidden.
        bad_input: Option<u8>,
        incarnation: u64,
        stored: bool,
    },
    Applied {
        applied: usize,
        duplicates: usize,
        parked: usize,
        lamport: u64,
        heads: Vec<String>,
    },
    Document {
        bytes: ByteBuf,
        lamport: u64,
    },
    Changes {
        changes: ByteBuf,
        count: usize,
        heads: Vec<String>,
    },
    /// The decision in force after a `Tombstone` call.
    Decided(Decision),
    Failed(Failure),
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = ciborium::into_writer(value, &mut out);
    out
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    ciborium::from_reader(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

fn proof_mac(secret: &str, at_ms: u64, path: &str, len: u64, digest: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(b"crdt-cluster-call/2");
    mac.update(&at_ms.to_be_bytes());
    mac.update(&(path.len() as u64).to_be_bytes());
    mac.update(path.as_bytes());
    mac.update(&len.to_be_bytes());
    mac.update(digest);
    mac
}

/// The proof of a call to `path` with `body` at `at_ms` (ms since the Unix epoch):
/// `<at_ms>.<body length>.<hex SHA-256 of the body>.<hex HMAC>`. The HMAC covers the header's
/// own fields, so the receiver checks it before reading a byte of the body.
pub fn prove(secret: &str, at_ms: u64, path: &str, body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let len = body.len() as u64;
    let tag = proof_mac(secret, at_ms, path, len, &digest)
        .finalize()
        .into_bytes();
    format!("{at_ms}.{len}.{}.{}", hex::encode(digest), hex::encode(tag))
}

/// What a proof's header promises of the body it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promised {
    pub len: usize,
    digest: Vec<u8>,
}

impl Promised {
    /// Whether `body` is the body the proof was made for.
    pub fn matches(&self, body: &[u8]) -> bool {
        body.len() == self.len && Sha256::digest(body).as_slice() == self.digest.as_slice()
    }
}

/// Checks a proof's header alone (secret, time window, path): what it promises of the body,
/// or None.
pub fn check_header(secret: &str, header: &str, now_ms: u64, path: &str) -> Option<Promised> {
    let mut parts = header.split('.');
    let (at, len, digest, tag) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (at_ms, len) = (at.parse::<u64>().ok()?, len.parse::<u64>().ok()?);
    let (digest, tag) = (hex::decode(digest).ok()?, hex::decode(tag).ok()?);
    let fresh = at_ms.abs_diff(now_ms) <= PROOF_WINDOW_MS;
    let holds = proof_mac(secret, at_ms, path, len, &digest)
        .verify_slice(&tag)
        .is_ok();
    (fresh && holds && digest.len() == 32).then(|| Promised {
        len: usize::try_from(len).unwrap_or(usize::MAX),
        digest,
    })
}

/// Whether `header` proves a call to `path` with `body`, made with `secret` within the window.
pub fn verify(secret: &str, header: &str, now_ms: u64, path: &str, body: &[u8]) -> bool {
    check_header(secret, header, now_ms, path).is_some_and(|p| p.matches(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;

    /// A sync state mid-session: every field the protocol fills, set.
    fn busy_state() -> sync::State {
        let mut a = automerge::AutoCommit::new();
        let mut b = automerge::AutoCommit::new();
        for i in 0..20 {
            a.put(automerge::ROOT, format!("a{i}"), i).unwrap();
            b.put(automerge::ROOT, format!("b{i}"), i).unwrap();
        }
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let m = a.sync().generate_sync_message(&mut sa).unwrap();
        b.sync().receive_sync_message(&mut sb, m).unwrap();
        let m = b.sync().generate_sync_message(&mut sb).unwrap();
        a.sync().receive_sync_message(&mut sa, m).unwrap();
        let _ = a.sync().generate_sync_message(&mut sa);
        sa
    }

    #[test]
    fn a_sync_state_survives_the_trip() {
        let state = busy_state();
        assert!(state.their_have.is_some() && !state.sent_hashes.is_empty());
        let wire: SyncState = decode(&encode(&SyncState::from(&state))).unwrap();
        let back = wire.into_state().unwrap();
        assert_eq!(back.shared_heads, state.shared_heads);
        assert_eq!(back.last_sent_heads, state.last_sent_heads);
        assert_eq!(back.their_heads, state.their_heads);
        assert_eq!(back.their_need, state.their_need);
        assert_eq!(back.their_have, state.their_have);
        assert_eq!(back.sent_hashes, state.sent_hashes);
        assert_eq!(back.in_flight, state.in_flight);
        assert_eq!(back.have_responded, state.have_responded);
        assert_eq!(back.their_capabilities, state.their_capabilities);
    }

    #[test]
    fn calls_round_trip_and_garbage_is_refused() {
        let call = Call::SyncStep {
            state: Box::new(SyncState::from(&busy_state())),
            incoming: vec![ByteBuf::from(vec![1, 2, 3])],
            source_region: "eu".into(),
            via: "node-1".into(),
            client: None,
            author: Some("ana".into()),
        };
        let back: Call = decode(&encode(&call)).unwrap();
        assert!(
            matches!(back, Call::SyncStep { ref author, .. } if author.as_deref() == Some("ana"))
        );
        assert!(decode::<Call>(&[0xff, 0x00, 0x13]).is_err());
        let bad_hash = Call::ChangesSince {
            heads: vec![ByteBuf::from(vec![1; 31])],
        };
        let Call::ChangesSince { heads } = decode::<Call>(&encode(&bad_hash)).unwrap() else {
            unreachable!()
        };
        assert!(Call::heads(heads).is_err(), "a short hash is refused");
    }

    /// How a pod of the version before several messages per step wrote a sync step.
    #[derive(Serialize, Deserialize)]
    enum EarlierCall {
        SyncStep {
            state: Box<SyncState>,
            incoming: Option<ByteBuf>,
            source_region: String,
            via: String,
            client: Option<String>,
            author: Option<String>,
        },
    }

    fn step_with(incoming: Vec<ByteBuf>) -> Call {
        Call::SyncStep {
            state: Box::new(SyncState::from(&busy_state())),
            incoming,
            source_region: "eu".into(),
            via: "node-1".into(),
            client: None,
            author: None,
        }
    }

    fn earlier_step(incoming: Option<ByteBuf>) -> EarlierCall {
        EarlierCall::SyncStep {
            state: Box::new(SyncState::from(&busy_state())),
            incoming,
            source_region: "eu".into(),
            via: "node-1".into(),
            client: None,
            author: None,
        }
    }

    fn incoming_of(call: Call) -> Vec<ByteBuf> {
        match call {
            Call::SyncStep { incoming, .. } => incoming,
            _ => unreachable!(),
        }
    }

    #[test]
    fn sync_steps_stay_readable_across_one_version_both_ways() {
        let one = ByteBuf::from(vec![1, 2, 3]);
        let two = ByteBuf::from(vec![4, 5]);
        // From an earlier pod: none, or one message.
        for incoming in [None, Some(one.clone())] {
            let read: Call = decode(&encode(&earlier_step(incoming.clone()))).unwrap();
            assert_eq!(incoming_of(read), incoming.into_iter().collect::<Vec<_>>());
        }
        // To an earlier pod: none or one message read as before; several refused, not misread.
        for incoming in [vec![], vec![one.clone()]] {
            let bytes = encode(&step_with(incoming.clone()));
            let EarlierCall::SyncStep { incoming: read, .. } = decode(&bytes).unwrap();
            assert_eq!(read.into_iter().collect::<Vec<_>>(), incoming);
        }
        let several = encode(&step_with(vec![one.clone(), two.clone()]));
        assert!(decode::<EarlierCall>(&several).is_err());
        // Between pods of this version, several in order.
        assert_eq!(incoming_of(decode(&several).unwrap()), vec![one, two]);
    }

    #[test]
    fn proofs_bind_the_secret_time_path_and_body() {
        let p = prove("s3cret", 1_000_000, "/internal/runs/x", b"body");
        assert!(verify("s3cret", &p, 1_000_500, "/internal/runs/x", b"body"));
        assert!(!verify("other", &p, 1_000_500, "/internal/runs/x", b"body"));
        assert!(!verify(
            "s3cret",
            &p,
            1_000_500,
            "/internal/runs/y",
            b"body"
        ));
        assert!(!verify(
            "s3cret",
            &p,
            1_000_500,
            "/internal/runs/x",
            b"bodY"
        ));
        assert!(!verify(
            "s3cret",
            &p,
            1_000_000 + PROOF_WINDOW_MS + 1,
            "/internal/runs/x",
            b"body"
        ));
        assert!(!verify(
            "s3cret",
            "garbage",
            1_000_000,
            "/internal/runs/x",
            b"body"
        ));
    }
}

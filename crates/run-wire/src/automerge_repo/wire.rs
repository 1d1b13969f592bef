//! automerge-repo's wire protocol over WebSocket: one CBOR map per binary frame, as
//! `@automerge/automerge-repo-network-websocket` writes them (cbor-x, byte strings for
//! `data`, no records, no tags).
//!
//! Client → server: `join` (peer id, supported protocol versions, metadata), then `request`
//! (the client lacks the document) / `sync` (it has it), both carrying an Automerge sync
//! message in `data`; `ephemeral` (opaque `data` for the document's other peers, with the
//! sender's `sessionId` and `count`); `doc-unavailable`; `leave`. Server → client: `peer` (the
//! selected version, "1"), `error` (then a close), `sync`, `doc-unavailable`, `ephemeral`.
//! Unknown fields are ignored and unknown message types are skipped, as the JS peers do.

use serde::{Deserialize, Serialize};

/// The one protocol version automerge-repo speaks today.
pub const PROTOCOL_V1: &str = "1";
/// Longest peer id, document id or session id accepted (JS peer ids are ~20 characters).
const MAX_ID: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("not a CBOR message: {0}")]
    NotCbor(String),
    #[error("a {kind} message lacks {field}")]
    Missing { kind: String, field: &'static str },
    #[error("{field} is longer than {MAX_ID} characters")]
    TooLong { field: &'static str },
    #[error("a {0} message carries empty data")]
    EmptyData(String),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_ephemeral: Option<bool>,
}

/// Every field any message has: decoded once, then checked per type.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sender_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    document_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    supported_protocol_versions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    selected_protocol_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    peer_metadata: Option<PeerMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// `data` is a CBOR byte string; serde_bytes reads and writes it as one.
mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::ByteBuf;

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_bytes(b),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<ByteBuf>::deserialize(d)?.map(ByteBuf::into_vec))
    }
}

/// Whether a client has the document (`sync`) or asks for it (`request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    Sync,
    Request,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FromClient {
    Join {
        sender_id: String,
        /// `None` when the client sent no list (old clients): protocol "1" is assumed.
        versions: Option<Vec<String>>,
        metadata: PeerMetadata,
    },
    Leave {
        sender_id: String,
    },
    Sync {
        kind: SyncKind,
        sender_id: String,
        document_id: String,
        data: Vec<u8>,
    },
    Ephemeral(Ephemeral),
    DocUnavailable {
        sender_id: String,
        document_id: String,
    },
    /// A type this node does not act on (`remote-subscription-change`, newer ones).
    Other {
        kind: String,
        sender_id: String,
    },
}

/// An ephemeral message: relayed as it came, only its target changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Ephemeral {
    pub sender_id: String,
    pub document_id: String,
    pub data: Vec<u8>,
    pub count: u64,
    pub session_id: String,
}

impl FromClient {
    pub fn kind(&self) -> &str {
        match self {
            FromClient::Join { .. } => "join",
            FromClient::Leave { .. } => "leave",
            FromClient::Sync {
                kind: SyncKind::Sync,
                ..
            } => "sync",
            FromClient::Sync {
                kind: SyncKind::Request,
                ..
            } => "request",
            FromClient::Ephemeral(_) => "ephemeral",
            FromClient::DocUnavailable { .. } => "doc-unavailable",
            FromClient::Other { .. } => "other",
        }
    }

    pub fn sender_id(&self) -> &str {
        match self {
            FromClient::Join { sender_id, .. }
            | FromClient::Leave { sender_id }
            | FromClient::Sync { sender_id, .. }
            | FromClient::DocUnavailable { sender_id, .. }
            | FromClient::Other { sender_id, .. } => sender_id,
            FromClient::Ephemeral(e) => &e.sender_id,
        }
    }
}

fn need<T>(v: Option<T>, kind: &str, field: &'static str) -> Result<T, WireError> {
    v.ok_or_else(|| WireError::Missing {
        kind: kind.to_string(),
        field,
    })
}

fn id(v: Option<String>, kind: &str, field: &'static str) -> Result<String, WireError> {
    let v = need(v, kind, field)?;
    if v.len() > MAX_ID {
        return Err(WireError::TooLong { field });
    }
    if v.is_empty() {
        return Err(WireError::Missing {
            kind: kind.to_string(),
            field,
        });
    }
    Ok(v)
}

/// Reads one client message.
pub fn decode(bytes: &[u8]) -> Result<FromClient, WireError> {
    let raw: Raw = ciborium::from_reader(bytes).map_err(|e| WireError::NotCbor(e.to_string()))?;
    let kind = raw.kind.as_str();
    let sender_id = id(raw.sender_id, kind, "senderId")?;
    Ok(match kind {
        "join" => FromClient::Join {
            sender_id,
            versions: raw.supported_protocol_versions,
            metadata: raw.peer_metadata.unwrap_or_default(),
        },
        "leave" => FromClient::Leave { sender_id },
        "sync" | "request" => {
            let data = need(raw.data, kind, "data")?;
            if data.is_empty() {
                return Err(WireError::EmptyData(kind.to_string()));
            }
            FromClient::Sync {
                kind: if kind == "sync" {
                    SyncKind::Sync
                } else {
                    SyncKind::Request
                },
                sender_id,
                document_id: id(raw.document_id, kind, "documentId")?,
                data,
            }
        }
        "ephemeral" => FromClient::Ephemeral(Ephemeral {
            sender_id,
            document_id: id(raw.document_id, kind, "documentId")?,
            data: need(raw.data, kind, "data")?,
            count: need(raw.count, kind, "count")?,
            session_id: id(raw.session_id, kind, "sessionId")?,
        }),
        "doc-unavailable" => FromClient::DocUnavailable {
            sender_id,
            document_id: id(raw.document_id, kind, "documentId")?,
        },
        other => FromClient::Other {
            kind: other.chars().take(64).collect(),
            sender_id,
        },
    })
}

/// What the server sends; `sender_id` is the server's peer id, save for relayed ephemerals.
pub enum ToClient<'a> {
    Peer {
        sender_id: &'a str,
        target_id: &'a str,
    },
    Error {
        sender_id: &'a str,
        target_id: &'a str,
        message: &'a str,
    },
    Sync {
        sender_id: &'a str,
        target_id: &'a str,
        document_id: &'a str,
        data: Vec<u8>,
    },
    DocUnavailable {
        sender_id: &'a str,
        target_id: &'a str,
        document_id: &'a str,
    },
    Ephemeral {
        message: &'a Ephemeral,
        target_id: &'a str,
    },
}

impl ToClient<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            ToClient::Peer { .. } => "peer",
            ToClient::Error { .. } => "error",
            ToClient::Sync { .. } => "sync",
            ToClient::DocUnavailable { .. } => "doc-unavailable",
            ToClient::Ephemeral { .. } => "ephemeral",
        }
    }

    pub fn encode(self) -> Vec<u8> {
        let kind = self.kind().to_string();
        let s = |v: &str| Some(v.to_string());
        let raw = match self {
            ToClient::Peer {
                sender_id,
                target_id,
            } => Raw {
                kind,
                sender_id: s(sender_id),
                target_id: s(target_id),
                selected_protocol_version: s(PROTOCOL_V1),
                // Not ephemeral, but no storage id: clients then keep no sync state for this
                // server across connections (the server keeps none either).
                peer_metadata: Some(PeerMetadata {
                    storage_id: None,
                    is_ephemeral: Some(false),
                }),
                ..Raw::default()
            },
            ToClient::Error {
                sender_id,
                target_id,
                message,
            } => Raw {
                kind,
                sender_id: s(sender_id),
                target_id: s(target_id),
                message: s(message),
                ..Raw::default()
            },
            ToClient::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            } => Raw {
                kind,
                sender_id: s(sender_id),
                target_id: s(target_id),
                document_id: s(document_id),
                data: Some(data),
                ..Raw::default()
            },
            ToClient::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            } => Raw {
                kind,
                sender_id: s(sender_id),
                target_id: s(target_id),
                document_id: s(document_id),
                ..Raw::default()
            },
            ToClient::Ephemeral { message, target_id } => Raw {
                kind,
                sender_id: s(&message.sender_id),
                target_id: s(target_id),
                document_id: s(&message.document_id),
                data: Some(message.data.clone()),
                count: Some(message.count),
                session_id: s(&message.session_id),
                ..Raw::default()
            },
        };
        let mut out = Vec::with_capacity(64 + raw.data.as_ref().map_or(0, Vec::len));
        // Writing to a Vec cannot fail, and every field serializes.
        ciborium::into_writer(&raw, &mut out).expect("encoding a message into memory");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value;

    fn cbor(v: Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(&v, &mut out).unwrap();
        out
    }

    fn map(fields: Vec<(&str, Value)>) -> Value {
        Value::Map(
            fields
                .into_iter()
                .map(|(k, v)| (Value::Text(k.into()), v))
                .collect(),
        )
    }

    #[test]
    fn reads_a_join_as_the_js_client_writes_it() {
        let join = cbor(map(vec![
            ("type", Value::Text("join".into())),
            ("senderId", Value::Text("peer-abc".into())),
            (
                "peerMetadata",
                map(vec![("isEphemeral", Value::Bool(true))]),
            ),
            (
                "supportedProtocolVersions",
                Value::Array(vec![Value::Text("1".into())]),
            ),
            ("somethingNew", Value::Integer(3.into())),
        ]));
        assert_eq!(
            decode(&join),
            Ok(FromClient::Join {
                sender_id: "peer-abc".into(),
                versions: Some(vec!["1".into()]),
                metadata: PeerMetadata {
                    storage_id: None,
                    is_ephemeral: Some(true)
                },
            })
        );
    }

    #[test]
    fn reads_sync_request_and_ephemeral() {
        let sync = |kind: &str| {
            cbor(map(vec![
                ("type", Value::Text(kind.into())),
                ("senderId", Value::Text("p".into())),
                ("targetId", Value::Text("server".into())),
                ("documentId", Value::Text("doc".into())),
                ("data", Value::Bytes(vec![0x42, 1, 2])),
            ]))
        };
        match decode(&sync("request")).unwrap() {
            FromClient::Sync { kind, data, .. } => {
                assert_eq!(kind, SyncKind::Request);
                assert_eq!(data, vec![0x42, 1, 2]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode(&sync("sync")).unwrap().kind(), "sync");
        let eph = cbor(map(vec![
            ("type", Value::Text("ephemeral".into())),
            ("senderId", Value::Text("p".into())),
            ("documentId", Value::Text("doc".into())),
            ("data", Value::Bytes(vec![9])),
            ("count", Value::Integer(7.into())),
            ("sessionId", Value::Text("s1".into())),
        ]));
        match decode(&eph).unwrap() {
            FromClient::Ephemeral(e) => assert_eq!((e.count, e.session_id.as_str()), (7, "s1")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_what_is_wrong() {
        let cases = [
            (b"\xff\x00garbage".to_vec(), "not a CBOR message"),
            (cbor(Value::Text("join".into())), "not a CBOR message"),
            (
                cbor(map(vec![("type", Value::Text("join".into()))])),
                "lacks senderId",
            ),
            (
                cbor(map(vec![
                    ("type", Value::Text("sync".into())),
                    ("senderId", Value::Text("p".into())),
                    ("data", Value::Bytes(vec![1])),
                ])),
                "lacks documentId",
            ),
            (
                cbor(map(vec![
                    ("type", Value::Text("sync".into())),
                    ("senderId", Value::Text("p".into())),
                    ("documentId", Value::Text("d".into())),
                    ("data", Value::Bytes(vec![])),
                ])),
                "empty data",
            ),
            (
                cbor(map(vec![
                    ("type", Value::Text("join".into())),
                    ("senderId", Value::Text("x".repeat(300))),
                ])),
                "longer than",
            ),
        ];
        for (bytes, expect) in cases {
            let err = decode(&bytes).unwrap_err().to_string();
            assert!(err.contains(expect), "{expect}: {err}");
        }
    }

    #[test]
    fn writes_data_as_a_byte_string_and_omits_absent_fields() {
        let bytes = ToClient::Sync {
            sender_id: "server",
            target_id: "p",
            document_id: "doc",
            data: vec![1, 2, 3],
        }
        .encode();
        let v: Value = ciborium::from_reader(bytes.as_slice()).unwrap();
        let fields = v.as_map().unwrap();
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key.as_text() == Some(k))
                .map(|(_, v)| v)
        };
        assert_eq!(get("data"), Some(&Value::Bytes(vec![1, 2, 3])));
        assert_eq!(get("type"), Some(&Value::Text("sync".into())));
        assert_eq!(get("count"), None);
        assert_eq!(fields.len(), 5);
        let peer: Value = ciborium::from_reader(
            ToClient::Peer {
                sender_id: "server",
                target_id: "p",
            }
            .encode()
            .as_slice(),
        )
        .unwrap();
        let text = format!("{peer:?}");
        assert!(
            text.contains("selectedProtocolVersion") && text.contains("isEphemeral"),
            "{text}"
        );
    }
}

//! A raw automerge-repo client (CBOR messages over a WebSocket), for tests and benchmarks
//! that speak the protocol byte by byte.

use std::time::Duration;

use automerge::sync::{self, SyncDoc};
use automerge::AutoCommit;
use ciborium::Value as Cbor;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::mesh::Ws;
use crate::Node;

/// A run's automerge-repo document id (bs58check of its UUID's bytes).
pub fn doc_id(run: Uuid) -> String {
    bs58::encode(run.as_bytes()).with_check().into_string()
}

pub fn cbor(fields: Vec<(&str, Cbor)>) -> Vec<u8> {
    let map = Cbor::Map(
        fields
            .into_iter()
            .map(|(k, v)| (Cbor::Text(k.into()), v))
            .collect(),
    );
    let mut out = Vec::new();
    ciborium::into_writer(&map, &mut out).expect("CBOR");
    out
}

pub fn text(s: &str) -> Cbor {
    Cbor::Text(s.into())
}

/// A raw automerge-repo client.
pub struct Peer {
    pub ws: Ws,
    pub id: String,
}

impl Peer {
    pub async fn connect(node: &Node, query: &str, id: &str) -> Peer {
        let url = node
            .url(&format!("/ws/automerge{query}"))
            .replace("http://", "ws://");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        Peer { ws, id: id.into() }
    }

    /// Connects and joins; returns after the node's `peer`.
    pub async fn joined(node: &Node, id: &str) -> Peer {
        let mut p = Self::connect(node, "", id).await;
        p.join(&["1"]).await;
        let peer = p.next().await;
        assert_eq!(field(&peer, "type"), Some(text("peer")));
        assert_eq!(field(&peer, "selectedProtocolVersion"), Some(text("1")));
        assert_eq!(field(&peer, "targetId"), Some(text(id)));
        p
    }

    pub async fn join(&mut self, versions: &[&str]) {
        let join = join_message(&self.id, versions);
        self.send(join).await;
    }

    pub async fn send(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).await.unwrap();
    }

    pub async fn sync(&mut self, kind: &str, doc: &str, message: sync::Message) {
        let bytes = sync_message(kind, &self.id, "server", doc, message.encode());
        self.send(bytes).await;
    }

    /// The next message (pings skipped).
    pub async fn next(&mut self) -> Cbor {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    return ciborium::from_reader(b.as_ref()).expect("CBOR from the node")
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// The `error` message, then the close code.
    pub async fn refused(&mut self) -> (String, u16) {
        let error = self.next().await;
        assert_eq!(field(&error, "type"), Some(text("error")), "{error:?}");
        let message = match field(&error, "message") {
            Some(Cbor::Text(m)) => m,
            other => panic!("error without a message: {other:?}"),
        };
        (message, self.closed().await)
    }

    pub async fn closed(&mut self) -> u16 {
        self.closed_with_reason().await.0
    }

    /// The close code and reason (pings and other messages skipped).
    pub async fn closed_with_reason(&mut self) -> (u16, String) {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) => return (1005, String::new()),
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close, got {other:?}"),
            }
        }
    }

    /// An `ephemeral` message (presence, cursors) for `doc`.
    pub async fn ephemeral(&mut self, doc: &str, count: u64, data: Vec<u8>) {
        let id = self.id.clone();
        self.send(cbor(vec![
            ("type", text("ephemeral")),
            ("senderId", text(&id)),
            ("targetId", text("server")),
            ("documentId", text(doc)),
            ("sessionId", text(&format!("{id}-session"))),
            ("count", Cbor::Integer(count.into())),
            ("data", Cbor::Bytes(data)),
        ]))
        .await;
    }

    /// Syncs `doc` with the node until the node has nothing more to say.
    pub async fn sync_until_quiet(&mut self, doc_id: &str, doc: &mut AutoCommit) {
        self.sync_until_quiet_with(doc_id, doc, &mut sync::State::new())
            .await
    }

    /// [`Peer::sync_until_quiet`] with a sync state the caller keeps (as a client keeps one
    /// per peer, so its later messages carry its changes at once).
    pub async fn sync_until_quiet_with(
        &mut self,
        doc_id: &str,
        doc: &mut AutoCommit,
        state: &mut sync::State,
    ) {
        if let Some(m) = doc.sync().generate_sync_message(state) {
            self.sync("sync", doc_id, m).await;
        }
        loop {
            let next = tokio::time::timeout(Duration::from_millis(1500), self.next()).await;
            let Ok(message) = next else { return };
            assert_eq!(field(&message, "type"), Some(text("sync")), "{message:?}");
            let Some(Cbor::Bytes(data)) = field(&message, "data") else {
                panic!("sync without data: {message:?}")
            };
            let m = sync::Message::decode(&data).unwrap();
            doc.sync().receive_sync_message(state, m).unwrap();
            if let Some(reply) = doc.sync().generate_sync_message(state) {
                self.sync("sync", doc_id, reply).await;
            }
        }
    }
}

pub fn field(message: &Cbor, name: &str) -> Option<Cbor> {
    field_ref(message, name).cloned()
}

/// A field of a message, read in place (a large `data` is not copied to be looked at).
pub fn field_ref<'a>(message: &'a Cbor, name: &str) -> Option<&'a Cbor> {
    message
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(name))
        .map(|(_, v)| v)
}

/// A `join` message from `sender`, offering protocol `versions`.
pub fn join_message(sender: &str, versions: &[&str]) -> Vec<u8> {
    cbor(vec![
        ("type", text("join")),
        ("senderId", text(sender)),
        ("peerMetadata", Cbor::Map(vec![])),
        (
            "supportedProtocolVersions",
            Cbor::Array(versions.iter().map(|v| text(v)).collect()),
        ),
    ])
}

/// A `sync` or `request` message (`kind`) carrying an encoded sync message for `doc`.
pub fn sync_message(kind: &str, sender: &str, target: &str, doc: &str, data: Vec<u8>) -> Vec<u8> {
    cbor(vec![
        ("type", text(kind)),
        ("senderId", text(sender)),
        ("targetId", text(target)),
        ("documentId", text(doc)),
        ("data", Cbor::Bytes(data)),
    ])
}

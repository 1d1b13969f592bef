//! automerge-repo's protocol at `/ws/automerge`, driven byte by byte against a real node: the
//! handshake and its refusals, every malformed message, a second join with the same peer id,
//! doc-unavailable (and the push once the run exists), and an answered sync that survives
//! SIGKILL. The end-to-end behaviour with the real JS clients is in e2e/tests/.

use test_support as common;
use test_support::both_backends;

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc, ROOT};
use ciborium::Value as Cbor;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::repo::{cbor, doc_id, field, text, Peer};
use common::{run_url, Backend, Client, Node, TestDb};

async fn make_run(c: &Client, node: &Node, agent: &str) -> Uuid {
    let run = Uuid::new_v4();
    let (s, body) = c
        .post(
            &run_url(node, run, "/grafts"),
            &json!({"agent": agent, "afterStep": "S", "user": "api"}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    run
}

/// Messages a joined client may not send, and what the refusal must say.
fn malformed_messages(
    run: Uuid,
    ask: &sync::Message,
) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    vec![
        (
            "not CBOR",
            b"\xff\xfe garbage".to_vec(),
            "not a CBOR message",
        ),
        (
            "no documentId",
            cbor(vec![
                ("type", text("sync")),
                ("senderId", text("p")),
                ("data", Cbor::Bytes(vec![1])),
            ]),
            "lacks documentId",
        ),
        (
            "another sender",
            cbor(vec![
                ("type", text("sync")),
                ("senderId", text("q")),
                ("documentId", text(&doc_id(run))),
                ("data", Cbor::Bytes(vec![1])),
            ]),
            "is not the peer that joined",
        ),
        (
            "malformed document id",
            cbor(vec![
                ("type", text("request")),
                ("senderId", text("p")),
                ("documentId", text("notbs58check")),
                ("data", Cbor::Bytes(ask.clone().encode())),
            ]),
            "not bs58check",
        ),
        (
            "data that is not a sync message",
            cbor(vec![
                ("type", text("sync")),
                ("senderId", text("p")),
                ("documentId", text(&doc_id(run))),
                ("data", Cbor::Bytes(vec![0x99, 1, 2])),
            ]),
            "not an Automerge sync message",
        ),
        (
            "a second join",
            cbor(vec![("type", text("join")), ("senderId", text("p"))]),
            "joined twice",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_and_malformed_messages_say_why_and_close() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = make_run(&c, &node, "A").await;
    let ask = AutoCommit::new()
        .sync()
        .generate_sync_message(&mut sync::State::new())
        .unwrap();

    let mut p = Peer::connect(&node, "", "p").await;
    p.join(&["2", "3"]).await;
    let (message, code) = p.refused().await;
    assert!(
        message.contains("unsupported protocol version"),
        "{message}"
    );
    assert_eq!(code, 4002);

    let mut p = Peer::connect(&node, "", "p").await;
    p.sync("sync", &doc_id(run), ask.clone()).await;
    let (message, code) = p.refused().await;
    assert!(message.contains("before join"), "{message}");
    assert_eq!(code, 4002);

    let cases = malformed_messages(run, &ask);
    for (what, bytes, expect) in cases {
        let mut p = Peer::joined(&node, "p").await;
        p.send(bytes).await;
        let (message, code) = p.refused().await;
        assert!(message.contains(expect), "{what}: {message}");
        assert_eq!(code, 4002, "{what}");
    }
    let mut p = Peer::joined(&node, "p").await;
    p.ws.send(Message::text("{}")).await.unwrap();
    let (message, _) = p.refused().await;
    assert!(message.contains("binary frames"), "{message}");

    // The node kept serving, and the run is untouched.
    let (s, st) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!((s, st["grafts"].as_array().map(Vec::len)), (200, Some(1)));
    let (s, mapped) = c
        .get(&node.url(&format!("/api/crdt/documents/automerge:{}", doc_id(run))))
        .await;
    assert_eq!(
        (s, mapped["runId"].as_str()),
        (200, Some(run.to_string().as_str()))
    );
    let (s, bad) = c.get(&node.url("/api/crdt/documents/xyz")).await;
    assert_eq!(s, 400, "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_asked_for_in_the_url() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[("CRDT_API_TOKEN", "t0ken")]);
    let mut p = Peer::connect(&node, "?token=wrong", "p").await;
    p.join(&["1"]).await;
    let (message, code) = p.refused().await;
    assert!(message.contains("API token"), "{message}");
    assert_eq!(code, 4001);
    // A malformed token query upgrades and is refused in the protocol, as every refusal is
    // (a 400 at the upgrade crashes the JS client).
    for (query, why) in [
        ("?token=t0ken&token=t0ken", "more than once"),
        ("?token=", "empty"),
    ] {
        let mut p = Peer::connect(&node, query, "p").await;
        p.join(&["1"]).await;
        let (message, code) = p.refused().await;
        assert!(message.contains(why), "{query}: {message}");
        assert_eq!(code, 4001, "{query}");
    }
    let mut p = Peer::connect(&node, "?token=t0ken", "p").await;
    p.join(&["1"]).await;
    assert_eq!(field(&p.next().await, "type"), Some(text("peer")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_join_with_the_same_peer_id_replaces_the_first_connection() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = make_run(&c, &node, "A").await;
    let mut first = Peer::joined(&node, "same-peer").await;
    let mut second = Peer::joined(&node, "same-peer").await;
    assert_eq!(first.closed().await, 4010);
    // The new connection syncs from scratch (a sync state of its own).
    let mut doc = AutoCommit::new();
    second.sync_until_quiet(&doc_id(run), &mut doc).await;
    let grafts = doc.get(ROOT, "grafts").unwrap().unwrap().1;
    assert_eq!(doc.length(&grafts), 1);
}

/// Issue 19: an app can start a run on its own. A client that asks for a run nobody has
/// written is offered the run's genesis (nothing is stored for that), and its first change on
/// top of it creates the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritten_run_is_offered_its_genesis_and_created_by_a_clients_write() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = Uuid::new_v4();
    let mut p = Peer::joined(&node, "p").await;
    let mut doc = AutoCommit::new();
    p.sync_until_quiet(&doc_id(run), &mut doc).await;
    let grafts = doc.get(ROOT, "grafts").unwrap().expect("the genesis").1;
    assert_eq!(doc.length(&grafts), 0);
    assert_eq!(
        common::db::event_rows(&db, run).await,
        0,
        "reading stores nothing"
    );
    // The client's first change creates the run.
    let g = doc
        .insert_object(&grafts, 0, automerge::ObjType::Map)
        .unwrap();
    for (k, v) in [
        ("id", "g1"),
        ("agent", "FromApp"),
        ("afterStep", "S"),
        ("user", "app"),
    ] {
        doc.put(&g, k, v).unwrap();
    }
    doc.put(&g, "region", "client").unwrap();
    doc.put(&g, "lamport", 1).unwrap();
    doc.put(&g, "createdAt", "2026-12-06T00:00:00Z").unwrap();
    doc.commit();
    p.sync_until_quiet(&doc_id(run), &mut doc).await;
    let (s, st) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(s, 200);
    assert_eq!(st["grafts"][0]["agent"], "FromApp", "{st}");
    assert_eq!(common::db::event_rows(&db, run).await, 1);
}

/// A sync the node answered is durable: the node is killed right after and still has it.
async fn an_answered_client_change_survives_sigkill(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = make_run(&c, &node, "A").await;
    let mut p = Peer::joined(&node, "writer").await;
    let mut doc = AutoCommit::new();
    p.sync_until_quiet(&doc_id(run), &mut doc).await;
    let flags = doc.get(ROOT, "flags").unwrap().unwrap().1;
    doc.put(&flags, "fromClient", "yes").unwrap();
    doc.commit();
    // One round: our change goes out; the node's answer comes only once it is committed.
    let mut state = sync::State::new();
    let hello = doc.sync().generate_sync_message(&mut state).unwrap();
    p.sync("sync", &doc_id(run), hello).await;
    until_answered(&mut p, run, &mut doc, &mut state).await;
    node.kill();
    let node = Node::spawn(&db, &[]);
    let (_, st) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(st["flags"]["fromClient"], "yes", "{st}");
    let rows: i64 = common::db::event_rows(&db, run).await;
    assert_eq!(rows, 2);
}

/// Takes the node's sync messages (answering them) until its heads are the client's: the node
/// answers with heads that include a change only once the change is committed.
async fn until_answered(p: &mut Peer, run: Uuid, doc: &mut AutoCommit, state: &mut sync::State) {
    let mut answered = false;
    while !answered {
        let m = p.next().await;
        let Some(Cbor::Bytes(data)) = field(&m, "data") else {
            panic!("{m:?}")
        };
        doc.sync()
            .receive_sync_message(state, sync::Message::decode(&data).unwrap())
            .unwrap();
        answered = state
            .their_heads
            .as_ref()
            .is_some_and(|h| *h == doc.get_heads());
        if let Some(reply) = doc.sync().generate_sync_message(state) {
            p.sync("sync", &doc_id(run), reply).await;
        }
    }
}

/// A client writing faster than the node commits: thirty changes, each sent in a sync message
/// of its own at once, without waiting for answers. The node takes what waited in one step
/// (each message still judged on its own); every change is logged: after SIGKILL the restarted
/// node holds all thirty, one event each.
async fn a_burst_of_client_changes_is_logged_whole(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = make_run(&c, &node, "A").await;
    let mut p = Peer::joined(&node, "writer").await;
    let mut doc = AutoCommit::new();
    // One sync state throughout, as a client keeps: each message then carries its change.
    let mut state = sync::State::new();
    p.sync_until_quiet_with(&doc_id(run), &mut doc, &mut state)
        .await;
    let flags = doc.get(ROOT, "flags").unwrap().unwrap().1;
    for i in 0..30 {
        doc.put(&flags, format!("burst{i}"), i).unwrap();
        doc.commit();
        if let Some(m) = doc.sync().generate_sync_message(&mut state) {
            p.sync("sync", &doc_id(run), m).await;
        }
    }
    let answered = tokio::spawn(async move {
        until_answered(&mut p, run, &mut doc, &mut state).await;
    });
    assert!(answered.await.is_ok(), "not answered:\n{}", node.log_text());
    node.kill();
    let node = Node::spawn(&db, &[]);
    let (_, st) = c.get(&run_url(&node, run, "/state")).await;
    for i in 0..30 {
        assert_eq!(st["flags"][format!("burst{i}")], i, "{st}");
    }
    assert_eq!(common::db::event_rows(&db, run).await, 31);
}

both_backends!(
    an_answered_client_change_survives_sigkill,
    a_burst_of_client_changes_is_logged_whole
);

/// A client's own document under a run's id (`repo.create()`) is not the run: the node asks
/// for it, refuses it, says `doc-unavailable` without offering the run's genesis, and the
/// connection goes on serving the client's other documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_document_is_refused_alone() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = make_run(&c, &node, "A").await;
    let mut p = Peer::joined(&node, "p").await;
    let mut own = AutoCommit::new();
    own.put(ROOT, "title", "mine").unwrap();
    own.commit();
    let stranger = Uuid::new_v4();
    let mut state = sync::State::new();
    let hello = own.sync().generate_sync_message(&mut state).unwrap();
    p.sync("sync", &doc_id(stranger), hello).await;
    let mut unavailable = false;
    while !unavailable {
        let m = p.next().await;
        match field(&m, "type") {
            Some(Cbor::Text(t)) if t == "doc-unavailable" => unavailable = true,
            Some(Cbor::Text(t)) if t == "sync" => {
                let Some(Cbor::Bytes(data)) = field(&m, "data") else {
                    panic!("{m:?}")
                };
                let msg = sync::Message::decode(&data).unwrap();
                assert!(msg.changes.is_empty(), "the run's genesis was offered");
                own.sync().receive_sync_message(&mut state, msg).unwrap();
                if let Some(reply) = own.sync().generate_sync_message(&mut state) {
                    p.sync("sync", &doc_id(stranger), reply).await;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(own.get(ROOT, "grafts").unwrap(), None);
    // The same connection still syncs a real run.
    let mut doc = AutoCommit::new();
    p.sync_until_quiet(&doc_id(run), &mut doc).await;
    let grafts = doc.get(ROOT, "grafts").unwrap().unwrap().1;
    assert_eq!(doc.length(&grafts), 1);
    let (_, st) = c.get(&run_url(&node, stranger, "/state")).await;
    assert_eq!(st["grafts"], json!([]));
}

/// Issue 12: outside bytes never reach Automerge's loader unchecked. A 372-byte message (a
/// valid document, then a chunk the loader allocates gigabytes for) and an op bomb (one
/// compressed change of a few KB inserting 150,000 characters) are each refused with the
/// reason and a close; the node stays small and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loader_and_op_bombs_are_refused_before_automerge_reads_them() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = make_run(&c, &node, "A").await;
    let (_, before) = c.get(&run_url(&node, run, "/state")).await;
    let cases = [
        (
            "loader bomb",
            common::loader_bomb(),
            close::PROTOCOL,
            "not accepted",
        ),
        (
            "op bomb",
            common::op_bomb(run, 150_000),
            close::TOO_BIG,
            "operations",
        ),
    ];
    for (what, bytes, code, reason) in cases {
        let mut p = Peer::joined(&node, &format!("attacker-{code}")).await;
        let mut scratch = AutoCommit::new();
        let mut message = scratch
            .sync()
            .generate_sync_message(&mut sync::State::new())
            .expect("a first message");
        message.changes = sync::ChunkList::from(vec![bytes]);
        p.sync("sync", &doc_id(run), message).await;
        let (got_code, got_reason) = p.closed_with_reason().await;
        assert_eq!(got_code, code, "{what}: {got_reason}");
        assert!(got_reason.contains(reason), "{what}: {got_reason}");
    }
    let (status, after) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(status, 200, "the node keeps serving");
    assert_eq!(before["heads"], after["heads"], "nothing was applied");
    let peak = common::peak_rss_mib(node.pid());
    assert!(peak < 400, "peak RSS {peak} MiB");
}

mod close {
    pub const PROTOCOL: u16 = 4002;
    pub const TOO_BIG: u16 = 1009;
}

/// Issue 12: ephemeral messages relayed to clients that do not read are bounded: a payload over
/// 64 KiB is not relayed at all (60 messages of 4 MiB to 4 non-reading receivers once grew the
/// node by ~1 GB), and past three quarters of `queue-bytes` queued for a connection, ephemerals
/// to it are dropped (here 6 MiB of 8: 1,000 messages of 60 KiB would queue 60 MB each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemerals_to_clients_that_do_not_read_are_bounded_in_bytes() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[("CRDT_AUTOMERGE_QUEUE_BYTES", "8388608")]);
    let c = Client::new();
    let run = make_run(&c, &node, "A").await;
    let doc = doc_id(run);
    let mut receivers = Vec::new();
    for i in 0..4 {
        let mut r = Peer::joined(&node, &format!("sleeper-{i}")).await;
        // Opens the document (a small ephemeral), then never reads again.
        r.ephemeral(&doc, 1, vec![0]).await;
        receivers.push(r);
    }
    let mut sender = Peer::joined(&node, "chatty").await;
    let huge = vec![7u8; 4 << 20];
    for n in 0..60 {
        sender.ephemeral(&doc, n + 2, huge.clone()).await;
    }
    let large = vec![8u8; 60 << 10];
    for n in 0..1000 {
        sender.ephemeral(&doc, n + 100, large.clone()).await;
    }
    let counted = |text: &str, series: &str| common::metric(text, series).unwrap_or(0.0);
    let settled = common::eventually(30, || async {
        let text = c.text(&node.url("/actuator/prometheus")).await;
        let too_large = counted(
            &text,
            "crdt_automerge_repo_messages_total{direction=\"in\",type=\"ephemeral_too_large\"}",
        );
        let dropped = counted(
            &text,
            "crdt_automerge_repo_messages_total{direction=\"out\",type=\"ephemeral_dropped\"}",
        );
        (too_large >= 60.0 && dropped >= 1000.0).then_some((too_large, dropped))
    })
    .await;
    assert!(
        settled.is_some(),
        "oversized ephemerals and those to sleepers were dropped"
    );
    let (status, _) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(status, 200);
    let peak = common::peak_rss_mib(node.pid());
    assert!(peak < 300, "peak RSS {peak} MiB");
    drop(receivers);
}

/// Issue 19: a user's changes are held to the run's authorship rules. With ana's write token,
/// a graft under another name is refused whole (close 4403 with the reason): the state, the
/// heads and the event log are as before. A graft under her own name is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_forged_graft_is_refused_whole_and_nothing_is_stored() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    const SECRET: &str = "authorship-secret";
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(
        &db,
        &[("CRDT_JWT_HS256_SECRET", SECRET), ("CRDT_API_TOKEN", "svc")],
    );
    let c = Client::with_token("svc");
    let run = make_run(&c, &node, "Seed").await;
    let exp = chrono::Utc::now().timestamp() + 600;
    let claims = json!({"sub": "ana", "runs": [run], "role": "write", "exp": exp});
    let jwt = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (_, before) = c.get(&run_url(&node, run, "/state")).await;
    let rows = common::db::event_rows(&db, run).await;

    // Each edit on a fresh connection: the client's document as the run holds it, one change.
    let attempt = |user: &'static str| {
        let (node, jwt) = (&node, jwt.clone());
        async move {
            let mut p = Peer::connect(node, &format!("?token={jwt}"), "ana-peer").await;
            p.join(&["1"]).await;
            p.next().await;
            let mut doc = AutoCommit::new();
            p.sync_until_quiet(&doc_id(run), &mut doc).await;
            let base = doc.get_heads();
            let list = doc.get(ROOT, "grafts").unwrap().unwrap().1;
            let g = doc
                .insert_object(&list, doc.length(&list), automerge::ObjType::Map)
                .unwrap();
            for (k, v) in [
                ("id", "g1"),
                ("agent", "X"),
                ("afterStep", "S"),
                ("user", user),
            ] {
                doc.put(&g, k, v).unwrap();
            }
            doc.put(&g, "region", "client").unwrap();
            doc.put(&g, "lamport", 50).unwrap();
            doc.put(&g, "createdAt", "2026-12-06T00:00:00Z").unwrap();
            doc.commit();
            let change = doc.get_changes(&base)[0].raw_bytes().to_vec();
            let message = sync::Message {
                heads: doc.get_heads(),
                need: vec![],
                have: vec![],
                changes: vec![change].into(),
                flags: None,
                version: sync::MessageVersion::V1,
            };
            p.sync("sync", &doc_id(run), message).await;
            p
        }
    };
    let mut forged = attempt("mallory").await;
    let (code, reason) = forged.closed_with_reason().await;
    assert_eq!(code, 4403, "{reason}");
    assert!(
        reason.contains("may only graft under its own name"),
        "{reason}"
    );
    let (_, after) = c.get(&run_url(&node, run, "/state")).await;
    assert_eq!(after["grafts"], before["grafts"]);
    assert_eq!(after["heads"], before["heads"]);
    assert_eq!(
        common::db::event_rows(&db, run).await,
        rows,
        "nothing logged"
    );

    let mut own = attempt("ana").await;
    let shown = common::eventually(10, || {
        let c = c.clone();
        let url = run_url(&node, run, "/state");
        async move {
            let (_, st) = c.get(&url).await;
            (st["grafts"].as_array()?.len() == 2).then_some(st)
        }
    })
    .await
    .expect("ana's graft is kept");
    assert_eq!(shown["grafts"][1]["user"], "ana");
    assert_eq!(common::db::event_rows(&db, run).await, rows + 1);
    own.ws.close(None).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_run_is_unavailable_to_its_clients_and_takes_nothing_from_them() {
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[]);
    let c = Client::new();
    let run = make_run(&c, &node, "A").await;
    let mut p = Peer::joined(&node, "holder").await;
    let mut doc = AutoCommit::new();
    p.sync_until_quiet(&doc_id(run), &mut doc).await;
    assert_eq!(c.delete(&run_url(&node, run, "")).await.0, 200);
    let told = p.next().await;
    assert_eq!(
        field(&told, "type"),
        Some(text("doc-unavailable")),
        "{told:?}"
    );
    assert_eq!(field(&told, "documentId"), Some(text(&doc_id(run))));
    // The client's own change for it goes nowhere; a new client learns the same at once.
    let grafts = doc.get(ROOT, "grafts").unwrap().map(|(_, id)| id).unwrap();
    doc.insert(&grafts, 0, "not a graft").unwrap();
    let mut state = sync::State::new();
    let m = doc.sync().generate_sync_message(&mut state).unwrap();
    p.sync("sync", &doc_id(run), m).await;
    let mut q = Peer::joined(&node, "newcomer").await;
    let mut fresh = AutoCommit::new();
    let mut state = sync::State::new();
    let ask = fresh.sync().generate_sync_message(&mut state).unwrap();
    q.sync("request", &doc_id(run), ask).await;
    assert_eq!(
        field(&q.next().await, "type"),
        Some(text("doc-unavailable"))
    );
    assert_eq!(c.get(&run_url(&node, run, "/state")).await.0, 410);
    assert_eq!(common::db::event_rows(&db, run).await, 1);
}

//! Issue 22 (deletion): a deleted run is gone in every region — 410, left out of the runs
//! list, its sessions closed — and stays gone: a region cut off when it was deleted cannot
//! bring it back, nor can a peer's late frame after the purge. Within the grace period the
//! service credential restores it whole (what the cut-off region wrote included); after it,
//! nothing of the run is left but its tombstone.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use test_support as common;

use common::mesh::{converged, raw_peer, TestMesh, SECRET as MESH_SECRET};
use common::{agents, db, eventually, run_url, Backend, Client, Node};

const JWT_SECRET: &str = "deletion-user-secret";
const SERVICE: &str = "deletion-service";

fn token(sub: &str, run: Uuid, role: &str) -> String {
    common::jwt::user_token(JWT_SECRET, sub, json!([run.to_string()]), role, 600)
}

fn graft(agent: &str) -> Value {
    json!({"agent": agent, "afterStep": "Step1", "user": "ann"})
}

async fn listed(c: &Client, node: &Node, run: Uuid) -> bool {
    let (status, body) = c.get(&node.url("/api/crdt/runs?limit=200")).await;
    assert_eq!(status, 200, "{body}");
    body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["runId"] == run.to_string())
}

/// Waits until the run answers `status` on `node`.
async fn answers(c: &Client, node: &Node, run: Uuid, status: u16, secs: u64) -> Value {
    let found = eventually(secs, || async {
        let (s, body) = c.get(&run_url(node, run, "/state")).await;
        (s == status).then_some(body)
    })
    .await;
    found.unwrap_or_else(|| panic!("run {run} did not answer {status} within {secs} s"))
}

/// A browser session joined to the run; returns the socket.
async fn browser_session(
    node: &Node,
    run: Uuid,
    bearer: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = node
        .url(&format!("/ws/runs/{run}"))
        .replace("http://", "ws://");
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {bearer}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    ws.send(Message::text(
        json!({"type": "JOIN", "user": "ann"}).to_string(),
    ))
    .await
    .unwrap();
    ws
}

/// Reads until the node closes the socket; its close code and reason.
async fn close_code<S>(ws: &mut S) -> (u16, String)
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return (u16::from(f.code), f.reason.to_string())
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_run_stays_deleted_everywhere_and_a_restore_brings_it_back_whole() {
    let mut mesh = TestMesh::start_with(
        Backend::Sqlite,
        &["us-east-1", "eu-central-1"],
        &[(0, 1)],
        &[
            ("CRDT_API_TOKEN", SERVICE),
            ("CRDT_JWT_HS256_SECRET", JWT_SECRET),
        ],
    )
    .await;
    let c = Client::with_token(SERVICE);
    mesh.wait_connected(&c, 1).await;
    let run = Uuid::new_v4();
    for agent in ["Planner", "Coder"] {
        assert_eq!(
            c.post(&run_url(mesh.node(0), run, "/grafts"), &graft(agent))
                .await
                .0,
            201
        );
    }
    converged(&c, &mesh.nodes(), run, 20).await;
    assert!(listed(&c, mesh.node(1), run).await);

    // Identity: a reader may not delete; a writer may, but not restore.
    let reader = Client::with_token(&token("vic", run, "read"));
    let (status, body) = reader.delete(&run_url(mesh.node(0), run, "")).await;
    assert_eq!(status, 403, "{body}");
    let writer = token("ann", run, "write");
    let mut session = browser_session(mesh.node(1), run, &writer).await;

    // The eu region is cut off when the run is deleted in us; it keeps writing.
    mesh.partition(&[0]);
    let (status, body) = Client::with_token(&writer)
        .delete(&run_url(mesh.node(0), run, ""))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["deleted"].as_bool(), body["decidedBy"].as_str()),
        (Some(true), Some("ann"))
    );
    let (status, body) = c.get(&run_url(mesh.node(0), run, "/state")).await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"], "gone");
    assert_eq!(
        c.post(&run_url(mesh.node(0), run, "/grafts"), &graft("Late"))
            .await
            .0,
        410
    );
    assert_eq!(c.get(&run_url(mesh.node(0), run, "/history")).await.0, 410);
    assert!(!listed(&c, mesh.node(0), run).await);
    assert_eq!(
        c.delete(&run_url(mesh.node(0), run, "")).await.0,
        200,
        "deleting again is the same answer"
    );
    let rows_when_deleted = db::event_rows(&mesh.members[0].db, run).await;
    let (status, body) = c
        .post(
            &run_url(mesh.node(1), run, "/grafts"),
            &graft("WrittenWhileCutOff"),
        )
        .await;
    assert_eq!(status, 201, "the cut-off region still takes writes: {body}");

    // Healed: the deletion wins in eu, and nothing eu wrote brings the run back in us.
    mesh.heal_all();
    mesh.wait_connected(&c, 1).await;
    answers(&c, mesh.node(1), run, 410, 20).await;
    let (code, reason) = close_code(&mut session).await;
    assert_eq!(code, 4410, "{reason}");
    assert!(!listed(&c, mesh.node(1), run).await);
    assert_eq!(
        c.post(&run_url(mesh.node(1), run, "/grafts"), &graft("Late"))
            .await
            .0,
        410
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.get(&run_url(mesh.node(0), run, "/state")).await.0, 410);
    assert_eq!(
        db::event_rows(&mesh.members[0].db, run).await,
        rows_when_deleted,
        "us took nothing of the deleted run"
    );
    // A new session is refused as gone; a restart keeps the run deleted.
    let mut late = browser_session(mesh.node(0), run, &writer).await;
    assert_eq!(close_code(&mut late).await.0, 4410);
    mesh.restart(1);
    mesh.wait_connected(&c, 1).await;
    assert_eq!(c.get(&run_url(mesh.node(1), run, "/state")).await.0, 410);

    // Restore: the service only, made while eu is cut off again; at the heal eu learns of
    // it, and the run comes back in both regions, eu's write included.
    let (status, _) = Client::with_token(&writer)
        .post(&run_url(mesh.node(0), run, "/restore"), &json!({}))
        .await;
    assert_eq!(status, 403);
    mesh.partition(&[0]);
    let (status, body) = c
        .post(&run_url(mesh.node(0), run, "/restore?user=ops"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], false);
    assert_eq!(c.get(&run_url(mesh.node(0), run, "/state")).await.0, 200);
    assert_eq!(c.get(&run_url(mesh.node(1), run, "/state")).await.0, 410);
    mesh.heal_all();
    mesh.wait_connected(&c, 1).await;
    answers(&c, mesh.node(1), run, 200, 20).await;
    let state = converged(&c, &mesh.nodes(), run, 20).await;
    let mut names = agents(&state);
    names.sort();
    assert_eq!(names, ["Coder", "Planner", "WrittenWhileCutOff"]);
    assert!(listed(&c, mesh.node(0), run).await && listed(&c, mesh.node(1), run).await);
    assert_eq!(
        c.post(&run_url(mesh.node(1), run, "/grafts"), &graft("After"))
            .await
            .0,
        201
    );
    converged(&c, &mesh.nodes(), run, 20).await;
    let (status, body) = c
        .post(&run_url(mesh.node(0), run, "/restore"), &json!({}))
        .await;
    assert_eq!(status, 409, "a live run is not restored: {body}");
    assert_eq!(
        c.delete(&run_url(mesh.node(0), Uuid::new_v4(), "")).await.0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_nothing_is_left_and_nothing_comes_back() {
    let mesh = TestMesh::start_with(
        Backend::Postgres,
        &["us-east-1", "eu-central-1"],
        &[(0, 1)],
        &[
            ("CRDT_DELETION_GRACE_SECS", "2"),
            ("CRDT_PURGE_EVERY_SECS", "1"),
            ("CRDT_SNAPSHOT_EVERY", "2"),
        ],
    )
    .await;
    let c = Client::new();
    mesh.wait_connected(&c, 1).await;
    let (run, kept) = (Uuid::new_v4(), Uuid::new_v4());
    for agent in ["A", "B", "C"] {
        c.post(&run_url(mesh.node(0), run, "/grafts"), &graft(agent))
            .await;
        c.post(&run_url(mesh.node(1), kept, "/grafts"), &graft(agent))
            .await;
    }
    converged(&c, &mesh.nodes(), run, 20).await;
    converged(&c, &mesh.nodes(), kept, 20).await;
    let (_, before) = c.get(&run_url(mesh.node(0), run, "/changes")).await;
    let changes = before["changes"].as_str().unwrap().to_string();

    assert_eq!(c.delete(&run_url(mesh.node(1), run, "")).await.0, 200);
    answers(&c, mesh.node(0), run, 410, 20).await;
    for m in &mesh.members {
        let gone = eventually(20, || async {
            let rows = db::rows_of_run(&m.db, run).await;
            rows.iter().all(|(_, n)| *n == 0).then_some(rows)
        })
        .await;
        assert!(gone.is_some(), "{} still holds rows of the run", m.region);
        let kept_rows = db::rows_of_run(&m.db, kept).await;
        assert!(kept_rows[0].1 >= 3 && kept_rows[1].1 >= 1, "{kept_rows:?}");
    }
    let (status, body) = c
        .post(&run_url(mesh.node(0), run, "/restore"), &json!({}))
        .await;
    assert_eq!(status, 410, "purged: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("purged"),
        "{body}"
    );

    // A peer that still holds the run sends it: refused with the tombstone, nothing stored.
    let mut peer = raw_peer(mesh.node(0), MESH_SECRET, "late-peer", "ap-south-1").await;
    let frame = json!({"type": "CRDT_SYNC", "runId": run.to_string(), "sourceRegion": "ap-south-1",
        "changes": changes, "timestamp": 3});
    peer.send(Message::text(frame.to_string())).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let told = loop {
        match tokio::time::timeout_at(deadline, peer.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "RUN_TOMBSTONE" && v["runId"] == run.to_string() {
                    break v;
                }
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no RUN_TOMBSTONE for the deleted run's changes: {other:?}"),
        }
    };
    assert_eq!(told["deleted"], true);
    assert_eq!(told["region"], "eu-central-1");
    assert_eq!(c.get(&run_url(mesh.node(0), run, "/state")).await.0, 410);
    let rows = db::rows_of_run(&mesh.members[0].db, run).await;
    assert!(rows.iter().all(|(_, n)| *n == 0), "{rows:?}");
    assert_eq!(c.get(&run_url(mesh.node(0), kept, "/state")).await.0, 200);
}

//! Issue 14: signed user tokens on every door. Each door (the HTTP API, browser sessions,
//! automerge-repo connections) refuses a missing, expired or forged token and a token for
//! another run, and a read-only token may read but never write; a user's events record the
//! token's `sub`, never what the request says.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::AutoCommit;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use test_support as common;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use common::mesh::Ws;
use common::repo::{doc_id, field, text, Peer};
use common::{db, run_url, Backend, Client, Node, TestDb};

const SECRET: &str = "user-token-secret";
const SERVICE: &str = "service-token";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token for `sub` on `runs` with `role`, expiring `exp_in` seconds from now (negative: past).
fn token(sub: &str, runs: Value, role: &str, exp_in: i64, secret: &str) -> String {
    common::jwt::user_token(secret, sub, runs, role, exp_in)
}

/// The five tokens every door must refuse or restrict, for a request on `run`.
struct Cases {
    expired: String,
    forged: String,
    other_run: String,
    read_only: String,
    writer: String,
}

impl Cases {
    fn for_run(run: Uuid) -> Cases {
        let runs = json!([run.to_string()]);
        Cases {
            expired: token("ana", runs.clone(), "write", -3600, SECRET),
            forged: token("ana", runs.clone(), "write", 600, "not-the-secret"),
            other_run: token(
                "ana",
                json!([Uuid::new_v4().to_string()]),
                "write",
                600,
                SECRET,
            ),
            read_only: token("vic", runs.clone(), "read", 600, SECRET),
            writer: token("ana", runs, "write", 600, SECRET),
        }
    }
}

async fn node() -> (Node, TestDb) {
    let db = TestDb::new(Backend::Sqlite).await;
    let jwks = common::repo_path("tests/fixtures/jwt/jwks.json");
    let node = Node::spawn(
        &db,
        &[
            ("CRDT_API_TOKEN", SERVICE),
            ("CRDT_JWT_HS256_SECRET", SECRET),
            ("CRDT_JWKS_FILE", &jwks),
        ],
    );
    (node, db)
}

/// A run made by the service credential.
async fn service_run(node: &Node) -> Uuid {
    let run = Uuid::new_v4();
    let c = Client::with_token(SERVICE);
    let body = json!({"agent": "A", "afterStep": "S", "user": "svc"});
    let (s, reply) = c.post(&run_url(node, run, "/grafts"), &body).await;
    assert_eq!(s, 201, "{reply}");
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_takes_user_tokens_and_records_their_sub() {
    let (node, db) = node().await;
    let run = service_run(&node).await;
    let other = service_run(&node).await;
    let t = Cases::for_run(run);
    let state = run_url(&node, run, "/state");
    let graft = run_url(&node, run, "/grafts");
    let body = json!({"agent": "B", "afterStep": "S", "user": "mallory"});

    let (s, reply) = Client::new().get(&state).await;
    assert_eq!(s, 401, "none: {reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("token is required"),
        "{reply}"
    );
    for (what, tok, status, says) in [
        ("expired", &t.expired, 401, "expired"),
        ("bad signature", &t.forged, 401, "signature"),
        ("other run", &t.other_run, 403, "no access"),
    ] {
        let (s, reply) = Client::with_token(tok).get(&state).await;
        assert_eq!(s, status, "{what}: {reply}");
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {reply}");
    }
    let reader = Client::with_token(&t.read_only);
    assert_eq!(reader.get(&state).await.0, 200, "a reader reads");
    let (s, reply) = reader.post(&graft, &body).await;
    assert_eq!(s, 403, "read-only write: {reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("read-only"),
        "{reply}"
    );
    assert_eq!(db::event_rows(&db, run).await, 1, "nothing written");

    // The writer's graft records the token's sub, not the body's user.
    let (s, reply) = Client::with_token(&t.writer).post(&graft, &body).await;
    assert_eq!(s, 201, "{reply}");
    assert_eq!(reply["graft"]["user"], "ana", "{reply}");
    let users = db::event_users(&db, run).await;
    assert_eq!(users, vec![Some("svc".into()), Some("ana".into())]);

    // Raw changes under a region's name are the service's: a user writes through mutations.
    let sync = json!({"changes": "", "sourceRegion": "eu-central-1"});
    let (s, reply) = Client::with_token(&t.writer)
        .post(&run_url(&node, run, "/sync"), &sync)
        .await;
    assert_eq!(s, 403, "{reply}");

    // The runs list shows the token's runs only; the service sees all.
    assert_eq!(
        listed(&node, Client::with_token(&t.writer)).await,
        vec![run.to_string()]
    );
    // The mesh is the service credential's.
    let status = node.url("/api/crdt/mesh/status");
    assert_eq!(Client::with_token(&t.writer).get(&status).await.0, 403);
    assert_eq!(Client::with_token(SERVICE).get(&status).await.0, 200);
    let all = listed(&node, Client::with_token(SERVICE)).await;
    assert!(all.contains(&run.to_string()) && all.contains(&other.to_string()));
}

/// The run ids of the runs list's first page, as `c` sees it.
async fn listed(node: &Node, c: Client) -> Vec<String> {
    let (s, reply) = c.get(&node.url("/api/crdt/runs?limit=10")).await;
    assert_eq!(s, 200, "{reply}");
    let runs = reply["runs"].as_array().expect("runs");
    runs.iter()
        .map(|r| r["runId"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn browser(node: &Node, run: Uuid, join: Value) -> Ws {
    let url = node
        .url(&format!("/ws/runs/{run}"))
        .replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    ws.send(Message::text(join.to_string()))
        .await
        .expect("send");
    ws
}

/// The next JSON frame, or `{"closed": [code, reason]}`.
async fn next(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).expect("JSON"),
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return json!({"closed": [u16::from(f.code), f.reason.to_string()]})
            }
            Ok(Some(Ok(Message::Close(None))) | None) => return json!({"closed": [1005, ""]}),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no frame: {other:?}"),
        }
    }
}

/// Frames until one of type `kind` (or the close).
async fn until(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let f = next(ws).await;
        if f["type"] == kind || f.get("closed").is_some() {
            return f;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sessions_join_with_user_tokens_and_close_when_they_expire() {
    let (node, db) = node().await;
    let run = service_run(&node).await;
    let t = Cases::for_run(run);
    for (what, join, says) in [
        (
            "none",
            json!({"type": "JOIN", "user": "x"}),
            "token is required",
        ),
        (
            "expired",
            json!({"type": "JOIN", "token": t.expired}),
            "expired",
        ),
        (
            "bad signature",
            json!({"type": "JOIN", "token": t.forged}),
            "signature",
        ),
        (
            "other run",
            json!({"type": "JOIN", "token": t.other_run}),
            "no access",
        ),
    ] {
        let mut ws = browser(&node, run, join).await;
        let error = until(&mut ws, "ERROR").await;
        assert_eq!(error["error"], "unauthorized", "{what}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(says),
            "{what}: {error}"
        );
        let closed = until(&mut ws, "never").await;
        assert_eq!(closed["closed"][0], 4001, "{what}: {closed}");
    }

    // A reader sees the state and is told why each mutation is refused; it stays joined.
    let mut ws = browser(&node, run, json!({"type": "JOIN", "token": t.read_only})).await;
    let welcome = until(&mut ws, "WELCOME").await;
    assert_eq!(
        welcome["user"], "vic",
        "the token names the user: {welcome}"
    );
    assert!(until(&mut ws, "STATE").await["state"]["grafts"].is_array());
    let mutate = json!({"type": "MUTATE", "opId": "1", "op": "SET_FLAG", "key": "k", "value": 1});
    ws.send(Message::text(mutate.to_string())).await.unwrap();
    let refused = until(&mut ws, "ERROR").await;
    assert_eq!(
        (refused["error"].as_str(), refused["opId"].as_str()),
        (Some("forbidden"), Some("1"))
    );
    assert!(
        refused["message"].as_str().unwrap().contains("read-only"),
        "{refused}"
    );
    assert_eq!(db::event_rows(&db, run).await, 1);

    // A writer's token expiring in 2 s: renewed in-band, the session outlives it; the next
    // token is not renewed and the session is closed 4001 when it expires.
    let runs = json!([run.to_string()]);
    let short = token("ana", runs.clone(), "write", 2, SECRET);
    let mut ws = browser(
        &node,
        run,
        json!({"type": "JOIN", "user": "mallory", "token": short}),
    )
    .await;
    assert_eq!(until(&mut ws, "WELCOME").await["user"], "ana");
    let renewed = token("ana", runs.clone(), "write", 4, SECRET);
    ws.send(Message::text(
        json!({"type": "TOKEN", "token": renewed}).to_string(),
    ))
    .await
    .unwrap();
    assert!(until(&mut ws, "TOKEN_ACCEPTED").await["expires"]
        .as_u64()
        .is_some());
    let someone_else = token("eve", runs, "write", 600, SECRET);
    ws.send(Message::text(
        json!({"type": "TOKEN", "token": someone_else}).to_string(),
    ))
    .await
    .unwrap();
    let error = until(&mut ws, "ERROR").await;
    assert!(
        error["message"].as_str().unwrap().contains("same user"),
        "{error}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(Message::text(mutate.to_string())).await.unwrap();
    assert_eq!(
        until(&mut ws, "ACK").await["opId"],
        "1",
        "alive past the first token's expiry"
    );
    assert_eq!(
        db::event_users(&db, run).await.last(),
        Some(&Some("ana".into()))
    );
    let closed = until(&mut ws, "never").await;
    assert_eq!(closed["closed"][0], 4001, "{closed}");
    assert!(
        closed["closed"][1].as_str().unwrap().contains("expired"),
        "{closed}"
    );
}

/// A sync message asking for the run (no changes), and one carrying a change of it.
fn messages(run: Uuid) -> (sync::Message, sync::Message) {
    let ask = AutoCommit::new()
        .sync()
        .generate_sync_message(&mut sync::State::new())
        .expect("a message");
    let mut doc = AutoCommit::load(&run_doc::RunDoc::new(run, "us-east-1").save()).unwrap();
    let flags = automerge::ReadDoc::get(&doc, automerge::ROOT, "flags")
        .unwrap()
        .unwrap()
        .1;
    doc.put(&flags, "k", 1).unwrap();
    doc.commit();
    let mut write = doc
        .sync()
        .generate_sync_message(&mut sync::State::new())
        .expect("message");
    write.changes = sync::ChunkList::from(vec![doc.save()]);
    (ask, write)
}

async fn repo_peer(node: &Node, token: Option<&str>, id: &str) -> Peer {
    let query = token.map(|t| format!("?token={t}")).unwrap_or_default();
    let mut p = Peer::connect(node, &query, id).await;
    p.join(&["1"]).await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automerge_repo_connections_take_user_tokens_per_document() {
    let (node, db) = node().await;
    let run = service_run(&node).await;
    let t = Cases::for_run(run);
    let (ask, write) = messages(run);
    let doc = doc_id(run);
    for (what, tok, says) in [
        ("none", None, "token is required"),
        ("expired", Some(&t.expired), "expired"),
        ("bad signature", Some(&t.forged), "signature"),
    ] {
        let mut p = repo_peer(&node, tok.map(String::as_str), "p").await;
        let (message, code) = p.refused().await;
        assert_eq!(code, 4001, "{what}");
        assert!(message.contains(says), "{what}: {message}");
    }
    // Another run's token joins, but this run's document is refused.
    let mut p = repo_peer(&node, Some(&t.other_run), "p").await;
    assert_eq!(field(&p.next().await, "type"), Some(text("peer")));
    p.sync("request", &doc, ask.clone()).await;
    let (message, code) = p.refused().await;
    assert_eq!(code, 4001);
    assert!(message.contains("no access"), "{message}");

    // A reader syncs (the node answers), but a message carrying changes is refused.
    let mut p = repo_peer(&node, Some(&t.read_only), "reader").await;
    assert_eq!(field(&p.next().await, "type"), Some(text("peer")));
    p.sync("request", &doc, ask.clone()).await;
    assert_eq!(field(&p.next().await, "type"), Some(text("sync")));
    p.sync("sync", &doc, write.clone()).await;
    let (message, code) = p.refused().await;
    assert_eq!(code, 4403);
    assert!(message.contains("read-only"), "{message}");
    assert_eq!(db::event_rows(&db, run).await, 1, "nothing written");

    // A writer's changes record the token's sub, not the peer id.
    let mut p = repo_peer(&node, Some(&t.writer), "peer-id-not-a-user").await;
    assert_eq!(field(&p.next().await, "type"), Some(text("peer")));
    p.sync("sync", &doc, write).await;
    let rows = common::eventually(10, || async {
        let users = db::event_users(&db, run).await;
        (users.len() > 1).then_some(users)
    })
    .await
    .expect("the change is stored");
    assert!(
        rows[1..].iter().all(|u| u.as_deref() == Some("ana")),
        "{rows:?}"
    );
}

/// Keys from a JWKS file verify RS256 and EdDSA tokens at the door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_sign_tokens_the_api_takes() {
    let (node, _db) = node().await;
    let run = service_run(&node).await;
    let claims = json!({"sub": "rsa-user", "runs": "*", "role": "read", "exp": now() + 600});
    for (alg, kid, pem) in [
        (Algorithm::RS256, "rsa-1", "rsa.pem"),
        (Algorithm::EdDSA, "ed-1", "ed25519.pem"),
    ] {
        let pem = std::fs::read(common::repo_path(&format!("tests/fixtures/jwt/{pem}"))).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ed_pem(&pem).unwrap(),
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        let tok = encode(&header, &claims, &key).unwrap();
        let (s, reply) = Client::with_token(&tok)
            .get(&run_url(&node, run, "/state"))
            .await;
        assert_eq!(s, 200, "{alg:?}: {reply}");
    }
}

/// Serves `body` as JSON to every HTTP request on a free port; the URL.
async fn serve_json(body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/jwks.json")
}

/// Keys from a JWKS URL (as an identity provider publishes them) verify tokens once fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_a_jwks_url_verify_tokens() {
    let jwks = std::fs::read_to_string(common::repo_path("tests/fixtures/jwt/jwks.json")).unwrap();
    let url = serve_json(jwks).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let node = Node::spawn(&db, &[("CRDT_API_TOKEN", SERVICE), ("CRDT_JWKS_URL", &url)]);
    let run = service_run(&node).await;
    let pem = std::fs::read(common::repo_path("tests/fixtures/jwt/ed25519.pem")).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".into());
    let claims =
        json!({"sub": "idp-user", "runs": [run.to_string()], "role": "read", "exp": now() + 600});
    let tok = encode(&header, &claims, &EncodingKey::from_ed_pem(&pem).unwrap()).unwrap();
    let reader = Client::with_token(&tok);
    let state = run_url(&node, run, "/state");
    let read = common::eventually(10, || async {
        (reader.get(&state).await.0 == 200).then_some(())
    });
    assert!(
        read.await.is_some(),
        "the URL's keys were fetched and verify the token"
    );
}

/// A token naming one old run, behind more than the 2,000 entries one request reads: the first
/// page comes back short with a cursor, and following it finds the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrow_token_pages_through_a_long_runs_list() {
    let (node, _db) = node().await;
    let old = service_run(&node).await;
    let c = Client::with_token(SERVICE);
    let writes = (0..2100).map(|_| {
        let (c, url) = (c.clone(), run_url(&node, Uuid::new_v4(), "/flags/k"));
        async move { c.put(&url, &json!({"value": 1, "user": "svc"})).await }
    });
    let answers = futures_util::future::join_all(writes).await;
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        refused.is_empty(),
        "{} of 2,100 writes refused, first {:?}; node log:\n{}",
        refused.len(),
        refused.first(),
        node.log_text()
    );
    let reader = Client::with_token(&token("ana", json!([old.to_string()]), "read", 600, SECRET));
    let (mut found, mut cursor, mut requests) = (Vec::new(), None::<String>, 0);
    loop {
        let query = cursor
            .as_deref()
            .map(|c| format!("&cursor={c}"))
            .unwrap_or_default();
        let (s, reply) = reader
            .get(&node.url(&format!("/api/crdt/runs?limit=10{query}")))
            .await;
        assert_eq!(s, 200, "{reply}");
        requests += 1;
        found.extend(
            reply["runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["runId"].clone()),
        );
        cursor = reply["nextCursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(found, vec![json!(old.to_string())]);
    assert!(requests >= 2, "the first request stopped at its scan limit");
}

/// Issue 19: the scrape names no run to whoever lacks the metrics credential. A node that asks
/// for tokens serves `/actuator/prometheus` without the per-run series when no metrics
/// credential is set; with one, the scrape requires it (401 otherwise) and shows every series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_runs_only_to_the_metrics_credential() {
    let (node, _db) = node().await;
    let run = service_run(&node).await;
    let open = Client::new().text(&node.url("/actuator/prometheus")).await;
    assert!(
        open.contains("crdt_runs_loaded"),
        "the scrape still serves: {open}"
    );
    assert!(
        !open.contains(&run.to_string()),
        "no run id without the credential"
    );
    // An API or user token is no metrics credential either.
    let svc = Client::with_token(SERVICE)
        .text(&node.url("/actuator/prometheus"))
        .await;
    assert!(!svc.contains(&run.to_string()));

    let db = TestDb::new(Backend::Sqlite).await;
    let guarded = Node::spawn(
        &db,
        &[
            ("CRDT_API_TOKEN", SERVICE),
            ("CRDT_METRICS_TOKEN", "scraper"),
        ],
    );
    let run = service_run(&guarded).await;
    let url = guarded.url("/actuator/prometheus");
    let (s, body) = Client::new().get(&url).await;
    assert_eq!(s, 401, "{body}");
    assert!(body.to_string().contains("metrics credential"), "{body}");
    let (s, _) = Client::with_token(SERVICE).get(&url).await;
    assert_eq!(s, 401, "the API token is not the metrics credential");
    let full = Client::with_token("scraper").text(&url).await;
    let series = format!("crdt_lamport_clock{{run_id=\"{run}\"}}");
    assert!(full.contains(&series), "{full}");
    assert!(
        full.contains("crdt_node_http_requests_total"),
        "HTTP metrics still recorded"
    );
}

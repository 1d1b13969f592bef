//! Meshes of real node processes for tests: every link runs through a [`Proxy`] of the test's
//! own, so a test can partition any pair of nodes and heal them, and a restarted node (on a
//! new port) is found again through the same proxy.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use run_wire::mesh as protocol;

use super::proxy::Proxy;
use super::{eventually, run_url, Backend, Client, Node, TestDb};

pub const SECRET: &str = "test-mesh-secret";

pub struct Member {
    pub node: Node,
    pub db: TestDb,
    pub region: String,
    pub node_id: String,
    env: Vec<(String, String)>,
}

pub struct Link {
    pub from: usize,
    pub to: usize,
    pub proxy: Proxy,
}

pub struct TestMesh {
    pub members: Vec<Member>,
    pub links: Vec<Link>,
}

/// Fast heartbeats and reconnects, so tests see link failures in about a second.
pub fn mesh_env(region: &str, node_id: &str, peers: &[String]) -> Vec<(String, String)> {
    [
        ("REGION", region.to_string()),
        ("NODE_ID", node_id.to_string()),
        ("CRDT_MESH_SECRET", SECRET.to_string()),
        ("CRDT_MESH_PEERS", peers.join(",")),
        ("CRDT_MESH_HEARTBEAT_MS", "200".into()),
        ("CRDT_MESH_PEER_TIMEOUT_MS", "1500".into()),
        ("CRDT_MESH_RECONNECT_MIN_MS", "50".into()),
        ("CRDT_MESH_RECONNECT_MAX_MS", "400".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A mesh node of its own (SQLite), outside any `TestMesh`; `extra` adds to or overrides the
/// mesh environment. Keep the database as long as the node.
pub async fn lone_node(
    region: &str,
    node_id: &str,
    peers: &[String],
    extra: &[(&str, &str)],
) -> (Node, TestDb) {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut env = mesh_env(region, node_id, peers);
    env.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let node = spawn(&db, &env);
    (node, db)
}

/// The URL a peer dials to reach `node`.
pub fn ws_url(node: &Node) -> String {
    node.url("/ws").replace("http://", "ws://")
}

fn spawn(db: &TestDb, env: &[(String, String)]) -> Node {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Node::spawn(db, &env)
}

impl TestMesh {
    /// Nodes in `regions`; node `from` dials node `to` for each edge (a link carries both
    /// directions once up).
    pub async fn start(backend: Backend, regions: &[&str], edges: &[(usize, usize)]) -> TestMesh {
        Self::start_with(backend, regions, edges, &[]).await
    }

    /// As `start`, with extra environment for every node.
    pub async fn start_with(
        backend: Backend,
        regions: &[&str],
        edges: &[(usize, usize)],
        extra: &[(&str, &str)],
    ) -> TestMesh {
        let mut links = Vec::new();
        for &(from, to) in edges {
            links.push(Link {
                from,
                to,
                proxy: Proxy::start().await,
            });
        }
        let mut members = Vec::new();
        for (i, region) in regions.iter().enumerate() {
            let peers: Vec<String> = links
                .iter()
                .filter(|l| l.from == i)
                .map(|l| l.proxy.url())
                .collect();
            let node_id = format!("node-{i}-{region}");
            let mut env = mesh_env(region, &node_id, &peers);
            env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let db = TestDb::new(backend).await;
            let node = spawn(&db, &env);
            members.push(Member {
                node,
                db,
                region: region.to_string(),
                node_id,
                env,
            });
        }
        let mesh = TestMesh { members, links };
        for l in &mesh.links {
            l.proxy.target(&mesh.members[l.to].node.base);
        }
        mesh
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.members[i].node
    }

    pub fn nodes(&self) -> Vec<&Node> {
        self.members.iter().map(|m| &m.node).collect()
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        self.members[i].node.kill();
    }

    /// Starts node `i` again on its database; links to it follow it to its new port.
    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.node.kill();
        m.node = spawn(&m.db, &m.env);
        for l in self.links.iter().filter(|l| l.to == i) {
            l.proxy.target(&self.members[i].node.base);
        }
    }

    /// Every link between a node in `side` and a node outside it.
    fn across(&self, side: &[usize]) -> impl Iterator<Item = &Link> {
        let side = side.to_vec();
        self.links
            .iter()
            .filter(move |l| side.contains(&l.from) != side.contains(&l.to))
    }

    pub fn partition(&self, side: &[usize]) {
        for l in self.across(side) {
            l.proxy.cut();
        }
    }

    pub fn heal_all(&self) {
        for l in &self.links {
            l.proxy.heal();
        }
    }

    /// Waits until every node counts `n` connected peers.
    pub async fn wait_connected(&self, c: &Client, n: usize) {
        for (i, m) in self.members.iter().enumerate() {
            let ok = eventually(30, || async {
                let (_, s) = c.get(&m.node.url("/api/crdt/mesh/status")).await;
                (s["connectedPeers"].as_u64() == Some(n as u64)).then_some(())
            })
            .await;
            assert!(
                ok.is_some(),
                "node {i} did not reach {n} peers; log:\n{}",
                m.node.log_text()
            );
        }
    }
}

/// The parts of a run's state every replica must agree on.
pub fn replicated(state: &Value) -> Value {
    let mut heads: Vec<String> = state["heads"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    heads.sort();
    serde_json::json!({
        "heads": heads,
        "grafts": state["grafts"],
        "prunedSteps": state["prunedSteps"],
        "flags": state["flags"],
        "flagConflicts": state["flagConflicts"],
    })
}

/// Waits until every node holds the same replicated state of `run`; returns it.
pub async fn converged(c: &Client, nodes: &[&Node], run: Uuid, secs: u64) -> Value {
    let found = eventually(secs, || async {
        let mut first: Option<Value> = None;
        for n in nodes {
            let (s, state) = c.get(&run_url(n, run, "/state")).await;
            if s != 200 {
                return None;
            }
            let r = replicated(&state);
            match &first {
                None => first = Some(r),
                Some(f) if *f == r => {}
                Some(_) => return None,
            }
        }
        first
    })
    .await;
    match found {
        Some(v) => v,
        None => {
            let mut report = String::new();
            for (i, n) in nodes.iter().enumerate() {
                let (_, state) = c.get(&run_url(n, run, "/state")).await;
                report.push_str(&format!(
                    "\n--- node {i}: {}\n--- log tail:\n{}\n",
                    replicated(&state),
                    n.log_text()
                        .lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
            panic!("run {run} did not converge in {secs} s:{report}");
        }
    }
}

/// Whether `node` holds every change `heads` names: for each, asking for the changes after it
/// returns fewer than asking for everything (a head the node lacks is ignored, so the answer
/// would then be everything).
pub async fn holds(c: &Client, node: &Node, run: Uuid, heads: &[String]) -> bool {
    // A count is asked until the node gives one: a read that meets the run's actor as it
    // unloads answers 503, which says nothing of what the node holds.
    let count = |url: String| async move {
        eventually(5, || {
            let url = url.clone();
            async move { c.get(&url).await.1["count"].as_u64() }
        })
        .await
    };
    let Some(all) = count(run_url(node, run, "/changes")).await else {
        return false;
    };
    for head in heads {
        let after = count(run_url(node, run, &format!("/changes?heads={head}"))).await;
        if after.is_none_or(|n| n >= all) {
            return false;
        }
    }
    true
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Dials `node`'s `/ws` as a raw peer named `node_id` and proves itself with `secret`, as the
/// dialling end of the handshake does. Returns the socket right after its AUTH.
pub async fn raw_peer(node: &Node, secret: &str, node_id: &str, region: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(node))
        .await
        .expect("connect");
    let hello: Value = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => break serde_json::from_str(&t).expect("JSON HELLO"),
            Some(Ok(_)) => continue,
            other => panic!("no HELLO: {other:?}"),
        }
    };
    assert_eq!(hello["type"], "HELLO", "{hello}");
    let mine = protocol::nonce();
    let hello_back = json!({"type": "HELLO", "nodeId": node_id, "region": region, "protocolVersion": 1, "nonce": mine});
    ws.send(Message::text(hello_back.to_string()))
        .await
        .expect("send");
    let theirs = hello["nonce"].as_str().expect("nonce").to_string();
    let nonces = protocol::Nonces {
        initiator: &mine,
        acceptor: &theirs,
    };
    let proof = protocol::prove(secret, protocol::Role::Initiator, nonces, node_id, region);
    ws.send(Message::text(
        json!({"type": "AUTH", "proof": proof}).to_string(),
    ))
    .await
    .expect("send");
    ws
}

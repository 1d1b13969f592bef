//! What checking a user token costs (issue 14), printed as Markdown tables for BENCHMARKS.md.
//!
//! `cargo bench --bench identity` runs both sections; name one to run only it.
//! - verify: in-process, the median time of one `Auth::identify` for the static API token and
//!   for user tokens signed HS256, RS256 and EdDSA (keys from `tests/fixtures/jwt`).
//! - http: one node, `GET /state` of one run over one keep-alive connection, sequential, with
//!   each credential; requests per second and the median latency.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crdt_node::config::JwtSettings;
use crdt_node::identity::{Auth, Verifier};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use test_support as common;
use test_support::bench::args;
use test_support::bench::http::Conn;
use uuid::Uuid;

use common::{Backend, Client, Node, TestDb};

const SECRET: &str = "bench-secret";
const SERVICE: &str = "bench-service-token";

fn main() {
    let args = args::Args::from_env();
    let tokens = tokens();
    if args.wants("verify") {
        verify(&tokens);
    }
    if args.wants("http") {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(http(&tokens));
    }
}

/// Each credential the bench compares, by name.
fn tokens() -> Vec<(&'static str, String)> {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let claims = json!({"sub": "ana", "runs": "*", "role": "write", "exp": exp});
    let pem = |f: &str| std::fs::read(common::repo_path(&format!("tests/fixtures/jwt/{f}")));
    let signed = |alg: Algorithm, kid: Option<&str>, key: EncodingKey| {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, &claims, &key).expect("signed")
    };
    vec![
        ("static API token", SERVICE.to_string()),
        (
            "user token, HS256",
            signed(
                Algorithm::HS256,
                None,
                EncodingKey::from_secret(SECRET.as_bytes()),
            ),
        ),
        (
            "user token, RS256 (2048-bit)",
            signed(
                Algorithm::RS256,
                Some("rsa-1"),
                EncodingKey::from_rsa_pem(&pem("rsa.pem").expect("key")).expect("key"),
            ),
        ),
        (
            "user token, EdDSA",
            signed(
                Algorithm::EdDSA,
                Some("ed-1"),
                EncodingKey::from_ed_pem(&pem("ed25519.pem").expect("key")).expect("key"),
            ),
        ),
    ]
}

fn verify(tokens: &[(&str, String)]) {
    let settings = JwtSettings {
        hs256_secret: Some(SECRET.into()),
        jwks_file: Some(common::repo_path("tests/fixtures/jwt/jwks.json")),
        ..JwtSettings::default()
    };
    let users = Verifier::from_settings(&settings).expect("keys");
    let auth = Auth::new(Some(SERVICE.into()), users);
    println!("\n### Checking one credential, in-process (median of 2,000)\n");
    println!("| credential | time per check |");
    println!("|---|---:|");
    for (name, token) in tokens {
        let mut times: Vec<Duration> = (0..2000)
            .map(|_| {
                let t = Instant::now();
                let id = auth.identify(Some(token)).expect("accepted");
                std::hint::black_box(id);
                t.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "| {name} | {:.1} µs |",
            times[times.len() / 2].as_secs_f64() * 1e6
        );
    }
}

async fn http(tokens: &[(&str, String)]) {
    let db = TestDb::new(Backend::Sqlite).await;
    let jwks = common::repo_path("tests/fixtures/jwt/jwks.json");
    let node = Node::spawn(
        &db,
        &[
            ("CRDT_API_TOKEN", SERVICE),
            ("CRDT_JWT_HS256_SECRET", SECRET),
            ("CRDT_JWKS_FILE", &jwks),
            ("RUST_LOG", "warn,crdt_node=info"),
        ],
    );
    let run = Uuid::new_v4();
    let c = Client::with_token(SERVICE);
    let body = json!({"agent": "A", "afterStep": "S", "user": "svc"});
    c.post(&common::run_url(&node, run, "/grafts"), &body).await;
    let addr = node.base.trim_start_matches("http://").to_string();
    println!(
        "\n### `GET /state` with each credential (one node, one connection, 3,000 requests)\n"
    );
    println!("| credential | requests/s | median latency |");
    println!("|---|---:|---:|");
    for (name, token) in tokens {
        let request = format!(
            "GET /api/crdt/runs/{run}/state HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .into_bytes();
        let mut conn = Conn::open(&addr).await;
        for _ in 0..200 {
            assert_eq!(conn.call(&request).await.expect("warm-up"), 200);
        }
        let mut times = Vec::with_capacity(3000);
        let started = Instant::now();
        for _ in 0..3000 {
            let t = Instant::now();
            assert_eq!(conn.call(&request).await.expect("request"), 200, "{name}");
            times.push(t.elapsed());
        }
        let total = started.elapsed();
        times.sort();
        println!(
            "| {name} | {:.0} | {:.0} µs |",
            3000.0 / total.as_secs_f64(),
            times[times.len() / 2].as_secs_f64() * 1e6
        );
    }
}

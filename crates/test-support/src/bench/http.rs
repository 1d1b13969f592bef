//! A minimal HTTP/1.1 client over raw keep-alive sockets: it takes as little of the machine's
//! CPU from the node as it can. And the requests of the benchmarks' operation mix.

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use uuid::Uuid;

use run_doc::Mutation;

use super::mix::mix;

/// The HTTP request for operation `i` of the mix on `run`.
pub fn http_request(run: Uuid, i: usize) -> Vec<u8> {
    let (method, path, body) = match mix(i) {
        Mutation::Graft {
            agent,
            after_step,
            user,
            ..
        } => (
            "POST",
            format!("/api/crdt/runs/{run}/grafts"),
            json!({"agent": agent, "afterStep": after_step, "user": user}),
        ),
        Mutation::SetFlag { key, value } => (
            "PUT",
            format!("/api/crdt/runs/{run}/flags/{key}"),
            json!({"value": value, "user": "u"}),
        ),
        Mutation::Prune { step_id, user } => (
            "POST",
            format!("/api/crdt/runs/{run}/pruned-steps"),
            json!({"stepId": step_id, "user": user}),
        ),
        _ => unreachable!("the mix has three kinds"),
    };
    let body = body.to_string();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub struct Conn {
    io: BufStream<TcpStream>,
    line: String,
    pub body: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            io: BufStream::new(stream),
            line: String::new(),
            body: Vec::new(),
        }
    }

    /// A connection to `addr`, or None if it is refused or not made within `within`.
    pub async fn open_within(addr: &str, within: std::time::Duration) -> Option<Conn> {
        let stream = tokio::time::timeout(within, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        stream.set_nodelay(true).ok()?;
        Some(Conn {
            io: BufStream::new(stream),
            line: String::new(),
            body: Vec::new(),
        })
    }

    /// Sends one request and reads the whole response; returns the status code.
    pub async fn call(&mut self, request: &[u8]) -> std::io::Result<u16> {
        self.io.write_all(request).await?;
        self.io.flush().await?;
        self.line.clear();
        self.io.read_line(&mut self.line).await?;
        let status: u16 = self
            .line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            self.line.clear();
            self.io.read_line(&mut self.line).await?;
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        self.body.resize(length, 0);
        self.io.read_exact(&mut self.body).await?;
        Ok(status)
    }
}

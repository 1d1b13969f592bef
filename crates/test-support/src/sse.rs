//! A Server-Sent Events client for the change feed's streams.

use std::time::Duration;

use serde_json::Value;

/// One thing a stream sent: an event (`id`, `event`, `data`) or a comment.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Event {
        id: Option<i64>,
        event: Option<String>,
        data: String,
    },
    Comment(String),
}

impl Frame {
    /// An event's data as JSON.
    pub fn json(&self) -> Option<Value> {
        match self {
            Frame::Event { data, .. } => serde_json::from_str(data).ok(),
            Frame::Comment(_) => None,
        }
    }

    pub fn id(&self) -> Option<i64> {
        match self {
            Frame::Event { id, .. } => *id,
            Frame::Comment(_) => None,
        }
    }
}

pub struct Sse {
    response: reqwest::Response,
    buffer: String,
}

impl Sse {
    /// Opens `url` resuming after `last` (sent as `Last-Event-ID`), with a bearer `token`.
    /// The status and body when the node refuses.
    pub async fn open(
        url: &str,
        last: Option<i64>,
        token: Option<&str>,
    ) -> Result<Sse, (u16, Value)> {
        let mut rb = reqwest::Client::new().get(url);
        if let Some(last) = last {
            rb = rb.header("Last-Event-ID", last.to_string());
        }
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let response = rb
            .send()
            .await
            .map_err(|e| (0, Value::String(e.to_string())))?;
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.json().await.unwrap_or(Value::Null);
            return Err((status, body));
        }
        Ok(Sse {
            response,
            buffer: String::new(),
        })
    }

    /// The next frame within `wait`; `None` on timeout or when the stream ended.
    pub async fn next(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(frame) = parse(&block) {
                    return Some(frame);
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await;
            match chunk {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// The next event (skipping comments and `retry:`), within `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                f @ Frame::Event { .. } => return Some(f),
                Frame::Comment(_) => continue,
            }
        }
    }

    /// Every event until none comes for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.next_event(quiet).await {
            out.push(f);
        }
        out
    }
}

fn parse(block: &str) -> Option<Frame> {
    let (mut id, mut event, mut data, mut comment) = (None, None, Vec::new(), None);
    for line in block.lines() {
        if let Some(c) = line.strip_prefix(':') {
            comment = Some(c.trim().to_string());
        } else if let Some((field, value)) = line.split_once(':') {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = value.parse().ok(),
                "event" => event = Some(value.to_string()),
                "data" => data.push(value.to_string()),
                _ => {}
            }
        }
    }
    if !data.is_empty() || event.is_some() {
        return Some(Frame::Event {
            id,
            event,
            data: data.join("\n"),
        });
    }
    comment.map(Frame::Comment)
}

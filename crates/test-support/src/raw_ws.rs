//! A WebSocket client that writes frames by hand: what an attacker sends (a header declaring
//! a frame far past the limit, a message trickled a byte at a time) and a real client library
//! would not.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upgraded socket, written to and read from by hand.
pub struct RawWs {
    pub stream: TcpStream,
}

/// What the node's side of the socket came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// A close frame: its code and reason.
    Closed(u16, String),
    /// The connection ended with no close frame.
    Dropped,
    /// Nothing within the time given.
    Silent,
}

impl RawWs {
    /// Upgrades `path` on the node at `addr` (host:port), with extra request headers.
    pub async fn connect(
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<RawWs> {
        let mut stream = TcpStream::connect(addr).await?;
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await? == 0 {
                return Err(std::io::Error::other("closed during the upgrade"));
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(std::io::Error::other(format!("not upgraded: {head}")));
        }
        Ok(RawWs { stream })
    }

    /// Writes a masked frame header declaring `len` payload bytes (opcode 2, binary).
    pub async fn header(&mut self, opcode: u8, len: u64) -> std::io::Result<()> {
        let mut h = vec![0x80 | opcode];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=65535 => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&len.to_be_bytes());
            }
        }
        h.extend_from_slice(&[0, 0, 0, 0]); // a zero mask: the payload goes as written
        self.stream.write_all(&h).await
    }

    /// A whole masked frame.
    pub async fn frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        self.header(opcode, payload.len() as u64).await?;
        self.stream.write_all(payload).await
    }

    /// Writes up to `total` zero bytes of payload in chunks, stopping when the node stops
    /// reading (the write fails or stalls). Returns the bytes written.
    pub async fn stream_zeros(&mut self, total: usize) -> usize {
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            let write = self.stream.write_all(&chunk[..n]);
            match tokio::time::timeout(Duration::from_secs(2), write).await {
                Ok(Ok(())) => sent += n,
                _ => break,
            }
        }
        sent
    }

    /// Reads the node's frames until a close frame or the end, within `within`.
    pub async fn ending(&mut self, within: Duration) -> Ending {
        match tokio::time::timeout(within, self.read_until_close()).await {
            Ok(ending) => ending,
            Err(_) => Ending::Silent,
        }
    }

    async fn read_until_close(&mut self) -> Ending {
        loop {
            let mut h = [0u8; 2];
            if self.stream.read_exact(&mut h).await.is_err() {
                return Ending::Dropped;
            }
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    if self.stream.read_exact(&mut b).await.is_err() {
                        return Ending::Dropped;
                    }
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    if self.stream.read_exact(&mut b).await.is_err() {
                        return Ending::Dropped;
                    }
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; len.min(1 << 24) as usize];
            if self.stream.read_exact(&mut payload).await.is_err() {
                return Ending::Dropped;
            }
            if h[0] & 0x0f == 0x8 {
                let code = payload
                    .get(..2)
                    .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                return Ending::Closed(code, reason.to_string());
            }
        }
    }
}

//! A fault-injecting TCP proxy placed on a mesh link: it forwards bytes until told to cut the
//! link (connections dropped, new ones refused) or to black-hole it (connections stay open but
//! nothing passes, as in a silent network partition), and to heal.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct Inner {
    upstream: Mutex<Option<String>>,
    closed: AtomicBool,
    frozen: AtomicBool,
    conns: Mutex<Vec<AbortHandle>>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let inner = Arc::new(Inner::default());
        let state = inner.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = state.upstream.lock().unwrap().clone();
                let Some(upstream) = upstream.filter(|_| !state.closed.load(Ordering::SeqCst))
                else {
                    drop(client);
                    continue;
                };
                let conn_state = state.clone();
                let task = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let a = pump(cr, sw, conn_state.clone());
                        let b = pump(sr, cw, conn_state);
                        tokio::select! { _ = a => {}, _ = b => {} }
                    }
                });
                state.conns.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            addr,
            inner,
            accept,
        }
    }

    /// The WebSocket URL a node lists as its peer.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Forwards to the node at `base` (`http://host:port`).
    pub fn target(&self, base: &str) {
        let hostport = base.trim_start_matches("http://").to_string();
        *self.inner.upstream.lock().unwrap() = Some(hostport);
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        for c in self.inner.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Lets nothing through but keeps connections open, and refuses new ones.
    pub fn blackhole(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.frozen.store(true, Ordering::SeqCst);
    }

    /// Connections it is carrying (or holding in a black hole) right now.
    pub fn open_connections(&self) -> usize {
        let mut conns = self.inner.conns.lock().unwrap();
        conns.retain(|c| !c.is_finished());
        conns.len()
    }

    pub fn heal(&self) {
        // Connections held in a black hole are dropped: their peers declared them dead.
        if self.inner.frozen.swap(false, Ordering::SeqCst) {
            for c in self.inner.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
        self.inner.closed.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<Inner>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if state.frozen.load(Ordering::SeqCst) {
            // Bytes sent into a black hole are lost, as on a dead network; reading on lets
            // the proxy see an end that closes its socket.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

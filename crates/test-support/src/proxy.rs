//! A fault-injecting TCP proxy placed on a mesh link: it forwards bytes until told to cut the
//! link (connections dropped, new ones refused) or to black-hole it (connections stay open but
//! nothing passes, as in a silent network partition), and to heal. It can also hold every byte
//! for a while each way, as a wide-area link does (`set_delay`), and counts what it carries.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct Inner {
    upstream: Mutex<Option<String>>,
    closed: AtomicBool,
    frozen: AtomicBool,
    conns: Mutex<Vec<AbortHandle>>,
    /// Microseconds each byte is held, each way.
    delay_us: AtomicU64,
    /// Bytes carried, both ways.
    carried: AtomicU64,
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
                        // As a router would: no Nagle wait of its own on either leg.
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
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

    /// Holds every byte `one_way` before passing it on, in both directions (order kept).
    pub fn set_delay(&self, one_way: Duration) {
        self.inner
            .delay_us
            .store(one_way.as_micros() as u64, Ordering::SeqCst);
    }

    /// Bytes carried both ways since the last call (the counter starts again).
    pub fn take_carried(&self) -> u64 {
        self.inner.carried.swap(0, Ordering::SeqCst)
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

/// Copies `from` to `to`, each chunk held for the proxy's delay: the reader stamps when a chunk
/// may leave, the writer waits for that time, so a delay adds latency without limiting
/// throughput. Both halves live in this task, so aborting the connection stops both.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<Inner>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
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
            state.carried.fetch_add(n as u64, Ordering::Relaxed);
            let delay = Duration::from_micros(state.delay_us.load(Ordering::Relaxed));
            if tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async {
        while let Some((due, bytes)) = rx.recv().await {
            // A timer rounds up to its next tick: a chunk already due goes at once, or a busy
            // link would fall behind by a tick per chunk.
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    // The reader's end lets the writer pass on what it holds (the sender is dropped with the
    // reader); the writer's end (the other side gone) ends both.
    tokio::pin!(reader, writer);
    tokio::select! {
        _ = &mut writer => {}
        _ = &mut reader => writer.await,
    }
}

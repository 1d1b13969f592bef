//! A WebSocket's two tasks, shared by mesh links, browser sessions and automerge-repo
//! connections: a reader that hands frames to the session actor and a writer that drains the
//! actor's bounded outgoing queue.
//! The actor only sees [`Inbound`] messages and pushes [`Out`] frames; it does not know whether
//! the socket is an actix-ws server session or an awc client connection.
//!
//! Both tasks run on the arbiter that accepted or opened the socket (awc's socket is not
//! `Send`). The writer stops, closing the socket, when the actor drops its shutdown sender.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use actix_web::web::Bytes;
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

mod no_delay;
mod reader;

pub use no_delay::NoDelay;
pub use reader::{FrameLimit, FrameReader, MemoryBudget, Read, ReadLimits, Reservation};

#[derive(Debug)]
pub enum Out {
    Text(Arc<str>),
    /// A frame shared by many sockets (a browser room's update): queued without a copy. Its
    /// charge, if any, counts its bytes as queued until the frame is written or dropped.
    Shared(ByteString, Option<Charge>),
    /// A binary frame (automerge-repo's CBOR messages), with its charge, as for `Shared`.
    Binary(Bytes, Option<Charge>),
    Ping(Bytes),
    Pong(Bytes),
    Close(u16, String),
}

/// What the reader hands the session.
#[derive(actix::Message, Debug)]
#[rtype(result = "()")]
pub enum Inbound {
    Text(String),
    /// A binary frame (the automerge-repo protocol's; the JSON protocols reject them).
    Binary(Bytes),
    Pong(Bytes),
    Closed(Option<String>),
}

/// The tasks' ends of a link's queues; the session holds the matching senders.
pub struct Channels {
    pub(crate) out: mpsc::Sender<Out>,
    pub(crate) rx: mpsc::Receiver<Out>,
    pub(crate) stop: oneshot::Receiver<(u16, String)>,
}

/// Stops a socket's writer: sent, it closes the socket with that code and reason even when
/// the queue is full; dropped, with the close frame queued last, if any.
pub type Shutdown = oneshot::Sender<(u16, String)>;

/// A link's queues: the tasks' ends, the outgoing queue and the shutdown sender.
pub fn channels(capacity: usize) -> (Channels, mpsc::Sender<Out>, Shutdown) {
    let (out, rx) = mpsc::channel(capacity);
    let (shutdown, stop) = oneshot::channel();
    (
        Channels {
            out: out.clone(),
            rx,
            stop,
        },
        out,
        shutdown,
    )
}

pub(crate) fn close_reason(code: u16, reason: String) -> awc::ws::CloseReason {
    awc::ws::CloseReason {
        code: awc::ws::CloseCode::from(code),
        description: Some(reason),
    }
}

/// How long a closing link may take to send its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The sending half of a link's socket.
pub(crate) trait LinkSink {
    /// Sends one frame; false if the socket is gone.
    async fn send(&mut self, out: Out) -> bool;
    async fn close(self, reason: Option<(u16, String)>);
}

/// Drains the session's queue into the socket until the session stops or the socket fails,
/// then closes the socket and stops the reader. A stopped session's queue is dropped, save
/// its close frame: a silent or slow peer must not keep a dead link's socket and tasks alive.
pub(crate) async fn write_loop<S: LinkSink>(
    mut sink: S,
    mut rx: mpsc::Receiver<Out>,
    mut stop: oneshot::Receiver<(u16, String)>,
    reader: AbortHandle,
) {
    let close = loop {
        let item = tokio::select! {
            biased;
            why = &mut stop => break why.ok().or_else(|| last_close(&mut rx)),
            item = rx.recv() => item,
        };
        let out = match item {
            None => break None,
            Some(Out::Close(code, reason)) => break Some((code, reason)),
            Some(out) => out,
        };
        let sent = tokio::select! {
            biased;
            why = &mut stop => break why.ok().or_else(|| last_close(&mut rx)),
            sent = sink.send(out) => sent,
        };
        if !sent {
            reader.abort();
            return;
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close(close)).await;
    reader.abort();
}

/// How long a closing session's queued frames may take to go out before its close.
const SESSION_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Closes a session's socket with a code and reason. Frames already queued (an error saying
/// why) go first if the queue has room, within a short grace; past a full queue the close
/// goes at once.
pub fn close_session(out: &mpsc::Sender<Out>, shutdown: Shutdown, code: u16, reason: String) {
    match out.try_send(Out::Close(code, reason.clone())) {
        // The writer sends the queue, then the close; the shutdown sender is kept a moment
        // so that the session actor stopping does not cut the queue short.
        Ok(()) => {
            actix_web::rt::spawn(async move {
                tokio::time::sleep(SESSION_CLOSE_GRACE).await;
                drop(shutdown);
            });
        }
        Err(_) => {
            let _ = shutdown.send((code, reason));
        }
    }
}

/// The close frame a stopping session queued, if any; everything else queued is dropped.
fn last_close(rx: &mut mpsc::Receiver<Out>) -> Option<(u16, String)> {
    while let Ok(out) = rx.try_recv() {
        if let Out::Close(code, reason) = out {
            return Some((code, reason));
        }
    }
    None
}

/// What became of a message queued for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Sent,
    /// An ephemeral message dropped: the connection is behind, and cursors can wait.
    Dropped,
    /// The connection is too far behind: it must be closed (it resyncs when it reconnects).
    TooSlow,
    Closed,
}

/// Bytes queued for sockets and not yet written, in all: fan-out (a room's update, an
/// ephemeral message relayed to every member) is counted across receivers, not per receiver
/// only. Cheap to clone.
#[derive(Clone, Debug)]
pub struct OutgoingBudget {
    queued: Arc<AtomicUsize>,
    limit: usize,
}

impl OutgoingBudget {
    pub fn new(limit: usize) -> Self {
        OutgoingBudget {
            queued: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }
}

/// One session's queued bytes, and the node's.
#[derive(Debug)]
pub struct QueuedBytes {
    session: AtomicUsize,
    node: Arc<AtomicUsize>,
}

impl QueuedBytes {
    fn add(&self, len: usize) {
        self.session.fetch_add(len, Ordering::Relaxed);
        self.node.fetch_add(len, Ordering::Relaxed);
    }

    fn sub(&self, len: usize) {
        self.session.fetch_sub(len, Ordering::Relaxed);
        self.node.fetch_sub(len, Ordering::Relaxed);
    }

    fn session(&self) -> usize {
        self.session.load(Ordering::Relaxed)
    }

    fn node(&self) -> usize {
        self.node.load(Ordering::Relaxed)
    }
}

/// Bytes of one queued frame, counted against its session and the node until the frame is
/// written or dropped (a stopped session's queue is dropped unwritten).
#[derive(Debug)]
pub struct Charge {
    len: usize,
    to: Arc<QueuedBytes>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.to.sub(self.len);
    }
}

/// A session's outgoing queue as the rooms that feed it see it, bounded in frames and in
/// bytes: a client that does not read holds at most `max_bytes` of this node's memory, whatever
/// others send it; and all sessions together hold at most the node's [`OutgoingBudget`]:
/// past half of it droppable messages (ephemeral) are dropped, past all of it a session
/// already behind is too slow. Shared by browser sessions and automerge-repo connections.
#[derive(Clone)]
pub struct Outbox {
    out: mpsc::Sender<Out>,
    pending: Arc<QueuedBytes>,
    max_bytes: usize,
    /// The node's [`OutgoingBudget`] (its count is `pending.node`).
    node_limit: usize,
}

impl Outbox {
    pub fn new(out: mpsc::Sender<Out>, max_bytes: usize, node: &OutgoingBudget) -> Self {
        Outbox {
            out,
            pending: Arc::new(QueuedBytes {
                session: AtomicUsize::new(0),
                node: node.queued.clone(),
            }),
            max_bytes,
            node_limit: node.limit,
        }
    }

    /// Whether a droppable message of about `len` bytes would be dropped now.
    pub fn behind(&self, len: usize) -> bool {
        let behind = self.pending.session().saturating_add(len);
        let node = self.pending.node().saturating_add(len);
        behind > self.max_bytes / 4 * 3
            || node > self.node_limit / 2
            || self.out.capacity() < self.out.max_capacity() / 4
    }

    /// Queues a binary frame (automerge-repo); `droppable` frames give way first.
    pub fn binary(&self, bytes: Vec<u8>, droppable: bool) -> Queued {
        self.queue(bytes.len(), droppable, |pending| {
            Out::Binary(bytes.into(), Some(pending))
        })
    }

    /// Queues a text frame shared with other sessions (a browser room's update).
    pub fn shared(&self, text: &ByteString) -> Queued {
        self.queue(text.len(), false, |pending| {
            Out::Shared(text.clone(), Some(pending))
        })
    }

    fn queue(&self, len: usize, droppable: bool, frame: impl FnOnce(Charge) -> Out) -> Queued {
        if droppable && self.behind(len) {
            return Queued::Dropped;
        }
        let queued = self.pending.session();
        // One frame larger than the budget still goes to a session that is keeping up (a
        // first sync of a large run, a run's whole state).
        let over_session = queued.saturating_add(len) > self.max_bytes;
        let over_node = self.pending.node().saturating_add(len) > self.node_limit;
        if queued > 0 && (over_session || over_node) {
            return Queued::TooSlow;
        }
        self.pending.add(len);
        let charge = Charge {
            len,
            to: self.pending.clone(),
        };
        // A frame not queued is dropped here, and its charge with it.
        match self.out.try_send(frame(charge)) {
            Ok(()) => Queued::Sent,
            Err(mpsc::error::TrySendError::Full(_)) => Queued::TooSlow,
            Err(mpsc::error::TrySendError::Closed(_)) => Queued::Closed,
        }
    }
}

struct ServerSink(actix_ws::Session);

impl LinkSink for ServerSink {
    async fn send(&mut self, out: Out) -> bool {
        match out {
            Out::Text(t) => self.0.text(t.to_string()).await.is_ok(),
            Out::Shared(t, _) => self.0.text(t).await.is_ok(),
            Out::Binary(b, _) => self.0.binary(b).await.is_ok(),
            Out::Ping(b) => self.0.ping(&b).await.is_ok(),
            Out::Pong(b) => self.0.pong(&b).await.is_ok(),
            Out::Close(..) => true,
        }
    }

    async fn close(self, reason: Option<(u16, String)>) {
        let _ = self.0.close(reason.map(|(c, r)| close_reason(c, r))).await;
    }
}

/// Upgrades a request to a WebSocket: the response, the session that writes frames, and the
/// request's payload, which [`serve`] reads itself (see `reader`: actix-ws's own reader
/// buffers whatever arrives before looking at a frame's length).
pub async fn upgrade(
    req: &actix_web::HttpRequest,
    body: actix_web::web::Payload,
) -> Result<
    (
        actix_web::HttpResponse,
        actix_ws::Session,
        actix_web::web::Payload,
    ),
    actix_web::Error,
> {
    use actix_web::FromRequest;
    let unused =
        actix_web::web::Payload::from_request(req, &mut actix_web::dev::Payload::None).await?;
    let (response, session, _unused_stream) = actix_ws::handle(req, unused)?;
    Ok((response, session, body))
}

/// Runs an accepted socket over an actix-ws session, feeding `actor` what `payload` brings,
/// read within `limits`.
pub fn serve(
    session: actix_ws::Session,
    payload: actix_web::web::Payload,
    limits: ReadLimits,
    actor: Recipient<Inbound>,
    io: Channels,
) {
    let Channels { out, rx, stop } = io;
    let mut frames = FrameReader::new(payload, limits);
    let reader = actix_web::rt::spawn(async move {
        let reason = loop {
            let inbound = match frames.next().await {
                Read::Text(t) => Inbound::Text(t),
                Read::Binary(b) => Inbound::Binary(b),
                Read::Ping(b) => {
                    let _ = out.try_send(Out::Pong(b));
                    continue;
                }
                Read::Pong(b) => Inbound::Pong(b),
                Read::Closed(reason) => break reason,
                Read::Refused(code, reason) => {
                    // Queued last: the writer sends it when the session stops.
                    let _ = out.try_send(Out::Close(code, reason.clone()));
                    break Some(format!("refused ({code}): {reason}"));
                }
            };
            if actor.send(inbound).await.is_err() {
                return;
            }
        };
        actor.do_send(Inbound::Closed(reason));
    });
    actix_web::rt::spawn(write_loop(
        ServerSink(session),
        rx,
        stop,
        reader.abort_handle(),
    ));
}

pub(crate) fn describe(r: awc::ws::CloseReason) -> String {
    let code: u16 = r.code.into();
    format!(
        "closed by peer ({code}{})",
        r.description.map(|d| format!(": {d}")).unwrap_or_default()
    )
}

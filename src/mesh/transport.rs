//! The two ends of a mesh link as the same pair of tasks: a reader that hands frames to the
//! link's [`PeerSession`] and a writer that drains the session's outgoing queue. An inbound
//! link is an actix-ws server session, an outbound one an awc client connection; above this
//! module the session does not know which.
//!
//! Both tasks run on the arbiter that accepted or opened the socket (awc's socket is not
//! `Send`). The writer stops, closing the socket, when the session drops its shutdown sender.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::web::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use super::directory::LinkStats;
use super::session::PeerSession;
use crate::metrics::Metrics;

/// Frames queued per link; a peer that lets more pile up is too slow and is dropped.
pub const QUEUE: usize = 4096;

#[derive(Debug, Clone)]
pub enum Out {
    Text(Arc<str>),
    Ping(Bytes),
    Pong(Bytes),
    Close(u16, String),
}

/// Why a frame was not queued on a link.
#[derive(Debug, PartialEq, Eq)]
pub enum NotQueued {
    /// Over the peers' frame limit: the peer would drop the link on it, at every reconnect.
    TooLarge,
    /// The peer cannot keep up.
    Full,
    Closed,
}

/// Queues one text frame on a link and counts it (`sync` frames in `crdt_sync_messages_total`,
/// a refused oversized one in `crdt_sync_failures_total`). The caller decides what a refusal
/// means for the link.
pub fn queue_text(
    out: &mpsc::Sender<Out>,
    stats: &LinkStats,
    metrics: &Metrics,
    max_frame: usize,
    text: Arc<str>,
    sync: bool,
) -> Result<(), NotQueued> {
    if text.len() > max_frame {
        metrics
            .sync_failures
            .with_label_values(&["too_large"])
            .inc();
        return Err(NotQueued::TooLarge);
    }
    match out.try_send(Out::Text(text)) {
        Ok(()) => {
            stats.messages_out.fetch_add(1, Ordering::Relaxed);
            if sync {
                metrics.sync_messages.with_label_values(&["out"]).inc();
            }
            Ok(())
        }
        Err(mpsc::error::TrySendError::Full(_)) => Err(NotQueued::Full),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(NotQueued::Closed),
    }
}

/// What the reader hands the session.
#[derive(actix::Message, Debug)]
#[rtype(result = "()")]
pub enum Inbound {
    Text(String),
    /// The protocol is text only; binary frames are rejected by size.
    Binary(usize),
    Pong(Bytes),
    Closed(Option<String>),
}

/// The tasks' ends of a link's queues; the session holds the matching senders.
pub struct Channels {
    out: mpsc::Sender<Out>,
    rx: mpsc::Receiver<Out>,
    stop: oneshot::Receiver<()>,
}

/// A link's queues: the tasks' ends, the outgoing queue and the shutdown sender.
pub fn channels() -> (Channels, mpsc::Sender<Out>, oneshot::Sender<()>) {
    let (out, rx) = mpsc::channel(QUEUE);
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

fn close_reason(code: u16, reason: String) -> awc::ws::CloseReason {
    awc::ws::CloseReason {
        code: awc::ws::CloseCode::from(code),
        description: Some(reason),
    }
}

/// How long a closing link may take to send its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The sending half of a link's socket.
trait LinkSink {
    /// Sends one frame; false if the socket is gone.
    async fn send(&mut self, out: Out) -> bool;
    async fn close(self, reason: Option<(u16, String)>);
}

/// Drains the session's queue into the socket until the session stops or the socket fails,
/// then closes the socket and stops the reader. A stopped session's queue is dropped, save
/// its close frame: a silent or slow peer must not keep a dead link's socket and tasks alive.
async fn write_loop<S: LinkSink>(
    mut sink: S,
    mut rx: mpsc::Receiver<Out>,
    mut stop: oneshot::Receiver<()>,
    reader: AbortHandle,
) {
    let close = loop {
        let item = tokio::select! {
            biased;
            _ = &mut stop => break last_close(&mut rx),
            item = rx.recv() => item,
        };
        let out = match item {
            None => break None,
            Some(Out::Close(code, reason)) => break Some((code, reason)),
            Some(out) => out,
        };
        let sent = tokio::select! {
            biased;
            _ = &mut stop => break last_close(&mut rx),
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

/// The close frame a stopping session queued, if any; everything else queued is dropped.
fn last_close(rx: &mut mpsc::Receiver<Out>) -> Option<(u16, String)> {
    while let Ok(out) = rx.try_recv() {
        if let Out::Close(code, reason) = out {
            return Some((code, reason));
        }
    }
    None
}

struct ServerSink(actix_ws::Session);

impl LinkSink for ServerSink {
    async fn send(&mut self, out: Out) -> bool {
        match out {
            Out::Text(t) => self.0.text(t.to_string()).await.is_ok(),
            Out::Ping(b) => self.0.ping(&b).await.is_ok(),
            Out::Pong(b) => self.0.pong(&b).await.is_ok(),
            Out::Close(..) => true,
        }
    }

    async fn close(self, reason: Option<(u16, String)>) {
        let _ = self.0.close(reason.map(|(c, r)| close_reason(c, r))).await;
    }
}

/// Runs an inbound link over an actix-ws session.
pub fn serve(
    session: actix_ws::Session,
    stream: actix_ws::MessageStream,
    max_frame: usize,
    addr: Addr<PeerSession>,
    io: Channels,
) {
    let Channels { out, rx, stop } = io;
    let mut stream = stream
        .max_frame_size(max_frame)
        .aggregate_continuations()
        .max_continuation_size(max_frame);
    let reader = actix_web::rt::spawn(async move {
        use actix_ws::AggregatedMessage as M;
        let reason = loop {
            let inbound = match stream.recv().await {
                Some(Ok(M::Text(t))) => Inbound::Text(t.to_string()),
                Some(Ok(M::Binary(b))) => Inbound::Binary(b.len()),
                Some(Ok(M::Ping(b))) => {
                    let _ = out.try_send(Out::Pong(b));
                    continue;
                }
                Some(Ok(M::Pong(b))) => Inbound::Pong(b),
                Some(Ok(M::Close(r))) => break r.map(describe).or(Some("closed by peer".into())),
                Some(Err(e)) => break Some(format!("protocol error: {e}")),
                None => break None,
            };
            if addr.send(inbound).await.is_err() {
                return;
            }
        };
        addr.do_send(Inbound::Closed(reason));
    });
    actix_web::rt::spawn(write_loop(
        ServerSink(session),
        rx,
        stop,
        reader.abort_handle(),
    ));
}

fn describe(r: awc::ws::CloseReason) -> String {
    let code: u16 = r.code.into();
    format!(
        "closed by peer ({code}{})",
        r.description.map(|d| format!(": {d}")).unwrap_or_default()
    )
}

pub type ClientSocket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

struct ClientSink(futures_util::stream::SplitSink<ClientSocket, awc::ws::Message>);

impl LinkSink for ClientSink {
    async fn send(&mut self, out: Out) -> bool {
        use awc::ws::Message;
        let message = match out {
            Out::Text(t) => Message::Text(t.to_string().into()),
            Out::Ping(b) => Message::Ping(b),
            Out::Pong(b) => Message::Pong(b),
            Out::Close(..) => return true,
        };
        self.0.send(message).await.is_ok()
    }

    async fn close(mut self, reason: Option<(u16, String)>) {
        let reason = reason.map(|(c, r)| close_reason(c, r));
        let _ = self.0.send(awc::ws::Message::Close(reason)).await;
        let _ = self.0.close().await;
    }
}

/// Runs an outbound link over an awc client connection.
pub fn client(socket: ClientSocket, addr: Addr<PeerSession>, io: Channels) {
    use awc::ws::Frame;
    let Channels { out, rx, stop } = io;
    let (sink, mut stream) = socket.split();
    let reader = actix_web::rt::spawn(async move {
        let reason = loop {
            let inbound = match stream.next().await {
                Some(Ok(Frame::Text(t))) => match String::from_utf8(t.to_vec()) {
                    Ok(s) => Inbound::Text(s),
                    Err(_) => Inbound::Binary(t.len()),
                },
                Some(Ok(Frame::Binary(b))) => Inbound::Binary(b.len()),
                Some(Ok(Frame::Continuation(_))) => Inbound::Binary(0),
                Some(Ok(Frame::Ping(b))) => {
                    let _ = out.try_send(Out::Pong(b));
                    continue;
                }
                Some(Ok(Frame::Pong(b))) => Inbound::Pong(b),
                Some(Ok(Frame::Close(r))) => {
                    break r.map(describe).or(Some("closed by peer".into()))
                }
                Some(Err(e)) => break Some(format!("protocol error: {e}")),
                None => break None,
            };
            if addr.send(inbound).await.is_err() {
                return;
            }
        };
        addr.do_send(Inbound::Closed(reason));
    });
    actix_web::rt::spawn(write_loop(
        ClientSink(sink),
        rx,
        stop,
        reader.abort_handle(),
    ));
}

//! The mesh's side of a link's socket: queueing frames with the mesh's accounting, and the
//! outbound end as an awc client connection (the inbound end is [`crate::socket::serve`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::Addr;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::directory::LinkStats;
use super::session::PeerSession;
use crate::metrics::Metrics;
use crate::socket::{close_reason, describe, write_loop, Channels, Inbound, LinkSink, Out};

/// Frames queued per link; a peer that lets more pile up is too slow and is dropped.
pub const QUEUE: usize = 4096;

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

pub type ClientSocket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

struct ClientSink(futures_util::stream::SplitSink<ClientSocket, awc::ws::Message>);

impl LinkSink for ClientSink {
    async fn send(&mut self, out: Out) -> bool {
        use awc::ws::Message;
        let message = match out {
            Out::Text(t) => Message::Text(t.to_string().into()),
            Out::Shared(t, _) => Message::Text(t),
            Out::Binary(b, _) => Message::Binary(b),
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
                    Err(_) => Inbound::Binary(t),
                },
                Some(Ok(Frame::Binary(b))) => Inbound::Binary(b),
                Some(Ok(Frame::Continuation(_))) => Inbound::Binary(actix_web::web::Bytes::new()),
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

//! The two ends of a mesh link as the same pair of tasks: a reader that hands frames to the
//! link's [`PeerSession`] and a writer that drains the session's outgoing queue. An inbound
//! link is an actix-ws server session, an outbound one an awc client connection; above this
//! module the session does not know which.
//!
//! Both tasks run on the arbiter that accepted or opened the socket (awc's socket is not
//! `Send`). The writer stops, closing the socket, when the session drops its shutdown sender.

use std::sync::Arc;

use actix::Addr;
use actix_web::web::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::session::PeerSession;

/// Frames queued per link; a peer that lets more pile up is too slow and is dropped.
pub const QUEUE: usize = 4096;

#[derive(Debug, Clone)]
pub enum Out {
    Text(Arc<str>),
    Ping(Bytes),
    Pong(Bytes),
    Close(u16, String),
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

/// Runs an inbound link over an actix-ws session.
pub fn serve(
    mut session: actix_ws::Session,
    stream: actix_ws::MessageStream,
    max_frame: usize,
    addr: Addr<PeerSession>,
    io: Channels,
) {
    let Channels {
        out,
        mut rx,
        mut stop,
    } = io;
    actix_web::rt::spawn(async move {
        loop {
            // Queued frames first: a close frame with its reason must go out before shutdown.
            let item = tokio::select! {
                biased;
                item = rx.recv() => item,
                _ = &mut stop => None,
            };
            let sent = match item {
                Some(Out::Text(t)) => session.text(t.to_string()).await,
                Some(Out::Ping(b)) => session.ping(&b).await,
                Some(Out::Pong(b)) => session.pong(&b).await,
                Some(Out::Close(code, reason)) => {
                    let _ = session.close(Some(close_reason(code, reason))).await;
                    return;
                }
                None => {
                    let _ = session.close(None).await;
                    return;
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    let mut stream = stream
        .max_frame_size(max_frame)
        .aggregate_continuations()
        .max_continuation_size(max_frame);
    actix_web::rt::spawn(async move {
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
}

fn describe(r: awc::ws::CloseReason) -> String {
    let code: u16 = r.code.into();
    format!(
        "closed by peer ({code}{})",
        r.description.map(|d| format!(": {d}")).unwrap_or_default()
    )
}

pub type ClientSocket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

/// Runs an outbound link over an awc client connection.
pub fn client(socket: ClientSocket, addr: Addr<PeerSession>, io: Channels) {
    use awc::ws::{Frame, Message};
    let Channels {
        out,
        mut rx,
        mut stop,
    } = io;
    let (mut sink, mut stream) = socket.split();
    actix_web::rt::spawn(async move {
        loop {
            // Queued frames first: a close frame with its reason must go out before shutdown.
            let item = tokio::select! {
                biased;
                item = rx.recv() => item,
                _ = &mut stop => None,
            };
            let message = match item {
                Some(Out::Text(t)) => Message::Text(t.to_string().into()),
                Some(Out::Ping(b)) => Message::Ping(b),
                Some(Out::Pong(b)) => Message::Pong(b),
                Some(Out::Close(code, reason)) => {
                    let _ = sink
                        .send(Message::Close(Some(close_reason(code, reason))))
                        .await;
                    let _ = sink.close().await;
                    return;
                }
                None => {
                    let _ = sink.send(Message::Close(None)).await;
                    let _ = sink.close().await;
                    return;
                }
            };
            if sink.send(message).await.is_err() {
                return;
            }
        }
    });
    actix_web::rt::spawn(async move {
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
}

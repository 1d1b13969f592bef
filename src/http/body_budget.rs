//! Request bodies within the node's incoming budget and in time.
//!
//! actix-web bounds a body's size, not how long it may take or how many are held at once: a
//! client sending a byte every 5 s held its connection for ever, and 20,000 such clients
//! exhausted the node's file descriptors. Every body is charged, as it arrives, to the same
//! node-wide budget as WebSocket messages (503 when it has no room) and must arrive whole
//! within the message deadline once begun (408). WebSocket upgrades are left to the socket
//! reader, which bounds their frames the same way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::HttpMessage;
use futures_util::Stream;

use super::AppState;
use crate::socket::Reservation;

/// Wraps every request's body (but a WebSocket upgrade's) in a budgeted, timed stream.
pub async fn budgeted(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    // Only a GET upgrades (actix reads any other request carrying the header to the end of
    // the connection: that body is budgeted like any other).
    let upgrade = req.method() == actix_web::http::Method::GET
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let headers = req.headers();
    let bodiless = match headers.get(header::CONTENT_LENGTH) {
        Some(length) => length.as_bytes() == b"0",
        None => headers.get(header::TRANSFER_ENCODING).is_none(),
    };
    if upgrade || bodiless {
        return next.call(req).await;
    }
    let incoming = req
        .app_data::<web::Data<AppState>>()
        .map(|app| (app.incoming.budget.reservation(), app.incoming.deadline));
    if let Some((held, within)) = incoming {
        let body = Budgeted {
            inner: req.take_payload(),
            held,
            bytes: 0,
            started: Instant::now(),
            deadline: None,
            within,
        };
        req.set_payload(Payload::Stream {
            payload: Box::pin(body),
        });
    }
    next.call(req).await
}

struct Budgeted {
    inner: Payload,
    held: Reservation,
    bytes: usize,
    started: Instant,
    /// Armed the first time the body is not all there: most bodies arrive in one read, and
    /// they need no timer.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    within: std::time::Duration,
}

/// What a refused body reads as; `error::json_error` answers 408 and 503 from these.
pub fn is_timeout(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
}

pub fn is_over_budget(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::OutOfMemory
}

impl Stream for Budgeted {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.bytes += chunk.len();
                if !this.held.grow_to(this.bytes) {
                    return Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(
                        io::ErrorKind::OutOfMemory,
                        this.held.refusal(),
                    )))));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Pending => {
                let at = this.started + this.within;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the request body did not arrive in time",
                    )))));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

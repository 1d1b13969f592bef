//! A browser session for a run another pod of the region owns: the socket is relayed, frame
//! for frame, to the same door on the owner (`runs::ownership`), which runs the session. The
//! client never learns which pod serves it.
//!
//! This pod still admits the socket at its own door (its place among unproven sockets, with
//! the client's own address, and a seat among open sessions), reads the client's frames within
//! the same limits, and gives the unproven place up when the owner first answers — which it
//! does only once the client has joined.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse};
use awc::ws::{Frame, Message};
use futures_util::{SinkExt, StreamExt};

use super::forward::FORWARDED_BY;
use crate::edge_kit::Seat;
use crate::socket::{FrameReader, Read, ReadLimits};
use run_store::Owner;

/// The largest frame the owner may send through the relay. The owner bounds what it queues
/// for the client already (its outgoing budget); a run's whole state can be megabytes.
const MAX_OWNER_FRAME: usize = 64 * 1024 * 1024;

/// How long the owner has to accept the relayed socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Headers the owner's door looks at.
const PASSED: [&str; 3] = ["authorization", "origin", "user-agent"];
/// The client's own address, on a relayed upgrade the region's proof vouches for: the owner
/// admits the socket by it (else every relayed client would share this pod's address).
pub const CLIENT_ADDRESS: &str = "x-crdt-client-address";

/// Whether an upgrade request was relayed by a pod of this region (its proof holds), and if so
/// the client's address it names.
pub fn relayed_for(req: &HttpRequest, secret: Option<&str>) -> Option<Option<std::net::IpAddr>> {
    let secret = secret?;
    let proof = req
        .headers()
        .get(run_wire::cluster::PROOF_HEADER)?
        .to_str()
        .ok()?;
    let promised =
        run_wire::cluster::check_header(secret, proof, super::cluster_link::now_ms(), req.path())?;
    promised.matches(b"").then(|| {
        req.headers()
            .get(CLIENT_ADDRESS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    })
}

/// Opens the relay to the owner; `Err` (the owner did not accept) before the client's upgrade
/// is answered, so the client is answered 503 and retries.
pub async fn connect(
    req: &HttpRequest,
    owner: &Owner,
    member: &str,
    secret: &str,
) -> Result<crate::mesh::transport::ClientSocket, String> {
    let base = owner
        .address
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let client = awc::Client::builder()
        .max_http_version(awc::http::Version::HTTP_11)
        .timeout(CONNECT_TIMEOUT)
        .finish();
    // The region's proof over the path: the owner admits the socket by the client's address,
    // which this pod has already admitted at its own door.
    let proof =
        run_wire::cluster::prove(secret, super::cluster_link::now_ms(), req.uri().path(), b"");
    let mut request = client
        .ws(format!("{base}{path}"))
        .max_frame_size(MAX_OWNER_FRAME)
        .header(FORWARDED_BY, member)
        .header(run_wire::cluster::PROOF_HEADER, proof);
    if let Some(address) = req.peer_addr() {
        request = request.header(CLIENT_ADDRESS, address.ip().to_string());
    }
    for name in PASSED {
        if let Some(value) = req.headers().get(name) {
            request = request.header(name, value.clone());
        }
    }
    let (_, socket) = request.connect().await.map_err(|e| {
        format!(
            "the run's pod at {} refused the session: {e}",
            owner.address
        )
    })?;
    Ok(socket)
}

/// Relays the client's upgraded socket both ways until either end closes.
pub fn relay(
    (response, client, payload): (HttpResponse, actix_ws::Session, actix_web::web::Payload),
    upstream: crate::mesh::transport::ClientSocket,
    (limits, slot): (ReadLimits, Option<crate::admission::PreAuthSlot>),
    seat: Seat,
) -> Result<HttpResponse, actix_web::Error> {
    let (mut to_owner, mut from_owner) = upstream.split();
    let mut frames = FrameReader::new(payload, limits);
    let mut to_client = client.clone();
    actix_web::rt::spawn(async move {
        // The client's frames, read within the door's limits, go on as they came.
        let outbound = async {
            loop {
                let message = match frames.next().await {
                    Read::Text(t) => Message::Text(t.into()),
                    Read::Binary(b) => Message::Binary(b),
                    Read::Ping(b) => Message::Ping(b),
                    Read::Pong(b) => Message::Pong(b),
                    Read::Closed(_) => {
                        let _ = to_owner.send(Message::Close(None)).await;
                        return None;
                    }
                    Read::Refused(code, reason) => {
                        let _ = to_owner.send(Message::Close(None)).await;
                        return Some((code, reason));
                    }
                };
                if to_owner.send(message).await.is_err() {
                    return Some((1011, "the run's pod went away".into()));
                }
            }
        };
        // The owner's frames go to the client; its first one means the client joined.
        let inbound = async {
            let mut slot = slot;
            while let Some(frame) = from_owner.next().await {
                slot.take();
                let sent = match frame {
                    Ok(Frame::Text(t)) => match String::from_utf8(t.to_vec()) {
                        Ok(text) => to_client.text(text).await,
                        Err(_) => return Some((1011, "the run's pod sent bad text".into())),
                    },
                    Ok(Frame::Binary(b)) => to_client.binary(b).await,
                    Ok(Frame::Ping(b)) => to_client.ping(&b).await,
                    Ok(Frame::Pong(b)) => to_client.pong(&b).await,
                    Ok(Frame::Close(reason)) => {
                        return Some(reason.map_or((1000, String::new()), |r| {
                            (r.code.into(), r.description.unwrap_or_default())
                        }))
                    }
                    // The owner's session sends whole messages.
                    Ok(Frame::Continuation(_)) => {
                        return Some((1011, "the run's pod sent a fragmented frame".into()))
                    }
                    Err(e) => return Some((1011, format!("the run's pod failed: {e}"))),
                };
                if sent.is_err() {
                    return None;
                }
            }
            Some((1011, "the run's pod went away".into()))
        };
        let close = tokio::select! {
            why = outbound => why,
            why = inbound => why,
        };
        if let Some((code, reason)) = close {
            let _ = client
                .close(Some(actix_ws::CloseReason {
                    code: code.into(),
                    description: Some(reason),
                }))
                .await;
        }
        drop(seat);
    });
    Ok(response)
}

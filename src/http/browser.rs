//! The browser's WebSocket, `/ws/runs/{runId}` (outside `/api`: a browser cannot set headers on
//! a WebSocket, so the token comes in the `JOIN` frame; an `Authorization` header also works).

use actix_web::{web, HttpRequest, HttpResponse};

use super::error::ApiError;
use super::{auth, validate, AppState};
use crate::edge_kit::NotAdmitted;

/// Largest frame before a session has joined: a JOIN with a token.
const MAX_UNPROVEN_FRAME: usize = 16 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ws/runs/{runId}", web::get().to(session));
}

async fn session(
    app: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let run_id = validate::run_id(&path)?;
    app.origins.check(&req)?;
    let secret = app.cluster_secret.as_deref();
    // Relayed by a pod of this region, which admitted it at its door: admitted here by the
    // client's own address, outside the pool of unproven sockets (it still joins with a token).
    let relayed = super::socket_relay::relayed_for(&req, secret);
    // A bearer token on the upgrade (non-browser clients) stands for JOIN's, and proves the
    // socket before it would take a place among the unproven ones.
    let upgraded = auth::bearer(req.headers()).and_then(|t| app.auth.identify(Some(t)).ok());
    let address = match relayed {
        Some(Some(client)) => Some(client),
        _ => req.peer_addr().map(|a| a.ip()),
    };
    // Upgraded before admission: a request that is no WebSocket must not evict anyone.
    let (response, socket, payload) = crate::socket::upgrade(&req, body).await?;
    let (slot, seat) = match app
        .browser
        .admit(address, upgraded.is_some() || relayed.is_some())
    {
        Ok(admitted) => admitted,
        Err(NotAdmitted::Busy(refused)) => return Ok(super::error::busy(refused)),
        Err(full @ NotAdmitted::Full) => return Err(ApiError::Unavailable(full.to_string()).into()),
    };
    // Before JOIN a frame holds a token at most.
    let (limits, slot) = app
        .incoming
        .admitted(slot, MAX_UNPROVEN_FRAME, app.browser.max_frame());
    // Another pod of the region owns the run: the admitted socket is relayed to it. Looked up
    // and opened only now, so a socket this door refuses costs the owner nothing. The upgrade
    // answer is not sent yet: an owner that does not accept makes it a 503.
    let owner = super::forward::owner_elsewhere(&app, &req, run_id).await;
    if let (Some((owner, member)), Some(secret)) = (owner, secret) {
        let upstream = super::socket_relay::connect(&req, &owner, &member, secret)
            .await
            .map_err(ApiError::Unavailable)?;
        app.metrics.forwarded.with_label_values(&["browser"]).inc();
        return super::socket_relay::relay(
            (response, socket, payload),
            upstream,
            (limits, slot),
            seat,
        );
    }
    app.browser
        .accept((socket, payload, limits), run_id, (slot, seat), upgraded);
    Ok(response)
}

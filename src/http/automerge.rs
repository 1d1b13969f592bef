//! automerge-repo's WebSocket, `/ws/automerge` (outside `/api`: the JS client cannot set
//! headers, so the API token comes as `?token=`; an `Authorization` header also works), and
//! the mapping between runs and document ids, `GET /api/crdt/documents/{documentId}`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::{auth, AppState};
use run_wire::automerge_repo::doc_id;
use run_wire::close;

/// Largest message before a connection has joined: a `join`.
const MAX_UNPROVEN_FRAME: usize = 16 * 1024;

pub fn socket(cfg: &mut web::ServiceConfig) {
    cfg.route("/ws/automerge", web::get().to(connect));
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/documents/{documentId}", web::get().to(document));
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn connect(
    app: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<TokenQuery>,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    // A refused client is still upgraded and told why with a close code: the JS client
    // throws on a failed upgrade (an uncaught exception) instead of retrying.
    app.origins.check(&req)?;
    // Who the token proves; without one (or with a bad one) the client is told so in the
    // protocol (`error`, then close 4001). A verified token proves the socket before it
    // would take a place among the unproven ones.
    let presented = query.token.as_deref().or(auth::bearer(req.headers()));
    let identity = app.auth.identify(presented).map_err(|e| e.to_string());
    let proven = presented.is_some() && identity.is_ok();
    // Upgraded before admission: a request that is no WebSocket must not evict anyone.
    let (response, socket, payload) = crate::socket::upgrade(&req, body).await?;
    let (slot, seat) = match app.automerge.admit(req.peer_addr().map(|a| a.ip()), proven) {
        Ok(admitted) => admitted,
        Err(not_admitted) => {
            let reason = not_admitted.to_string();
            actix_web::rt::spawn(socket.close(Some(actix_ws::CloseReason {
                code: actix_ws::CloseCode::from(close::TRY_AGAIN_LATER),
                description: Some(reason),
            })));
            return Ok(response);
        }
    };
    // Before `join` a message is a join at most.
    let (limits, slot) = app
        .incoming
        .admitted(slot, MAX_UNPROVEN_FRAME, app.automerge.max_frame());
    app.automerge
        .accept((socket, payload, limits), (slot, seat), identity);
    Ok(response)
}

/// Which run a document id (or `automerge:` URL) names.
async fn document(path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let run_id =
        doc_id::decode(&path).map_err(|e| ApiError::invalid("documentId", e.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({
        "runId": run_id,
        "documentId": doc_id::encode(run_id),
        "url": doc_id::url(run_id),
    })))
}

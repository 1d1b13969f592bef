//! automerge-repo's WebSocket, `/ws/automerge` (outside `/api`: the JS client cannot set
//! headers, so the API token comes as `?token=`; an `Authorization` header also works), and
//! the mapping between runs and document ids, `GET /api/crdt/documents/{documentId}`.

use actix_web::{web, HttpRequest, HttpResponse};
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

/// The `?token=` of the upgrade request: none, or one that is not empty. Read by hand, not
/// with a query extractor: a duplicate would be a 400 at the upgrade, which the JS client
/// throws on, where every other refusal is an `error` and close 4001 it can report.
fn query_token(query: &str) -> Result<Option<String>, String> {
    let mut tokens = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let token = tokens.next();
    if tokens.next().is_some() {
        return Err("the token is given more than once (?token=)".into());
    }
    match token {
        Some(t) if t.trim().is_empty() => Err("the token is empty (?token=)".into()),
        other => Ok(other),
    }
}

async fn connect(
    app: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    // A refused client is still upgraded and told why with a close code: the JS client
    // throws on a failed upgrade (an uncaught exception) instead of retrying.
    app.origins.check(&req)?;
    // Who the token proves; without one (or with a bad one) the client is told so in the
    // protocol (`error`, then close 4001). A verified token proves the socket before it
    // would take a place among the unproven ones.
    let (presented, identity) = match query_token(req.query_string()) {
        Ok(token) => {
            let presented = token.or_else(|| auth::bearer(req.headers()).map(String::from));
            let identity = app.auth.identify(presented.as_deref());
            (presented, identity.map_err(|e| e.to_string()))
        }
        Err(reason) => (None, Err(reason)),
    };
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

#[cfg(test)]
mod tests {
    use super::query_token;

    #[test]
    fn the_token_query_is_one_token_or_none() {
        assert_eq!(query_token(""), Ok(None));
        assert_eq!(query_token("other=1"), Ok(None));
        assert_eq!(query_token("token=a%2Bb"), Ok(Some("a+b".into())));
        assert!(query_token("token=a&token=b")
            .unwrap_err()
            .contains("more than once"));
        assert!(query_token("token=").unwrap_err().contains("empty"));
    }
}

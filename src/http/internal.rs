//! `POST /internal/runs/{runId}`: another pod of the region asks this one, the run's owner,
//! to take a step of the run's work (`run_wire::cluster`). Only the region's pods can call it:
//! each call carries an HMAC of the cluster secret over its time, path, body length and digest,
//! checked before the body is read. Without a cluster the route does not exist (404).

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use run_wire::cluster::{check_header, PROOF_HEADER};

use super::cluster_link::now_ms;
use super::error::ApiError;
use super::{validate, AppState};

/// The largest call this pod reads (a peer's sync messages, a region's changes: bounded by the
/// mesh's and the doors' frame limits; a step of several client messages carries at most one
/// frame's worth of changes, `automerge_repo::room::take_step`).
const MAX_CALL: usize = 32 * 1024 * 1024;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/internal/runs/{runId}", web::post().to(call));
}

async fn call(
    app: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    mut body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let Some(secret) = app.cluster_secret.as_deref() else {
        return Err(ApiError::NotFound(format!(
            "no route for POST {}",
            req.path()
        )));
    };
    let run_id = validate::run_id(&path)?;
    let proof = req
        .headers()
        .get(PROOF_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::Unauthorized("a call between pods carries its proof".into()))?;
    // The header's HMAC first: nothing of the body is read for a call no pod made.
    let promised = check_header(secret, proof, now_ms(), req.path())
        .ok_or_else(|| ApiError::Unauthorized("the call's proof does not hold".into()))?;
    if promised.len > MAX_CALL {
        return Err(ApiError::TooLargeContent(format!(
            "a call between pods is at most {MAX_CALL} bytes"
        )));
    }
    let mut bytes = web::BytesMut::with_capacity(promised.len);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if bytes.len() + chunk.len() > promised.len {
            return Err(ApiError::BadRequest(
                "the body is longer than its proof says".into(),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    if !promised.matches(&bytes) {
        return Err(ApiError::Unauthorized(
            "the body is not the one proved".into(),
        ));
    }
    let reply = app.runs.serve_call(run_id, &bytes).await;
    Ok(HttpResponse::Ok()
        .content_type("application/cbor")
        .body(reply))
}

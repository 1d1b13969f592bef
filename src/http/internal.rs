//! `POST /internal/runs/{runId}`: another pod of the region asks this one, the run's owner,
//! to take a step of the run's work (`run_wire::cluster`). Only the region's pods can call it:
//! each call carries an HMAC of the cluster secret over its time, path and body. Without a
//! cluster the route does not exist (404).

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use run_wire::cluster::{verify, PROOF_HEADER, PROOF_WINDOW_MS};

use super::cluster_link::now_ms;
use super::error::ApiError;
use super::{validate, AppState};

/// The largest call this pod reads (a peer's sync message, a region's changes).
const MAX_CALL: usize = 64 * 1024 * 1024;

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
    // Its time first: a stale or forged header is refused before its body is read.
    let fresh = proof
        .split_once('.')
        .and_then(|(at, _)| at.parse::<u64>().ok())
        .is_some_and(|at| at.abs_diff(now_ms()) <= PROOF_WINDOW_MS);
    if !fresh {
        return Err(ApiError::Unauthorized("the call's proof is stale".into()));
    }
    let mut bytes = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if bytes.len() + chunk.len() > MAX_CALL {
            return Err(ApiError::TooLargeContent(format!(
                "a call between pods is at most {MAX_CALL} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    if !verify(secret, proof, now_ms(), req.path(), &bytes) {
        return Err(ApiError::Unauthorized(
            "the call's proof does not hold".into(),
        ));
    }
    let reply = app.runs.serve_call(run_id, &bytes).await;
    Ok(HttpResponse::Ok()
        .content_type("application/cbor")
        .body(reply))
}

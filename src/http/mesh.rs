//! Mesh routes: status of the mesh and per-run peer registration.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::validate;
use super::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/mesh/status", web::get().to(status))
        .route("/runs/{runId}/register-peer", web::post().to(register_peer));
}

async fn status(app: web::Data<AppState>) -> HttpResponse {
    let mesh = app.mesh.snapshot();
    HttpResponse::Ok().json(json!({
        "nodeId": app.node_id,
        "region": app.region,
        "connectedPeers": mesh.connected_peers,
        "peers": mesh.peers,
        "registrations": mesh.registrations,
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterBody {
    peer_region: Option<String>,
}

async fn register_peer(
    app: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<RegisterBody>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    let region = validate::region("peerRegion", body.peer_region.as_deref())?;
    let newly = app
        .mesh
        .register(run_id, &region)
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({
        "runId": run_id,
        "peerRegion": region,
        "registered": true,
        "new": newly,
        "connected": app.mesh.is_connected(&region),
    })))
}

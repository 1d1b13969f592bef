//! Mesh routes: the peers' WebSocket (`/ws`), status of the mesh and per-run peer registration.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::auth::service_only;
use super::error::ApiError;
use super::validate;
use super::AppState;
use crate::identity::Identity;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/mesh/status", web::get().to(status))
        .route("/runs/{runId}/register-peer", web::post().to(register_peer));
}

/// `/ws` sits outside `/api`: peers prove themselves with the mesh secret in the handshake.
pub fn socket(cfg: &mut web::ServiceConfig) {
    cfg.route("/ws", web::get().to(peer_socket));
}

async fn peer_socket(
    app: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let address = req.peer_addr().map(|a| a.ip());
    let proof = req
        .headers()
        .get(run_wire::mesh::UPGRADE_PROOF_HEADER)
        .and_then(|v| v.to_str().ok());
    let proven = app.mesh.proven_upgrade(proof);
    // Upgraded before admission: a request that is no WebSocket must not evict anyone.
    let (response, socket, payload) = crate::socket::upgrade(&req, body).await?;
    let slot = if proven {
        None
    } else {
        match app.mesh.handshake_slot(address) {
            Ok(slot) => Some(slot),
            Err(refused) => return Ok(super::error::busy(refused)),
        }
    };
    let remote = req.peer_addr().map(|a| a.to_string());
    // Handshake frames are small; the link's own limit once it proved itself.
    let (limits, slot) =
        app.incoming
            .admitted(slot, crate::mesh::MAX_HANDSHAKE_FRAME, app.mesh.max_frame());
    app.mesh.accept(socket, (payload, limits), remote, slot);
    Ok(response)
}

async fn status(app: web::Data<AppState>, caller: Identity) -> Result<HttpResponse, ApiError> {
    service_only(&caller, "the mesh is operated")?;
    let mesh = app.mesh.status();
    // The region's pods on a shared database: who they are and how many runs each owns.
    let cluster = app.runs.cluster_members().await?.map(|(me, members)| {
        let pods: Vec<_> = members
            .iter()
            .filter(|m| m.live)
            .map(|m| {
                json!({
                    "pod": m.pod,
                    "member": m.member,
                    "address": m.address,
                    "runsOwned": m.runs,
                    "self": *m.member == *me,
                })
            })
            .collect();
        json!({ "member": &*me, "pods": pods })
    });
    Ok(HttpResponse::Ok().json(json!({
        "nodeId": app.node_id,
        "region": app.region,
        "connectedPeers": mesh.connected_peers,
        "peers": mesh.peers,
        "registrations": mesh.registrations,
        "regionConflicts": mesh.region_conflicts,
        "cluster": cluster,
    })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterBody {
    peer_region: Option<String>,
}

async fn register_peer(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    body: web::Json<RegisterBody>,
) -> Result<HttpResponse, ApiError> {
    service_only(&caller, "the mesh is operated")?;
    let run_id = validate::run_id(&path)?;
    let region = validate::region("peerRegion", body.peer_region.as_deref())?;
    // Connected nodes of that region get the run at once; others on their next connect.
    let (newly, syncing) = app
        .mesh
        .register_run(run_id, &region)
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({
        "runId": run_id,
        "peerRegion": region,
        "registered": true,
        "new": newly,
        "connected": syncing > 0,
        "syncing": syncing,
    })))
}

//! Deleting a run and restoring it. A deletion is the run's tombstone: this region records it,
//! the mesh carries it to the others, and from then on the run answers 410 everywhere. Its
//! events and snapshots stay for the grace period (`crdt.runs.deletion-grace-secs`), within
//! which the service credential can restore it.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value as Json};

use super::auth::{allow, service_only};
use super::error::ApiError;
use super::validate;
use super::AppState;
use crate::identity::{Access, Identity};
use crate::runs::Tombstone;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/runs/{runId}", web::delete().to(delete))
        .route("/runs/{runId}/restore", web::post().to(restore));
}

#[derive(Deserialize)]
struct ByQuery {
    /// Who asks, for the record, when the caller is the service (a user token names its `sub`).
    user: Option<String>,
}

impl ByQuery {
    fn user(&self, caller: &Identity) -> Result<Option<String>, ApiError> {
        let named = self
            .user
            .as_deref()
            .map(|u| validate::name("user", Some(u)))
            .transpose()?;
        Ok(caller.user(named))
    }
}

fn shown(t: &Tombstone) -> Json {
    json!({
        "runId": t.run_id,
        "deleted": t.deleted,
        "decidedAt": t.decided_at_utc()
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        "decidedBy": t.by,
        "region": t.region,
    })
}

async fn delete(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    query: web::Query<ByQuery>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Write)?;
    let by = query.user(&caller)?;
    let t = app.runs.delete(run_id, by).await?;
    Ok(HttpResponse::Ok().json(shown(&t)))
}

async fn restore(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    query: web::Query<ByQuery>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    service_only(&caller, "a deleted run is restored")?;
    let by = query.user(&caller)?;
    let t = app.runs.restore(run_id, by).await?;
    Ok(HttpResponse::Ok().json(shown(&t)))
}

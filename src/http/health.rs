//! Health endpoints for probes: liveness (the process serves), readiness (the database
//! answers), and both together.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::scrape::{self, View};
use super::AppState;
use crate::runs::Health;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/actuator/health", web::get().to(health))
        .route("/actuator/health/liveness", web::get().to(liveness))
        .route("/actuator/health/readiness", web::get().to(readiness));
}

async fn liveness() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "UP"}))
}

fn db_json(health: &Health) -> serde_json::Value {
    match &health.database {
        Ok(()) => json!({"status": "UP", "backend": health.backend}),
        Err(e) => json!({"status": "DOWN", "backend": health.backend, "reason": e}),
    }
}

async fn readiness(app: web::Data<AppState>) -> HttpResponse {
    let db = app.runs.health().await;
    let ready = db.database.is_ok();
    let body =
        json!({"status": if ready { "UP" } else { "DOWN" }, "components": {"db": db_json(&db)}});
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Runs whose stored changes did not all load again: the node serves them without those
/// (and what depends on them), keeps them in the log, and says so here — naming them only to
/// those who may see run ids (`scrape::view`), to the others with their number.
fn log_json(health: &Health, view: View) -> serde_json::Value {
    if health.damaged.is_empty() {
        return json!({"status": "UP"});
    }
    if view != View::Full {
        return json!({"status": "DEGRADED", "damagedRuns": health.damaged.len()});
    }
    let runs: Vec<_> = health
        .damaged
        .iter()
        .map(|(run, n)| json!({"runId": run, "unloadableChanges": n}))
        .collect();
    json!({"status": "DEGRADED", "runs": runs})
}

async fn health(req: HttpRequest, app: web::Data<AppState>) -> HttpResponse {
    // Probes carry no credential: they get the status, without run ids.
    let view = scrape::view(&req, &app).unwrap_or(View::WithoutRuns);
    let db = app.runs.health().await;
    let ready = db.database.is_ok();
    let body = json!({
        "status": if ready { "UP" } else { "DOWN" },
        "components": {
            "liveness": {"status": "UP"},
            "readiness": {"status": if ready { "UP" } else { "DOWN" }, "components": {"db": db_json(&db)}},
            "eventLog": log_json(&db, view),
        },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

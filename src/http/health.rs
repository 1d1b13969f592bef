//! Health endpoints for probes: liveness (the process serves), readiness (the database
//! answers), and both together.

use actix_web::{web, HttpResponse};
use serde_json::json;

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

async fn health(app: web::Data<AppState>) -> HttpResponse {
    let db = app.runs.health().await;
    let ready = db.database.is_ok();
    let body = json!({
        "status": if ready { "UP" } else { "DOWN" },
        "components": {
            "liveness": {"status": "UP"},
            "readiness": {"status": if ready { "UP" } else { "DOWN" }, "components": {"db": db_json(&db)}},
        },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

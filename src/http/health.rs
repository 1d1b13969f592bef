//! Health endpoints for probes: liveness (the process serves), readiness (the database
//! answers), and both together.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/actuator/health", web::get().to(health))
        .route("/actuator/health/liveness", web::get().to(liveness))
        .route("/actuator/health/readiness", web::get().to(readiness));
}

async fn liveness() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "UP"}))
}

/// `Ok` when the database answered within two seconds.
async fn database(app: &AppState) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(2), app.runs.store().ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the database did not answer within 2 s".into()),
    }
}

fn db_json(app: &AppState, db: &Result<(), String>) -> serde_json::Value {
    match db {
        Ok(()) => json!({"status": "UP", "backend": app.runs.store().backend()}),
        Err(e) => json!({"status": "DOWN", "backend": app.runs.store().backend(), "reason": e}),
    }
}

async fn readiness(app: web::Data<AppState>) -> HttpResponse {
    let db = database(&app).await;
    let body = json!({"status": if db.is_ok() { "UP" } else { "DOWN" }, "components": {"db": db_json(&app, &db)}});
    if db.is_ok() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn health(app: web::Data<AppState>) -> HttpResponse {
    let db = database(&app).await;
    let ready = db.is_ok();
    let body = json!({
        "status": if ready { "UP" } else { "DOWN" },
        "components": {
            "liveness": {"status": "UP"},
            "readiness": {"status": if ready { "UP" } else { "DOWN" }, "components": {"db": db_json(&app, &db)}},
        },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

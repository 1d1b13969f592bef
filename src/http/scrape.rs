//! `/actuator/prometheus`, and who may see what names a run there and in the health report.
//!
//! Per-run series (`crdt_lamport_clock{run_id}`) and the health report's damaged runs name run
//! ids, which a token's runs list would otherwise keep from whoever lacks the run. So with a
//! metrics credential configured (`crdt.api.metrics-token`), the scrape requires it and shows
//! everything; without one, a node that asks for credentials serves the scrape without the
//! per-run series and the health report without run ids; a node that asks for none (a local
//! setup) shows everything to everyone.

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use prometheus::{Encoder, TextEncoder};
use subtle::ConstantTimeEq;

use super::auth::bearer;
use super::error::ApiError;
use super::AppState;

/// What a caller of the actuator may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Run ids included.
    Full,
    /// Nothing that names a run.
    WithoutRuns,
}

/// The label that names a run in a series.
const RUN_LABEL: &str = "run_id";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/actuator/prometheus", web::get().to(scrape));
}

/// What `req` may see: with a metrics credential configured, only its holder sees anything
/// (`Err` for others) and sees everything.
pub fn view(req: &HttpRequest, app: &AppState) -> Result<View, ApiError> {
    match &app.metrics_token {
        Some(expected) => match bearer(req.headers()) {
            Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => {
                Ok(View::Full)
            }
            Some(_) => Err(ApiError::Unauthorized("not the metrics credential".into())),
            None => Err(ApiError::Unauthorized(
                "the metrics credential is required (Authorization: Bearer)".into(),
            )),
        },
        None if app.auth.is_open() => Ok(View::Full),
        None => Ok(View::WithoutRuns),
    }
}

async fn scrape(req: HttpRequest, app: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let view = view(&req, &app)?;
    if let Some(pages) = app.runs.wal_backlog() {
        app.metrics.wal_backlog.set(pages);
    }
    let mut families = app.metrics.registry.gather();
    if view == View::WithoutRuns {
        families.retain(|f| {
            !f.get_metric()
                .iter()
                .any(|m| m.get_label().iter().any(|l| l.name() == RUN_LABEL))
        });
    }
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    encoder
        .encode(&families, &mut body)
        .map_err(|e| ApiError::Internal(format!("encoding the metrics: {e}")))?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, encoder.format_type()))
        .body(body))
}

//! A run's history: its changes in the causal order every region gives alike, its state at
//! any point, and what changed between two points.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value as Json};

use super::auth::allow;
use super::error::ApiError;
use super::validate;
use super::AppState;
use crate::identity::{Access, Identity};
use run_doc::HistoryEntry;

/// Longest page of the history (each entry is described on the run's actor).
const MAX_PAGE: usize = 200;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/runs/{runId}/history", web::get().to(history))
        .route("/runs/{runId}/diff", web::get().to(diff));
}

/// Heads naming a point of history (`field`: the query parameter), at least one.
pub fn point(
    field: &'static str,
    raw: Option<&str>,
) -> Result<Vec<automerge::ChangeHash>, ApiError> {
    let heads = validate::heads(raw).map_err(|e| ApiError::invalid(field, e.to_string()))?;
    if heads.is_empty() {
        return Err(ApiError::invalid(
            field,
            "names a point of history: one or more change hashes (an entry's `heads`)",
        ));
    }
    Ok(heads)
}

/// An entry as the API shows it: the change feed's description of the change, and where it
/// leaves the run.
fn entry(e: &HistoryEntry) -> Json {
    json!({
        "changeHash": e.hash.to_string(),
        "heads": e.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "user": e.user,
        "region": e.region,
        "lamport": e.lamport,
        "time": chrono::DateTime::from_timestamp(e.time, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        "kind": e.described.kind.as_str(),
        "content": e.described.content,
        "legacy": e.legacy,
    })
}

#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

async fn history(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    query: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Read)?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_PAGE}"),
        ));
    }
    let after = match query.after.as_deref() {
        Some(a) => Some(point("after", Some(a))?).and_then(|h| h.first().copied()),
        None => None,
    };
    let page = app.runs.history(run_id, after, limit).await?;
    Ok(HttpResponse::Ok().json(json!({
        "runId": run_id,
        "entries": page.entries.iter().map(entry).collect::<Vec<_>>(),
        "next": page.next.map(|h| h.to_string()),
        "total": page.total,
    })))
}

#[derive(Deserialize)]
struct DiffQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn diff(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    query: web::Query<DiffQuery>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Read)?;
    let from = point("from", query.from.as_deref())?;
    let to = query
        .to
        .as_deref()
        .map(|t| point("to", Some(t)))
        .transpose()?;
    let diff = app.runs.diff(run_id, from, to).await?;
    let mut body = serde_json::to_value(&diff).map_err(|e| ApiError::Internal(e.to_string()))?;
    body["runId"] = json!(run_id);
    Ok(HttpResponse::Ok().json(body))
}

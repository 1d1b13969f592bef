//! Routes of one run: its state, its changes, sync from other regions, and the five mutations.
//! Each route parses and validates, sends one message to the run's actor, and shapes the reply.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value as Json};
use uuid::Uuid;

use super::auth::{allow, service_only};
use super::error::ApiError;
use super::validate;
use super::AppState;
use crate::identity::{Access, Identity, RunSet};
use crate::runs::RunActivity;
use crate::runs::{Mutate, MutationOutcome, RemoteChanges};
use run_doc::{parse_changes, DocError, Mutation};

/// Most changes one sync request may carry.
const MAX_CHANGES_PER_SYNC: usize = 10_000;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/runs", web::get().to(list))
        .route("/runs/{runId}/state", web::get().to(state))
        .route("/runs/{runId}/changes", web::get().to(changes))
        .route("/runs/{runId}/sync", web::post().to(sync))
        .route("/runs/{runId}/grafts", web::post().to(graft))
        .route("/runs/{runId}/pruned-steps", web::post().to(prune))
        .route(
            "/runs/{runId}/pruned-steps/{stepId}",
            web::delete().to(unprune),
        )
        .route("/runs/{runId}/flags/{key}", web::put().to(set_flag))
        .route("/runs/{runId}/flags/{key}", web::delete().to(delete_flag))
        .route("/runs/{runId}/revert", web::post().to(revert))
        .route("/runs/{runId}/checkpoints", web::post().to(checkpoint));
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Longest page of the runs list.
const MAX_PAGE: i64 = 200;

/// Runs, most recently active first, a page at a time: `nextCursor` continues the list.
async fn list(
    app: web::Data<AppState>,
    caller: Identity,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_PAGE}"),
        ));
    }
    let after = query.cursor.as_deref().map(validate::cursor).transpose()?;
    let (page, next) = visible_runs(&app, &caller, after, limit).await?;
    let next = next.as_ref().map(validate::encode_cursor);
    let runs: Vec<Json> = page
        .iter()
        .map(|r| {
            json!({
                "runId": r.run_id,
                "lastActivity": r.last_activity.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "loaded": app.runs.is_loaded(r.run_id),
                "viewers": app.viewers.viewers(r.run_id),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "runs": runs, "nextCursor": next })))
}

/// A page of the runs `caller` may see, and where the next page starts. A token naming its
/// runs sees only those: pages of the list are read until `limit` of them are found, or
/// [`MAX_SCANNED_PAGES`] were read (then the page may be short, and `nextCursor` continues the
/// scan where it stopped), so one request never reads the whole list.
async fn visible_runs(
    app: &AppState,
    caller: &Identity,
    after: Option<RunActivity>,
    limit: i64,
) -> Result<(Vec<RunActivity>, Option<RunActivity>), ApiError> {
    let all_runs = match caller {
        Identity::Service => true,
        Identity::User(grant) => grant.runs == RunSet::All,
    };
    if all_runs {
        let page = app.runs.recent_runs(after.as_ref(), limit).await?;
        return Ok((page.runs, page.next));
    }
    let wanted = usize::try_from(limit).unwrap_or(0);
    let (mut kept, mut cursor) = (Vec::new(), after);
    for _ in 0..MAX_SCANNED_PAGES {
        let page = app.runs.recent_runs(cursor.as_ref(), MAX_PAGE).await?;
        for run in page.runs {
            if !caller.sees(run.run_id) {
                continue;
            }
            if kept.len() == wanted {
                let next = kept.last().cloned();
                return Ok((kept, next));
            }
            kept.push(run);
        }
        if page.next.is_none() {
            return Ok((kept, None));
        }
        cursor = page.next;
    }
    Ok((kept, cursor))
}

/// Pages of the runs list one request reads for a token that names its runs.
const MAX_SCANNED_PAGES: usize = 10;

#[derive(Deserialize)]
struct StateQuery {
    /// A point of history (heads): the state as it was then.
    at: Option<String>,
}

/// The state at a point of history, with the run's own fields.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct AtPoint<'a> {
    run_id: Uuid,
    region: &'a str,
    at: &'a str,
    #[serde(flatten)]
    state: &'a run_doc::RunState,
}

async fn state(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    query: web::Query<StateQuery>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Read)?;
    if let Some(at) = query.at.as_deref() {
        let heads = super::history::point("at", Some(at))?;
        let then = app.runs.state_at(run_id, heads).await?;
        // Written straight out, not built as a JSON value first: a point of a large run holds
        // tens of thousands of grafts.
        let body = serde_json::to_vec(&AtPoint {
            run_id,
            region: &app.region,
            at,
            state: &then,
        })
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        return Ok(HttpResponse::Ok()
            .content_type("application/json")
            .body(body));
    }
    let state = app.runs.state(run_id).await?;
    // The state's JSON is made once per change and shared; the run's own fields go in front.
    let json = state.json();
    let head = json!({
        "runId": run_id,
        "region": app.region,
        "automergeUrl": run_wire::automerge_repo::doc_id::url(run_id),
    })
    .to_string();
    let mut body = String::with_capacity(head.len() + json.len());
    body.push_str(head.trim_end_matches('}'));
    match json.strip_prefix('{').filter(|rest| *rest != "}") {
        Some(rest) => {
            body.push(',');
            body.push_str(rest);
        }
        None => body.push('}'),
    }
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

#[derive(Deserialize)]
struct ChangesQuery {
    heads: Option<String>,
}

async fn changes(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    query: web::Query<ChangesQuery>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Read)?;
    let heads = validate::heads(query.heads.as_deref())?;
    let since = app.runs.changes_since(run_id, heads).await?;
    Ok(HttpResponse::Ok().json(json!({
        "runId": run_id,
        "changes": validate::encode(&since.changes),
        "count": since.count,
        "heads": since.heads,
    })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncBody {
    changes: Option<String>,
    source_region: Option<String>,
    lamport_timestamp: Option<i64>,
}

async fn sync(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    body: web::Json<SyncBody>,
) -> Result<HttpResponse, ApiError> {
    let metrics = &app.metrics;
    metrics.sync_messages.with_label_values(&["in"]).inc();
    let result = async {
        let run_id = validate::run_id(&path)?;
        // Another region's raw changes, under the region it names: the service credential's
        // (a user writes through the mutation routes, which record who).
        service_only(&caller, "sync takes another region's raw changes")?;
        let source_region = validate::region("sourceRegion", body.source_region.as_deref())?;
        let lamport = validate::lamport("lamportTimestamp", body.lamport_timestamp)?;
        let bytes = validate::base64("changes", body.changes.as_deref())?;
        let changes = parse_changes(&bytes).map_err(|e| match e {
            DocError::TooLarge(why) => ApiError::TooLargeContent(format!("changes: {why}")),
            other => ApiError::invalid("changes", other.to_string()),
        })?;
        if changes.len() > MAX_CHANGES_PER_SYNC {
            return Err(ApiError::invalid(
                "changes",
                format!(
                    "holds {} changes; send at most {MAX_CHANGES_PER_SYNC} per request",
                    changes.len()
                ),
            ));
        }
        let out = app
            .runs
            .apply_changes(
                run_id,
                RemoteChanges {
                    changes,
                    source_region,
                    lamport,
                    via: None,
                },
            )
            .await?;
        Ok::<_, ApiError>(json!({
            "runId": run_id,
            "applied": out.applied,
            "duplicates": out.duplicates,
            "lamport": out.lamport,
            "heads": out.heads,
        }))
    }
    .await;
    match result {
        Ok(body) => Ok(HttpResponse::Ok().json(body)),
        Err(e) => {
            let reason = match &e {
                ApiError::Unavailable(_) | ApiError::Internal(_) | ApiError::Unprocessable(_) => {
                    "apply"
                }
                _ => "decode",
            };
            metrics.sync_failures.with_label_values(&[reason]).inc();
            Err(e)
        }
    }
}

/// Sends one mutation to the run and answers with its outcome (`changed`, `lamport`, `heads`)
/// plus `fields`.
async fn answer(
    app: &AppState,
    run_id: Uuid,
    mutation: Mutation,
    user: Option<String>,
    fields: impl FnOnce(&MutationOutcome) -> Vec<(&'static str, Json)>,
) -> Result<serde_json::Map<String, Json>, ApiError> {
    let msg = Mutate {
        mutation,
        user,
        op_id: None,
    };
    let out = app.runs.mutate(run_id, msg).await?;
    let mut body = serde_json::Map::new();
    body.insert("changed".into(), json!(out.changed));
    body.insert("lamport".into(), json!(out.lamport));
    body.insert("heads".into(), json!(out.heads));
    for (k, v) in fields(&out) {
        body.insert(k.into(), v);
    }
    Ok(body)
}

/// The user a mutation records: a user token's `sub`; for a service, the (required) `user`
/// the body names.
fn recorded_user(id: &Identity, named: Option<&str>) -> Result<String, ApiError> {
    match id.user(None) {
        Some(sub) => Ok(sub),
        None => validate::name("user", named),
    }
}

#[derive(Deserialize)]
struct UserQuery {
    user: Option<String>,
}

impl UserQuery {
    /// Removals take the user as an optional query parameter, for the log.
    fn user(&self) -> Result<Option<String>, ApiError> {
        self.user
            .as_deref()
            .map(|u| validate::name("user", Some(u)))
            .transpose()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GraftBody {
    /// Optional client-chosen id: retrying a graft with the same id does not graft twice.
    id: Option<String>,
    agent: Option<String>,
    after_step: Option<String>,
    user: Option<String>,
}

async fn graft(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    body: web::Json<GraftBody>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Write)?;
    let agent = validate::name("agent", body.agent.as_deref())?;
    let after_step = validate::name("afterStep", body.after_step.as_deref())?;
    let user = recorded_user(&caller, body.user.as_deref())?;
    let (id, retry_safe) = match body.id.as_deref() {
        Some(raw) => (
            Uuid::parse_str(raw)
                .map_err(|e| ApiError::invalid("id", format!("{raw:?} is not a UUID: {e}")))?,
            true,
        ),
        None => (Uuid::new_v4(), false),
    };
    let mutation = Mutation::Graft {
        id,
        retry_safe,
        agent,
        after_step,
        user: user.clone(),
    };
    let body = answer(&app, run_id, mutation, Some(user), |out| {
        vec![("graft", json!(out.graft))]
    })
    .await?;
    Ok(HttpResponse::Created().json(body))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PruneBody {
    step_id: Option<String>,
    user: Option<String>,
}

async fn prune(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    body: web::Json<PruneBody>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Write)?;
    let step_id = validate::name("stepId", body.step_id.as_deref())?;
    let user = recorded_user(&caller, body.user.as_deref())?;
    let mutation = Mutation::Prune {
        step_id: step_id.clone(),
        user: user.clone(),
    };
    let body = answer(&app, run_id, mutation, Some(user), |_| {
        vec![("stepId", json!(step_id))]
    })
    .await?;
    Ok(HttpResponse::Ok().json(body))
}

async fn unprune(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<(String, String)>,
    query: web::Query<UserQuery>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path.0)?;
    allow(&caller, run_id, Access::Write)?;
    let step_id = validate::name("stepId", Some(&path.1))?;
    let mutation = Mutation::Unprune {
        step_id: step_id.clone(),
    };
    let body = answer(&app, run_id, mutation, caller.user(query.user()?), |_| {
        vec![("stepId", json!(step_id))]
    })
    .await?;
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Deserialize)]
struct FlagBody {
    /// `Some(Json::Null)` for an explicit null, `None` when the field is missing.
    #[serde(default, deserialize_with = "present")]
    value: Option<Json>,
    user: Option<String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Json>, D::Error> {
    Json::deserialize(d).map(Some)
}

async fn set_flag(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<(String, String)>,
    body: web::Json<FlagBody>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path.0)?;
    allow(&caller, run_id, Access::Write)?;
    let key = validate::name("key", Some(&path.1))?;
    let value = body
        .value
        .clone()
        .ok_or_else(|| ApiError::invalid("value", "is required (any JSON value)"))?;
    validate::flag_value("value", &value)?;
    let user = recorded_user(&caller, body.user.as_deref())?;
    let mutation = Mutation::SetFlag {
        key: key.clone(),
        value: value.clone(),
    };
    let body = answer(&app, run_id, mutation, Some(user), |_| {
        vec![("key", json!(key)), ("value", value)]
    })
    .await?;
    Ok(HttpResponse::Ok().json(body))
}

async fn delete_flag(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<(String, String)>,
    query: web::Query<UserQuery>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path.0)?;
    allow(&caller, run_id, Access::Write)?;
    let key = validate::name("key", Some(&path.1))?;
    let mutation = Mutation::DeleteFlag { key: key.clone() };
    let body = answer(&app, run_id, mutation, caller.user(query.user()?), |_| {
        vec![("key", json!(key))]
    })
    .await?;
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Deserialize)]
struct RevertBody {
    /// The point to go back to: an entry's `heads` from the history.
    to: Option<Vec<String>>,
    user: Option<String>,
}

/// One new change after which the state is the state at `to`; recorded as a revert by the
/// caller (history is never rewritten).
async fn revert(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    body: web::Json<RevertBody>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Write)?;
    let to = body.to.as_ref().map(|t| t.join(","));
    let to = super::history::point("to", to.as_deref())?;
    let user = recorded_user(&caller, body.user.as_deref())?;
    let shown: Vec<String> = to.iter().map(|h| h.to_string()).collect();
    let body = answer(&app, run_id, Mutation::Revert { to }, Some(user), |_| {
        vec![("to", json!(shown))]
    })
    .await?;
    Ok(HttpResponse::Ok().json(body))
}

#[derive(Deserialize)]
struct CheckpointBody {
    label: Option<String>,
    user: Option<String>,
}

/// Names the run's current heads with `label`; the history lists it, every region alike.
async fn checkpoint(
    app: web::Data<AppState>,
    caller: Identity,
    path: web::Path<String>,
    body: web::Json<CheckpointBody>,
) -> Result<HttpResponse, ApiError> {
    let run_id = validate::run_id(&path)?;
    allow(&caller, run_id, Access::Write)?;
    let label = validate::name("label", body.label.as_deref())?;
    let user = recorded_user(&caller, body.user.as_deref())?;
    let mutation = Mutation::Checkpoint {
        label: label.clone(),
    };
    let body = answer(&app, run_id, mutation, Some(user), |_| {
        vec![("label", json!(label))]
    })
    .await?;
    Ok(HttpResponse::Created().json(body))
}

//! `POST/GET/DELETE /api/crdt/webhooks`: subscriptions, for the service credential; and their
//! dead letters, listed and replayed.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value as Json};
use uuid::Uuid;

use super::{subscription, Webhooks};
use crate::api_error::ApiError;
use crate::feed::FeedEdge;
use crate::http::auth::service_only;
use crate::identity::Identity;
use crate::runs::{Delivery, FeedEvent, Webhook};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/webhooks", web::post().to(create))
        .route("/webhooks", web::get().to(list))
        .route("/webhooks/{id}", web::get().to(show))
        .route("/webhooks/{id}", web::delete().to(delete))
        .route("/webhooks/{id}/dead-letters", web::get().to(dead_letters))
        .route("/webhooks/{id}/dead-letters/replay", web::post().to(replay));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSubscription {
    url: Option<String>,
    secret: Option<String>,
    runs: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
}

fn unavailable(e: run_store::StoreError) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

fn shown(w: &Webhook) -> Json {
    json!({
        "id": w.id,
        "url": w.url,
        "runs": w.runs,
        "kinds": w.kinds,
        "origin": w.origin,
        "createdAt": w.created_at.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
}

async fn create(
    edge: web::Data<FeedEdge>,
    caller: Identity,
    body: web::Json<NewSubscription>,
) -> Result<HttpResponse, ApiError> {
    service_only(&caller, "webhooks are managed")?;
    let body = body.into_inner();
    let secret = body.secret.unwrap_or_else(super::signing::Secret::generate);
    let webhook = subscription(
        &edge.webhooks,
        format!("wh_{}", Uuid::new_v4().simple()),
        body.url.as_deref(),
        &secret,
        body.runs,
        body.kinds,
        "api",
    )?;
    edge.feed
        .save_webhook(&webhook)
        .await
        .map_err(unavailable)?;
    edge.webhooks.changed();
    let mut answer = shown(&webhook);
    // The secret is shown once, here.
    answer["secret"] = json!(webhook.secret);
    Ok(HttpResponse::Created().json(answer))
}

async fn list(edge: web::Data<FeedEdge>, caller: Identity) -> Result<HttpResponse, ApiError> {
    service_only(&caller, "webhooks are managed")?;
    let hooks = edge.feed.webhooks().await.map_err(unavailable)?;
    let (pending, dead) = edge.feed.outbox_depth().await.map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(json!({
        "webhooks": hooks.iter().map(shown).collect::<Vec<_>>(),
        "outbox": {"pending": pending, "dead": dead},
    })))
}

async fn find(edge: &FeedEdge, id: &str) -> Result<Webhook, ApiError> {
    edge.feed
        .webhooks()
        .await
        .map_err(unavailable)?
        .into_iter()
        .find(|w| w.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("no webhook subscription {id:?}")))
}

async fn show(
    edge: web::Data<FeedEdge>,
    caller: Identity,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    service_only(&caller, "webhooks are managed")?;
    Ok(HttpResponse::Ok().json(shown(&find(&edge, &path).await?)))
}

async fn delete(
    edge: web::Data<FeedEdge>,
    caller: Identity,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    service_only(&caller, "webhooks are managed")?;
    let hook = find(&edge, &path).await?;
    if hook.origin == "config" {
        return Err(ApiError::Unprocessable(format!(
            "{} comes from the configuration: remove it there",
            hook.id
        )));
    }
    edge.feed
        .delete_webhook(&hook.id)
        .await
        .map_err(unavailable)?;
    edge.webhooks.changed();
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
struct Page {
    after: Option<i64>,
    limit: Option<i64>,
}

fn dead_letter(d: &Delivery) -> Json {
    let event: Json = FeedEvent::from_row(&d.event)
        .json
        .as_deref()
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or(Json::Null);
    json!({
        "id": d.id,
        "attempts": d.attempts,
        "lastError": d.last_error,
        "queuedAt": d.queued_at.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "event": event,
    })
}

async fn dead_letters(
    edge: web::Data<FeedEdge>,
    caller: Identity,
    path: web::Path<String>,
    page: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    service_only(&caller, "webhooks are managed")?;
    let hook = find(&edge, &path).await?;
    let limit = page.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be 1 to 1000"));
    }
    let dead = edge
        .feed
        .dead_letters(&hook.id, page.after.unwrap_or(0), limit)
        .await
        .map_err(unavailable)?;
    let next = (dead.len() as i64 == limit).then(|| dead.last().map(|d| d.id));
    Ok(HttpResponse::Ok().json(json!({
        "deadLetters": dead.iter().map(dead_letter).collect::<Vec<_>>(),
        "nextAfter": next.flatten(),
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Replay {
    ids: Option<Vec<i64>>,
}

async fn replay(
    edge: web::Data<FeedEdge>,
    caller: Identity,
    path: web::Path<String>,
    body: Option<web::Json<Replay>>,
) -> Result<HttpResponse, ApiError> {
    service_only(&caller, "webhooks are managed")?;
    let hook = find(&edge, &path).await?;
    let only = body.and_then(|b| b.into_inner().ids);
    if only.as_ref().is_some_and(|ids| ids.len() > 1000) {
        return Err(ApiError::invalid("ids", "at most 1000 at a time"));
    }
    let n = edge
        .feed
        .replay_dead(&hook.id, only)
        .await
        .map_err(unavailable)?;
    edge.webhooks.changed();
    Ok(HttpResponse::Ok().json(json!({ "replayed": n })))
}

impl Webhooks {
    /// The dispatcher reads the subscriptions (and the outbox) again.
    pub fn changed(&self) {
        self.changed.notify_one();
    }
}

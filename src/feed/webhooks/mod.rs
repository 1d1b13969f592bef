//! Webhooks: subscriptions (from the configuration and the API) to the change feed's events,
//! delivered from the durable outbox the log's appends fill (see [`dispatcher`]), signed as
//! Standard Webhooks ([`signing`]).

mod api;
mod dispatcher;
mod signing;
mod target;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

pub use api::routes;
use dispatcher::{DeliveryMetrics, DeliveryPolicy, Dispatcher};
pub use signing::{message_id, Secret};
use target::AllowedHosts;

use crate::api_error::ApiError;
use crate::runs::{ChangeFeed, Webhook};

/// Most run ids and kinds one subscription may name.
const MAX_FILTER: usize = 1000;

/// The webhook side of the feed's edge.
pub struct Webhooks {
    allowed: AllowedHosts,
    /// Tells the dispatcher the subscriptions changed.
    changed: Arc<Notify>,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook subscription {id:?} of the configuration: {reason}")]
    Config { id: String, reason: String },
    #[error("webhooks: {0}")]
    Store(#[from] run_store::StoreError),
}

impl Webhooks {
    /// Writes the configuration's subscriptions (removing those it no longer lists) and
    /// starts delivering, on the current actix thread.
    pub async fn start(
        feed: Arc<ChangeFeed>,
        settings: &crate::config::Webhooks,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Self, WebhookError> {
        let webhooks = Webhooks {
            allowed: AllowedHosts::new(settings.allowed_hosts.urls()),
            changed: Arc::new(Notify::new()),
        };
        let mut configured = Vec::new();
        for s in &settings.subscriptions {
            let hook = subscription(
                &webhooks,
                s.id.clone(),
                Some(&s.url),
                &s.secret,
                s.runs.clone(),
                s.kinds.clone(),
                "config",
            )
            .map_err(|e| WebhookError::Config {
                id: s.id.clone(),
                reason: e.to_string(),
            })?;
            configured.push(hook);
        }
        for old in feed.webhooks().await? {
            let still = configured.iter().any(|c| c.id == old.id);
            if old.origin == "config" && !still {
                log::info!("webhooks: {} is no longer configured; removed", old.id);
                feed.delete_webhook(&old.id).await?;
            }
        }
        for hook in &configured {
            feed.save_webhook(hook).await?;
        }
        let policy = DeliveryPolicy {
            max_attempts: settings.max_attempts,
            backoff_min: Duration::from_millis(settings.backoff_min_ms),
            backoff_max: Duration::from_millis(settings.backoff_max_ms),
            timeout: Duration::from_millis(settings.timeout_ms),
            concurrency: settings.concurrency,
        };
        let delivery = DeliveryMetrics {
            attempts: metrics.webhook_attempts.clone(),
            outbox_pending: metrics.webhook_outbox.clone(),
            dead_letters: metrics.webhook_dead_letters.clone(),
            lag: metrics.webhook_lag.clone(),
        };
        let dispatcher = Dispatcher::new(feed, policy, delivery, webhooks.changed.clone());
        actix_web::rt::spawn(dispatcher.run());
        Ok(webhooks)
    }
}

/// A subscription as asked for, checked: the URL against the allowed hosts, the secret's
/// form, run ids and event kinds.
fn subscription(
    webhooks: &Webhooks,
    id: String,
    url: Option<&str>,
    secret: &str,
    runs: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
    origin: &str,
) -> Result<Webhook, ApiError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        return Err(ApiError::invalid("id", "1-64 letters, digits, - or _"));
    }
    let url = url.ok_or_else(|| ApiError::invalid("url", "is required"))?;
    let url = webhooks
        .allowed
        .check(url)
        .map_err(|e| ApiError::invalid("url", e.to_string()))?;
    Secret::parse(secret).map_err(|e| ApiError::invalid("secret", e.to_string()))?;
    let runs = runs
        .map(|runs| {
            if runs.is_empty() || runs.len() > MAX_FILTER {
                return Err(ApiError::invalid(
                    "runs",
                    format!("1 to {MAX_FILTER} run ids"),
                ));
            }
            runs.iter()
                .map(|r| {
                    Uuid::parse_str(r).map_err(|e| ApiError::invalid("runs", format!("{r:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let kinds = kinds
        .map(|kinds| {
            if kinds.is_empty() || kinds.len() > MAX_FILTER {
                return Err(ApiError::invalid("kinds", "at least one kind"));
            }
            for k in &kinds {
                if run_doc::Kind::parse(k).is_none() {
                    let known: Vec<&str> = run_doc::Kind::ALL.iter().map(|k| k.as_str()).collect();
                    return Err(ApiError::invalid(
                        "kinds",
                        format!("{k:?} is not one of {}", known.join(", ")),
                    ));
                }
            }
            Ok(kinds)
        })
        .transpose()?;
    Ok(Webhook {
        id,
        url: url.to_string(),
        secret: secret.to_string(),
        runs,
        kinds,
        origin: origin.to_string(),
        created_at: chrono::SubsecRound::trunc_subsecs(chrono::Utc::now().naive_utc(), 6),
    })
}

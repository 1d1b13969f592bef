//! Delivers the outbox: one task on the system thread reads due deliveries after each commit
//! (and at least every [`POLL`]), posts each to its subscription's endpoint signed, and
//! records the outcome in the outbox, which is durable: a delivery interrupted by a crash is
//! attempted again after the restart (at least once). A run's events go to an endpoint one at
//! a time in order (the outbox hands out only the oldest pending one per subscription and
//! run); requests to one endpoint are bounded by `concurrency`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use prometheus::{Histogram, IntCounterVec, IntGauge};
use tokio::sync::{Notify, Semaphore};

use super::signing::{message_id, Secret};
use crate::runs::{Attempted, ChangeFeed, Delivery, FeedEvent, Webhook};

/// Due deliveries are looked for at least this often (retries come due without a commit).
const POLL: Duration = Duration::from_millis(500);
/// Due deliveries read at a time.
const BATCH: i64 = 200;
/// How often the outbox's depth is counted for the metrics.
const DEPTH_EVERY: Duration = Duration::from_secs(2);
/// A pause after each wake-up, gathering those that follow into one read of the outbox.
const COALESCE: Duration = Duration::from_millis(10);
/// A response body read at most (only for the log).
const MAX_RESPONSE_BYTES: usize = 4096;

#[derive(Clone)]
pub struct DeliveryPolicy {
    pub max_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub timeout: Duration,
    pub concurrency: usize,
}

impl DeliveryPolicy {
    /// The wait before attempt `attempts + 1`: exponential, with jitter.
    fn backoff(&self, attempts: u32) -> Duration {
        ExponentialBuilder::default()
            .with_min_delay(self.backoff_min)
            .with_max_delay(self.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.backoff_max)
    }
}

#[derive(Clone)]
pub struct DeliveryMetrics {
    /// Attempts by outcome: `delivered`, `retry`, `dead`, `gone`.
    pub attempts: IntCounterVec,
    pub outbox_pending: IntGauge,
    pub dead_letters: IntGauge,
    /// Seconds from an event's commit to its endpoint's 2xx.
    pub lag: Histogram,
}

/// An endpoint as the dispatcher uses it.
struct Endpoint {
    url: String,
    secret: Secret,
    permits: Arc<Semaphore>,
}

pub struct Dispatcher {
    feed: Arc<ChangeFeed>,
    policy: DeliveryPolicy,
    metrics: DeliveryMetrics,
    endpoints: RefCell<HashMap<String, Rc<Endpoint>>>,
    /// Outbox rows being attempted now.
    in_flight: RefCell<HashSet<i64>>,
    /// An attempt finished: the run's next event may be due.
    finished: Notify,
    /// The subscriptions changed: read them again.
    changed: Arc<Notify>,
    client: awc::Client,
}

impl Dispatcher {
    pub fn new(
        feed: Arc<ChangeFeed>,
        policy: DeliveryPolicy,
        metrics: DeliveryMetrics,
        changed: Arc<Notify>,
    ) -> Rc<Self> {
        let client = awc::Client::builder()
            .timeout(policy.timeout)
            .disable_redirects()
            .finish();
        Rc::new(Dispatcher {
            feed,
            policy,
            metrics,
            endpoints: RefCell::new(HashMap::new()),
            in_flight: RefCell::new(HashSet::new()),
            finished: Notify::new(),
            changed,
            client,
        })
    }

    /// Delivers until the process ends (spawn it once, on an actix thread).
    pub async fn run(self: Rc<Self>) {
        let mut commits = self.feed.commits();
        let mut stale = true;
        let mut counted = tokio::time::Instant::now() - DEPTH_EVERY;
        loop {
            if stale {
                match self.feed.webhooks().await {
                    Ok(hooks) => {
                        self.load(hooks);
                        stale = false;
                    }
                    Err(e) => log::warn!("webhooks: reading the subscriptions failed: {e}"),
                }
            }
            // The outbox is read again only once half of what was handed out is done: a
            // read per finished attempt would cost more than the attempts.
            let has_endpoints = !self.endpoints.borrow().is_empty();
            if has_endpoints && self.in_flight.borrow().len() < BATCH as usize / 2 {
                if let Err(e) = self.dispatch().await {
                    log::warn!("webhooks: reading the outbox failed: {e}");
                }
            }
            if has_endpoints && counted.elapsed() >= DEPTH_EVERY {
                counted = tokio::time::Instant::now();
                if let Ok((pending, dead)) = self.feed.outbox_depth().await {
                    self.metrics.outbox_pending.set(pending);
                    self.metrics.dead_letters.set(dead);
                }
            }
            tokio::select! {
                _ = commits.changed() => {}
                _ = self.finished.notified() => {}
                _ = self.changed.notified() => stale = true,
                _ = tokio::time::sleep(POLL) => {}
            }
            // Wake-ups in a burst (commits, finished attempts) make one read.
            tokio::time::sleep(COALESCE).await;
        }
    }

    fn load(&self, hooks: Vec<Webhook>) {
        let mut endpoints = self.endpoints.borrow_mut();
        let keep: HashSet<&str> = hooks.iter().map(|h| h.id.as_str()).collect();
        endpoints.retain(|id, _| keep.contains(id.as_str()));
        for hook in hooks {
            let Ok(secret) = Secret::parse(&hook.secret) else {
                log::warn!(
                    "webhooks: {}: its secret is malformed; not delivered",
                    hook.id
                );
                continue;
            };
            let same = endpoints
                .get(&hook.id)
                .is_some_and(|e| e.url == hook.url && e.secret.same(&secret));
            if !same {
                endpoints.insert(
                    hook.id.clone(),
                    Rc::new(Endpoint {
                        url: hook.url,
                        secret,
                        permits: Arc::new(Semaphore::new(self.policy.concurrency)),
                    }),
                );
            }
        }
    }

    async fn dispatch(self: &Rc<Self>) -> Result<(), run_store::StoreError> {
        let due = self.feed.due_deliveries(BATCH).await?;
        for delivery in due {
            if self.in_flight.borrow().contains(&delivery.id) {
                continue;
            }
            let Some(endpoint) = self
                .endpoints
                .borrow()
                .get(&delivery.subscription_id)
                .cloned()
            else {
                continue;
            };
            self.in_flight.borrow_mut().insert(delivery.id);
            let this = self.clone();
            actix_web::rt::spawn(async move {
                let id = delivery.id;
                // Waits its turn among the endpoint's `concurrency` requests.
                if let Ok(permit) = endpoint.permits.clone().acquire_owned().await {
                    this.deliver(&endpoint, delivery).await;
                    drop(permit);
                }
                this.in_flight.borrow_mut().remove(&id);
                this.finished.notify_one();
            });
        }
        Ok(())
    }

    async fn deliver(&self, endpoint: &Endpoint, delivery: Delivery) {
        let event = FeedEvent::from_row(&delivery.event);
        let body = envelope(&event, &delivery);
        let id = delivery
            .event
            .change_hash
            .as_deref()
            .map(|h| message_id(delivery.event.run_id, h))
            .unwrap_or_else(|| format!("msg_event_{}", delivery.event.id));
        let timestamp = chrono::Utc::now().timestamp();
        let signature = endpoint.secret.sign(&id, timestamp, body.as_bytes());
        let sent = self
            .client
            .post(&endpoint.url)
            .insert_header(("content-type", "application/json"))
            .insert_header(("user-agent", "crdt-node-webhooks"))
            .insert_header(("webhook-id", id.as_str()))
            .insert_header(("webhook-timestamp", timestamp.to_string()))
            .insert_header(("webhook-signature", signature))
            .send_body(body)
            .await;
        let attempts = u32::try_from(delivery.attempts).unwrap_or(0) + 1;
        let verdict = match sent {
            Ok(mut response) => {
                let status = response.status();
                let _ = response.body().limit(MAX_RESPONSE_BYTES).await;
                judge(status.as_u16())
            }
            Err(e) => Verdict::Retry(e.to_string()),
        };
        let outcome = match verdict {
            Verdict::Delivered => {
                let lag = chrono::Utc::now().naive_utc() - delivery.event.created_at;
                self.metrics
                    .lag
                    .observe(lag.num_milliseconds().max(0) as f64 / 1000.0);
                self.metrics
                    .attempts
                    .with_label_values(&["delivered"])
                    .inc();
                Attempted::Delivered
            }
            Verdict::Gone => {
                self.metrics.attempts.with_label_values(&["gone"]).inc();
                log::info!(
                    "webhooks: {} answered 410 Gone: subscription {} ends",
                    endpoint.url,
                    delivery.subscription_id
                );
                if let Err(e) = self.feed.delete_webhook(&delivery.subscription_id).await {
                    log::warn!("webhooks: ending {} failed: {e}", delivery.subscription_id);
                }
                self.changed.notify_one();
                return;
            }
            Verdict::Retry(error) if attempts < self.policy.max_attempts => {
                self.metrics.attempts.with_label_values(&["retry"]).inc();
                let wait = chrono::Duration::from_std(self.policy.backoff(attempts))
                    .unwrap_or(chrono::Duration::hours(1));
                Attempted::Failed {
                    error,
                    next: Some(chrono::Utc::now().naive_utc() + wait),
                }
            }
            Verdict::Retry(error) | Verdict::Dead(error) => {
                self.metrics.attempts.with_label_values(&["dead"]).inc();
                log::warn!(
                    "webhooks: event {} to {} dead-lettered after {attempts} attempt(s): {error}",
                    delivery.event.id,
                    endpoint.url
                );
                Attempted::Failed { error, next: None }
            }
        };
        if let Err(e) = self.feed.attempted(delivery.id, &outcome).await {
            // Not recorded: the delivery stays due and is attempted again (at least once).
            log::warn!("webhooks: recording an attempt failed: {e}");
        }
    }
}

enum Verdict {
    Delivered,
    /// Worth another attempt (a timeout, a connection error, 429, 5xx).
    Retry(String),
    /// The endpoint refused it for good (another 4xx, a redirect).
    Dead(String),
    /// 410: the subscription ends.
    Gone,
}

fn judge(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        429 | 500..=599 => Verdict::Retry(format!("HTTP {status}")),
        _ => Verdict::Dead(format!("HTTP {status}")),
    }
}

/// The request body: the Standard Webhooks envelope around the feed's event.
fn envelope(event: &FeedEvent, delivery: &Delivery) -> String {
    let data = event.json.as_deref().unwrap_or("null");
    let head = serde_json::json!({
        "type": format!("run.{}", event.kind),
        "timestamp": delivery.event.created_at.and_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
    .to_string();
    format!("{},\"data\":{data}}}", head.trim_end_matches('}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_judged_as_the_scheme_expects() {
        assert!(matches!(judge(204), Verdict::Delivered));
        assert!(matches!(judge(410), Verdict::Gone));
        assert!(matches!(judge(429), Verdict::Retry(_)));
        assert!(matches!(judge(503), Verdict::Retry(_)));
        assert!(matches!(judge(400), Verdict::Dead(_)));
        assert!(matches!(judge(301), Verdict::Dead(_)));
    }

    #[test]
    fn back_off_grows_to_its_cap() {
        let policy = DeliveryPolicy {
            max_attempts: 10,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            timeout: Duration::from_secs(1),
            concurrency: 1,
        };
        let first = policy.backoff(1);
        let later = policy.backoff(8);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        assert!(later >= Duration::from_millis(1000) && later <= Duration::from_millis(2000));
    }
}

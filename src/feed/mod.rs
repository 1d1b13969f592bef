//! The change feed's edge: Server-Sent Events streams of committed changes
//! (`GET /api/crdt/runs/{runId}/events`, `GET /api/crdt/events`) and signed webhooks.
//!
//! It reaches the runtime only through [`ChangeFeed`](crate::runs::ChangeFeed): pages of the
//! log by cursor and the live tail.

mod sse;
pub mod webhooks;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use prometheus::{IntCounter, IntGauge};

use crate::runs::ChangeFeed;

/// What the feed's routes share.
pub struct FeedEdge {
    pub feed: Arc<ChangeFeed>,
    pub heartbeat: Duration,
    /// Streams open at most; more are refused with 503.
    pub max_streams: usize,
    /// Streams open now.
    open: AtomicUsize,
    /// Streams one user token may hold open (the service credential: only `max_streams`).
    pub max_per_user: usize,
    /// Streams open per user token's `sub`.
    per_user: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    pub metrics: FeedMetrics,
    /// Set when the node stops: every stream ends, telling its consumer why.
    stopping: tokio::sync::watch::Sender<bool>,
    pub webhooks: webhooks::Webhooks,
}

impl FeedEdge {
    /// The feed's edge, with webhook delivery started (on the current actix thread).
    pub async fn start(
        feed: Arc<ChangeFeed>,
        settings: &crate::config::Feed,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Self, webhooks::WebhookError> {
        let webhooks = webhooks::Webhooks::start(feed.clone(), &settings.webhooks, metrics).await?;
        Ok(FeedEdge {
            feed,
            heartbeat: Duration::from_millis(settings.heartbeat_ms),
            max_streams: settings.max_streams,
            open: AtomicUsize::new(0),
            max_per_user: settings.max_streams_per_user,
            per_user: Default::default(),
            metrics: FeedMetrics {
                streams: metrics.feed_streams.clone(),
                streamed: metrics.feed_streamed.clone(),
            },
            stopping: tokio::sync::watch::channel(false).0,
            webhooks,
        })
    }

    /// Takes a place among `user`'s streams; false when they hold all they may.
    fn take_user_place(&self, user: &str) -> bool {
        let mut open = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(user.to_string()).or_default();
        if *n >= self.max_per_user {
            return false;
        }
        *n += 1;
        true
    }

    fn give_user_place(&self, user: &str) {
        let mut open = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(user);
            }
        }
    }

    /// The node is stopping: ends every stream (their consumers resume elsewhere or later).
    pub fn close(&self) {
        let _ = self.stopping.send(true);
    }
}

#[derive(Clone)]
pub struct FeedMetrics {
    pub streams: IntGauge,
    pub streamed: IntCounter,
}

/// The feed's routes, mounted under `/api/crdt` (behind its authentication).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/runs/{runId}/events", web::get().to(sse::run_events))
        .route("/events", web::get().to(sse::node_events))
        .configure(webhooks::routes);
}

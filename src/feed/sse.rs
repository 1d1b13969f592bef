//! Server-Sent Events: a run's events, or every run's the caller may read.
//!
//! A stream replays the log after its cursor (`Last-Event-ID`, or `?after=`), then follows the
//! live tail: events the replay already sent are skipped by cursor, so the seam has no gap and
//! no duplicate. Without a cursor it starts live. Each stream's producer hands frames to the
//! response through a small channel, so what one subscriber holds stays bounded; a consumer
//! that falls further behind than the tail's ring is closed with the reason and the cursor to
//! resume from (the log is the buffer).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::FeedEdge;
use crate::api_error::ApiError;
use crate::http::auth::allow;
use crate::http::validate;
use crate::identity::{Access, Identity, RunSet};
use crate::runs::{FeedEvent, FEED_PAGE};

/// Frames waiting for one consumer's socket.
const FRAMES_QUEUED: usize = 16;
/// A consumer that takes no frame for this long is dropped.
const STALLED: Duration = Duration::from_secs(60);
/// Most run ids one node-wide stream may name.
const MAX_RUNS_FILTER: usize = 1000;

#[derive(Deserialize)]
pub struct StreamQuery {
    after: Option<String>,
    runs: Option<String>,
}

/// Which events a stream carries.
#[derive(Clone)]
enum Filter {
    Run(Uuid),
    Runs(Arc<HashSet<Uuid>>),
    All,
}

impl Filter {
    fn takes(&self, run: Uuid) -> bool {
        match self {
            Filter::Run(r) => *r == run,
            Filter::Runs(runs) => runs.contains(&run),
            Filter::All => true,
        }
    }

    /// The run to read from the log alone, when there is one.
    fn run(&self) -> Option<Uuid> {
        match self {
            Filter::Run(r) => Some(*r),
            _ => None,
        }
    }
}

pub async fn run_events(
    edge: web::Data<FeedEdge>,
    caller: Identity,
    path: web::Path<String>,
    query: web::Query<StreamQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let run = validate::run_id(&path)?;
    allow(&caller, run, Access::Read)?;
    if query.runs.is_some() {
        return Err(ApiError::invalid(
            "runs",
            "a run's stream carries that run; `runs` filters the node-wide stream",
        ));
    }
    open(edge, &caller, Filter::Run(run), &query, &req).await
}

pub async fn node_events(
    edge: web::Data<FeedEdge>,
    caller: Identity,
    query: web::Query<StreamQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let named = query.runs.as_deref().map(parse_runs).transpose()?;
    let filter = match (named, &caller) {
        (Some(runs), _) => {
            for run in &runs {
                allow(&caller, *run, Access::Read)?;
            }
            Filter::Runs(Arc::new(runs))
        }
        (None, Identity::User(grant)) => match &grant.runs {
            RunSet::All => Filter::All,
            // A user token's node-wide stream carries its runs only.
            RunSet::Only(runs) => Filter::Runs(Arc::new(runs.iter().copied().collect())),
        },
        (None, Identity::Service) => Filter::All,
    };
    open(edge, &caller, filter, &query, &req).await
}

fn parse_runs(list: &str) -> Result<HashSet<Uuid>, ApiError> {
    let runs: Vec<&str> = list.split(',').filter(|s| !s.is_empty()).collect();
    if runs.is_empty() || runs.len() > MAX_RUNS_FILTER {
        return Err(ApiError::invalid(
            "runs",
            format!("1 to {MAX_RUNS_FILTER} comma-separated run ids"),
        ));
    }
    runs.into_iter()
        .map(|r| validate::run_id(r).map_err(|e| ApiError::invalid("runs", e.to_string())))
        .collect()
}

/// The cursor to resume after: `Last-Event-ID` (what a reconnecting EventSource sends with
/// its original URL) before `?after=`.
fn cursor(query: &StreamQuery, req: &HttpRequest) -> Result<Option<i64>, ApiError> {
    let header = req
        .headers()
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID", "not text"))
        })
        .transpose()?;
    let (field, value) = match (header, query.after.as_deref()) {
        (Some(h), _) => ("Last-Event-ID", h),
        (None, Some(a)) => ("after", a),
        (None, None) => return Ok(None),
    };
    value
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|c| *c >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("{value:?} is not a cursor (an event's id, or 0 for the beginning)"),
            )
        })
}

/// A place among the node's open streams, given back when the stream ends.
struct Place(Arc<FeedEdge>, Option<String>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.streams.dec();
        if let Some(user) = &self.1 {
            self.0.give_user_place(user);
        }
    }
}

async fn open(
    edge: web::Data<FeedEdge>,
    caller: &Identity,
    filter: Filter,
    query: &StreamQuery,
    req: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let after = cursor(query, req)?;
    let feed = edge.feed.clone();
    if let Some(c) = after {
        let known = feed
            .knows(c)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        if !known {
            return Err(ApiError::invalid(
                "cursor",
                format!(
                    "{c} is not an event of this node's log (cursors are per node: resume \
                     from 0, or from a cursor this node gave)"
                ),
            ));
        }
    }
    // One user's streams are bounded, so that one token cannot take every place.
    let user = match caller {
        Identity::User(grant) => Some(grant.sub.clone()),
        Identity::Service => None,
    };
    if let Some(user) = &user {
        if !edge.take_user_place(user) {
            return Err(ApiError::TooMany(format!(
                "{user} holds {} event streams, as many as one user may: close one first",
                edge.max_per_user
            )));
        }
    }
    if edge.open.fetch_add(1, Ordering::SeqCst) >= edge.max_streams {
        edge.open.fetch_sub(1, Ordering::SeqCst);
        if let Some(user) = &user {
            edge.give_user_place(user);
        }
        return Err(ApiError::Unavailable(format!(
            "this node serves {} event streams at most; retry shortly",
            edge.max_streams
        )));
    }
    edge.metrics.streams.inc();
    let edge = edge.into_inner();
    let place = Place(edge.clone(), user);
    let live = feed
        .subscribe()
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let after = match after {
        Some(c) => c,
        None => feed
            .last()
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?,
    };
    let expires = match caller {
        Identity::User(grant) => Some(grant.expires),
        Identity::Service => None,
    };
    let (tx, mut rx) = mpsc::channel::<web::Bytes>(FRAMES_QUEUED);
    let stream = Stream {
        stopping: edge.stopping.subscribe(),
        edge,
        filter,
        last: after,
        tx,
        expires,
    };
    actix_web::rt::spawn(async move {
        let _place = place;
        stream.run(live).await;
    });
    let body = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|frame| frame.map(Ok::<_, actix_web::Error>))
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Proxies (nginx) must pass events on as they come.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// One stream's producer.
struct Stream {
    edge: Arc<FeedEdge>,
    filter: Filter,
    /// The cursor of the last event sent (or skipped by the filter).
    last: i64,
    tx: mpsc::Sender<web::Bytes>,
    /// A user token's expiry (seconds since the epoch): the stream ends then.
    expires: Option<u64>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// Why a stream ended.
enum End {
    /// The consumer went away.
    Gone,
    /// Closed by the node, with the reason told to the consumer.
    Closed(String),
}

impl Stream {
    async fn run(mut self, mut live: broadcast::Receiver<FeedEvent>) {
        let _ = self.send("retry: 1000\n\n".into()).await;
        let end = loop {
            if let Err(end) = self.replay().await {
                break end;
            }
            match self.follow(&mut live).await {
                // Fell behind while replaying: the log is the buffer, replay again from it.
                Ok(()) => match self.edge.feed.subscribe().await {
                    Ok(fresh) => live = fresh,
                    Err(e) => break End::Closed(format!("the log is unavailable: {e}")),
                },
                Err(end) => break end,
            }
        };
        if let End::Closed(reason) = end {
            let data = serde_json::json!({"reason": reason, "resumeAfter": self.last});
            let _ = self
                .tx
                .send(format!("event: closed\ndata: {data}\n\n").into())
                .await;
        }
    }

    /// Sends the log's events after `last` until it has none.
    async fn replay(&mut self) -> Result<(), End> {
        loop {
            let page = self
                .edge
                .feed
                .page(self.last, self.filter.run())
                .await
                .map_err(|e| End::Closed(format!("the log is unavailable: {e}")))?;
            for event in &page {
                self.event(event).await?;
            }
            if (page.len() as i64) < FEED_PAGE {
                return Ok(());
            }
        }
    }

    /// Follows the live tail. `Ok` when it lagged before any live event was sent (the replay
    /// took long): replay again. A consumer lagging after that is too slow and is closed.
    async fn follow(&mut self, live: &mut broadcast::Receiver<FeedEvent>) -> Result<(), End> {
        let mut heartbeat = tokio::time::interval(self.edge.heartbeat);
        heartbeat.reset();
        let mut caught_up = false;
        let mut stopping = self.stopping.clone();
        let expiry = self.expires.map(|exp| {
            let now = chrono::Utc::now().timestamp().max(0) as u64;
            tokio::time::Instant::now() + Duration::from_secs(exp.saturating_sub(now))
        });
        loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok(event) if event.id <= self.last => {}
                    Ok(event) => {
                        caught_up = true;
                        let event = match event.json {
                            Some(_) => event,
                            // Too large for the ring: read it from the log.
                            None => match self.edge.feed.event(event.id, event.run_id).await {
                                Ok(Some(full)) => full,
                                Ok(None) => continue,
                                Err(e) => {
                                    return Err(End::Closed(format!("the log is unavailable: {e}")))
                                }
                            },
                        };
                        self.event(&event).await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) if !caught_up => return Ok(()),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        return Err(End::Closed(format!(
                            "too slow: {n} events went by unread; resume from your last cursor"
                        )))
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(End::Closed("the node is stopping".into()))
                    }
                },
                _ = heartbeat.tick() => self.send(": keep-alive\n\n".into()).await?,
                _ = stopping.wait_for(|stop| *stop) => {
                    return Err(End::Closed("the node is stopping; resume from another node or later".into()))
                }
                _ = sleep_until(expiry) => {
                    return Err(End::Closed("the token expired; reconnect with a fresh one".into()))
                }
            }
        }
    }

    async fn event(&mut self, event: &FeedEvent) -> Result<(), End> {
        self.last = self.last.max(event.id);
        if !self.filter.takes(event.run_id) {
            return Ok(());
        }
        let Some(json) = &event.json else {
            return Ok(());
        };
        self.send(format!("id: {}\ndata: {json}\n\n", event.id).into())
            .await?;
        self.edge.metrics.streamed.inc();
        Ok(())
    }

    /// Queues a frame for the consumer. One that takes nothing for [`STALLED`] (its socket
    /// full, the heartbeats included) is dropped: it holds a place among the streams and the
    /// rows in hand, and resumes from its cursor when it reads again.
    async fn send(&self, frame: web::Bytes) -> Result<(), End> {
        match tokio::time::timeout(STALLED, self.tx.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(End::Gone),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

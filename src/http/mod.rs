//! The HTTP edge: routes under `/api/crdt`, health under `/actuator`, metrics at
//! `/actuator/prometheus`, the browser's WebSocket at `/ws/runs/{runId}`, automerge-repo's at
//! `/ws/automerge` and the pages (`/`,
//! `/runs/{runId}`, `/mesh`). Routes only parse, validate and send a message to the core.

pub(crate) mod auth;
mod automerge;
pub mod body_budget;
mod browser;
pub mod cluster_link;
mod deletion;
pub mod error;
mod forward;
mod health;
mod history;
mod internal;
mod mesh;
pub mod origin;
mod page;
mod runs;
mod scrape;
mod socket_relay;
pub mod validate;

use std::sync::Arc;

use actix_web::{middleware, web, HttpResponse};

use crate::automerge_repo::AutomergeRepo;
use crate::browser::Browser;
use crate::identity::Auth;
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::runs::Runs;
use error::ApiError;

/// What every route can reach.
pub struct AppState {
    pub runs: Runs,
    pub mesh: Mesh,
    pub browser: Browser,
    /// Each run's viewers in every region, for the runs list.
    pub viewers: Arc<dyn crate::presence::Viewers>,
    pub automerge: AutomergeRepo,
    pub metrics: Metrics,
    pub region: String,
    pub node_id: String,
    /// Pages that may open the browser and automerge-repo WebSockets.
    pub origins: origin::AllowedOrigins,
    /// The credentials every door takes.
    pub auth: Arc<Auth>,
    /// The metrics scraper's credential (`http::scrape`).
    pub metrics_token: Option<String>,
    /// The budget of incoming WebSocket messages, and how long one may take.
    pub incoming: Incoming,
    /// The change feed's edge, whose routes are mounted under `/api/crdt`.
    pub feed: web::Data<crate::feed::FeedEdge>,
    /// On a shared database: the secret the region's pods prove their calls with.
    pub cluster_secret: Option<String>,
}

/// What every WebSocket door reads within (see `socket::reader`).
#[derive(Clone)]
pub struct Incoming {
    pub budget: crate::socket::MemoryBudget,
    pub deadline: std::time::Duration,
}

impl Incoming {
    /// Read limits for one socket: `unproven` bytes a message until it proves itself, then
    /// `proven`.
    pub fn limits(&self, unproven: usize, proven: usize) -> crate::socket::ReadLimits {
        crate::socket::ReadLimits {
            frame: crate::socket::FrameLimit::new(unproven, proven),
            message_deadline: self.deadline,
            budget: self.budget.clone(),
        }
    }

    /// The limits of a socket admitted with `slot` (a place among the unproven ones, which
    /// raises them when given up), or with none (proved on the upgrade: raised at once).
    pub fn admitted(
        &self,
        slot: Option<crate::admission::PreAuthSlot>,
        unproven: usize,
        proven: usize,
    ) -> (
        crate::socket::ReadLimits,
        Option<crate::admission::PreAuthSlot>,
    ) {
        let limits = self.limits(unproven, proven);
        let slot = match slot {
            Some(slot) => Some(slot.raising(&limits.frame)),
            None => {
                limits.frame.raise();
                None
            }
        };
        (limits, slot)
    }
}

/// Registers everything on an App; `max_body` bounds every request body.
pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<AppState>, max_body: usize) {
    let auth = web::Data::new(state.auth.clone());
    let feed = state.feed.clone();
    cfg.app_data(state)
        .app_data(feed)
        .app_data(auth)
        .app_data(
            web::JsonConfig::default()
                .limit(max_body)
                .error_handler(move |e, _| error::json_error(e, max_body)),
        )
        .app_data(web::PayloadConfig::default().limit(max_body))
        .app_data(web::QueryConfig::default().error_handler(|e, _| error::query_error(e)))
        .configure(health::routes)
        .configure(scrape::routes)
        .configure(mesh::socket)
        .configure(browser::routes)
        .configure(automerge::socket)
        .configure(page::routes)
        .configure(internal::routes)
        .service(
            web::scope("/api/crdt")
                // Authenticated first (the outer wrap), then forwarded to the run's owner.
                .wrap(middleware::from_fn(forward::forward))
                .wrap(middleware::from_fn(auth::authenticate))
                .configure(runs::routes)
                .configure(history::routes)
                .configure(deletion::routes)
                .configure(crate::feed::routes)
                .configure(automerge::routes)
                .configure(mesh::routes),
        )
        .default_service(web::to(not_found));
}

/// Refuses a URL whose percent-encoded bytes are not UTF-8: decoded lossily, `%ff` and `%fe`
/// would both become U+FFFD and name the same flag key, user or run.
pub async fn utf8_only(
    req: actix_web::dev::ServiceRequest,
    next: middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let decodes = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .is_ok()
    };
    if !decodes(req.path()) || !decodes(req.query_string()) {
        return Err(ApiError::BadRequest(
            "the URL's percent-encoded bytes are not valid UTF-8".into(),
        )
        .into());
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

async fn not_found(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

//! Requests for a run another pod of the region owns are forwarded to it (a region whose pods
//! share one database, `runs::ownership`): the client never learns which pod serves the run.
//!
//! Only `/api/crdt/runs/{runId}/…` is forwarded; everything else reads the shared database
//! (the runs list, the change feed) or is the pod's own. A forwarded request carries
//! `x-crdt-forwarded-by`, and the pod that receives it never forwards it again: if the run
//! moved once more meanwhile, it answers 503 and the client retries.

use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::HeaderName;
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpResponse};
use uuid::Uuid;

use super::error::ApiError;
use super::AppState;
use crate::runs::Location;

/// Names the pod (member) that forwarded a request.
pub const FORWARDED_BY: &str = "x-crdt-forwarded-by";
/// On a forwarded request's 503: the pod it reached no longer holds the run (the forwarder
/// forgets where the run was and looks again).
pub const RUN_MOVED: &str = "x-crdt-run-moved";

/// A forwarded request's whole time, answer included (the owner's own write timeout is 10 s).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

thread_local! {
    // awc's client is per thread; each HTTP worker keeps one (and its connection pool).
    static CLIENT: awc::Client = awc::Client::builder()
        .timeout(FORWARD_TIMEOUT)
        .max_http_version(awc::http::Version::HTTP_11)
        .finish();
}

/// The run a path names, if it is one of the run routes forwarded to the owner.
fn forwarded_run(path: &str) -> Option<Uuid> {
    let rest = path.strip_prefix("/api/crdt/runs/")?;
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    // The change feed reads the shared log on whichever pod the client reached.
    if tail == "events" {
        return None;
    }
    Uuid::parse_str(id).ok()
}

fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// The run's owner when it is another pod and this request was not forwarded already (with
/// this pod's member id, to name the forwarder).
pub async fn owner_elsewhere(
    app: &AppState,
    req: &actix_web::HttpRequest,
    run_id: Uuid,
) -> Option<(run_store::Owner, std::sync::Arc<str>)> {
    let ownership = app.runs.ownership()?;
    if req.headers().contains_key(FORWARDED_BY) {
        return None;
    }
    match app.runs.locate(run_id).await {
        Ok(Location::At(owner)) => Some((owner, ownership.member().clone())),
        _ => None,
    }
}

pub async fn forward(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let (Some(state), Some(run_id)) = (state, forwarded_run(req.path())) else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let Some(ownership) = state.runs.ownership().cloned() else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let forwarded = req.headers().contains_key(FORWARDED_BY);
    // A pod handing its runs over serves none: the forwarder is told to look again.
    if forwarded && ownership.is_leaving() {
        return Ok(req.into_response(moved()));
    }
    let owner = match state.runs.locate(run_id).await {
        Ok(Location::At(owner)) => owner,
        // Served here; or an error the route meets again and answers in its own words.
        _ => return Ok(next.call(req).await?.map_into_boxed_body()),
    };
    if forwarded {
        return Ok(req.into_response(moved()));
    }
    let (http, mut payload) = req.into_parts();
    // Buffered (within the body limit the budget already charged): a pod that is gone is
    // found before anything is sent, and the request can be served elsewhere.
    let body = <web::Bytes as actix_web::FromRequest>::from_request(&http, &mut payload).await?;
    let mut target = owner;
    for attempt in 0..2 {
        let path = http.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut out =
            CLIENT.with(|c| c.request(http.method().clone(), format!("{}{path}", target.address)));
        for (name, value) in http.headers() {
            if !hop_by_hop(name) {
                out = out.append_header((name.clone(), value.clone()));
            }
        }
        out = out.insert_header((FORWARDED_BY, &**ownership.member()));
        let sent = out.send_body(body.clone()).await;
        // The pod reached holds the run no more: as if it had not answered.
        let sent = match sent {
            Ok(answer) if answer.headers().contains_key(RUN_MOVED) => {
                Err("it no longer holds the run".to_string())
            }
            other => other.map_err(|e| e.to_string()),
        };
        match sent {
            Ok(answer) => {
                state.metrics.forwarded.with_label_values(&["http"]).inc();
                let mut reply = HttpResponse::build(answer.status());
                for (name, value) in answer.headers() {
                    if !hop_by_hop(name) {
                        reply.append_header((name.clone(), value.clone()));
                    }
                }
                // Streamed, with the owner's length when it gave one (clients that read by
                // length, not chunks, keep working).
                let length = answer
                    .headers()
                    .get(actix_web::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let reply = match length {
                    Some(length) => reply.body(actix_web::body::SizedStream::new(length, answer)),
                    None => reply.streaming(answer),
                };
                return Ok(ServiceResponse::new(http, reply));
            }
            Err(e) => {
                log::warn!(
                    "run {run_id}: its pod at {} did not answer: {e}",
                    target.address
                );
                state.runs.owner_unreachable(run_id);
                if attempt == 1 {
                    break;
                }
                match state.runs.locate(run_id).await {
                    Ok(Location::At(next_owner)) if next_owner != target => target = next_owner,
                    Ok(Location::At(_)) => break,
                    // Taken over here: serve it.
                    Ok(Location::Here) => {
                        let req = ServiceRequest::from_parts(http, body_payload(body));
                        return Ok(next.call(req).await?.map_into_boxed_body());
                    }
                    Err(e) => return Err(ApiError::from(e).into()),
                }
            }
        }
    }
    Err(ApiError::Unavailable(
        "the pod that owns this run does not answer; it is taken over once its lease lapses, \
         try again"
            .into(),
    )
    .into())
}

/// 503 for a forwarded request this pod does not serve, marked so the forwarder looks again.
fn moved() -> HttpResponse {
    let moved =
        ApiError::Unavailable("the run is moving between this region's pods; try again".into());
    let mut answer = actix_web::ResponseError::error_response(&moved);
    answer.headers_mut().insert(
        HeaderName::from_static(RUN_MOVED),
        actix_web::http::header::HeaderValue::from_static("1"),
    );
    answer
}

fn body_payload(body: web::Bytes) -> actix_web::dev::Payload {
    let (_, mut payload) = actix_http::h1::Payload::create(true);
    payload.unread_data(body);
    actix_web::dev::Payload::from(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_routes_are_forwarded_but_the_feed_is_not() {
        let run = Uuid::new_v4();
        assert_eq!(
            forwarded_run(&format!("/api/crdt/runs/{run}/state")),
            Some(run)
        );
        assert_eq!(forwarded_run(&format!("/api/crdt/runs/{run}")), Some(run));
        assert_eq!(
            forwarded_run(&format!("/api/crdt/runs/{run}/flags/k")),
            Some(run)
        );
        assert_eq!(forwarded_run(&format!("/api/crdt/runs/{run}/events")), None);
        assert_eq!(forwarded_run("/api/crdt/runs"), None);
        assert_eq!(forwarded_run("/api/crdt/runs/not-a-uuid/state"), None);
        assert_eq!(forwarded_run("/api/crdt/mesh/status"), None);
    }
}

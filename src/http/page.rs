//! The pages people use, built into the binary from `web/`: the runs list (`/`), a run
//! (`/runs/{runId}`) and the mesh status for operators (`/mesh`). Plain HTML, CSS and script,
//! no build step; they talk to the node through `/api/crdt` and `/ws/runs/{runId}`.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

use super::error::ApiError;
use super::validate;

const INDEX: &str = include_str!("../../web/index.html");
const RUN: &str = include_str!("../../web/run.html");
const MESH: &str = include_str!("../../web/mesh.html");

/// Assets by name: content and type.
const ASSETS: [(&str, &str, &str); 7] = [
    (
        "app.css",
        include_str!("../../web/app.css"),
        "text/css; charset=utf-8",
    ),
    (
        "common.js",
        include_str!("../../web/common.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "list.js",
        include_str!("../../web/list.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "run.js",
        include_str!("../../web/run.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "picture.js",
        include_str!("../../web/picture.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "timeline.js",
        include_str!("../../web/timeline.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "mesh.js",
        include_str!("../../web/mesh.js"),
        "text/javascript; charset=utf-8",
    ),
];

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(|| async { html(INDEX) }))
        .route("/mesh", web::get().to(|| async { html(MESH) }))
        .route("/runs/{runId}", web::get().to(run))
        .route("/assets/{name}", web::get().to(asset));
}

fn html(body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        // Pages change with the binary; always revalidate them.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

async fn run(path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    validate::run_id(&path)?;
    Ok(html(RUN))
}

async fn asset(path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let (_, body, kind) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == path.as_str())
        .ok_or_else(|| ApiError::NotFound(format!("no asset {:?}", path.as_str())))?;
    Ok(HttpResponse::Ok()
        .content_type(*kind)
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(*body))
}

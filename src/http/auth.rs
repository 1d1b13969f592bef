//! Who is calling `/api`: the bearer token (the static API token, or a signed user token) is
//! checked once here, and the [`Identity`] it proves rides on the request for the routes.

use std::future::{ready, Ready};
use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, Error, FromRequest, HttpMessage, HttpRequest};
use uuid::Uuid;

use super::error::ApiError;
use crate::identity::{Access, Auth, Identity};

/// The token after `Authorization: Bearer `, if any.
pub fn bearer(headers: &header::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Refuses a request whose bearer token proves no identity (401, with the reason); otherwise
/// hands the identity to the route.
pub async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let auth = req
        .app_data::<web::Data<Arc<Auth>>>()
        .map(|a| a.get_ref().clone())
        .ok_or_else(|| ApiError::Internal("no credentials configured".into()))?;
    let identity = auth
        .identify(bearer(req.headers()))
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    req.extensions_mut().insert(identity);
    next.call(req).await
}

impl FromRequest for Identity {
    type Error = ApiError;
    type Future = Ready<Result<Identity, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let found = req.extensions().get::<Identity>().cloned();
        ready(found.ok_or_else(|| ApiError::Unauthorized("no identity on this route".into())))
    }
}

/// Refuses a user token where only the service credential may act (403 naming `what`).
pub fn service_only(caller: &Identity, what: &str) -> Result<(), ApiError> {
    match caller {
        Identity::Service => Ok(()),
        Identity::User(_) => Err(ApiError::Forbidden(format!(
            "{what} with the API token, not a user token"
        ))),
    }
}

/// Whether `identity` may `access` the run (403 with the reason if not).
pub fn allow(identity: &Identity, run: Uuid, access: Access) -> Result<(), ApiError> {
    identity
        .allows(run, access)
        .map_err(|e| ApiError::Forbidden(e.to_string()))
}

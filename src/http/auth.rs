//! Bearer-token access to `/api`: when a token is configured, every request must carry
//! `Authorization: Bearer <token>`. Compared in constant time.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, Error};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// The configured token, shared with the middleware as app data.
#[derive(Clone)]
pub struct ApiToken(pub Option<String>);

pub async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let expected = req
        .app_data::<web::Data<ApiToken>>()
        .and_then(|t| t.0.clone());
    if let Some(expected) = expected {
        if !bearer_matches(req.headers(), &expected) {
            return Err(ApiError::Unauthorized.into());
        }
    }
    next.call(req).await
}

/// Whether the request carries `Authorization: Bearer <expected>`.
pub fn bearer_matches(headers: &header::HeaderMap, expected: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .is_some_and(|p| bool::from(p.as_bytes().ct_eq(expected.as_bytes())))
}

//! Errors at the HTTP edge, each mapped to a status code and a JSON body:
//! `{"error": "<code>", "message": "<what went wrong, for a person>"}`.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

pub use crate::api_error::ApiError;

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } | ApiError::TooLargeContent(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized(_)) {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(json!({"error": self.code(), "message": self.to_string()}))
    }
}

/// Turns actix's JSON extractor errors into our JSON error bodies.
pub fn json_error(err: actix_web::error::JsonPayloadError, limit: usize) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let api = match &err {
        J::Overflow { .. } | J::OverflowKnownLength { .. } => ApiError::TooLarge { limit },
        J::ContentType => ApiError::BadRequest("expected Content-Type: application/json".into()),
        J::Deserialize(e) => ApiError::BadRequest(format!("malformed JSON body: {e}")),
        J::Payload(actix_web::error::PayloadError::Io(e)) if super::body_budget::is_timeout(e) => {
            ApiError::Timeout(e.to_string())
        }
        J::Payload(actix_web::error::PayloadError::Io(e))
            if super::body_budget::is_over_budget(e) =>
        {
            ApiError::Unavailable(e.to_string())
        }
        other => ApiError::BadRequest(format!("unreadable JSON body: {other}")),
    };
    api.into()
}

/// Turns query-string errors into our JSON error bodies.
pub fn query_error(err: actix_web::error::QueryPayloadError) -> actix_web::Error {
    ApiError::BadRequest(format!("malformed query string: {err}")).into()
}

/// The answer to a WebSocket upgrade the door has no room for (see `admission`): 503 for a
/// full pool, 429 for an address or a network holding its share.
pub fn busy(refused: crate::admission::Refused) -> HttpResponse {
    let status = match refused {
        crate::admission::Refused::Address | crate::admission::Refused::Range => {
            StatusCode::TOO_MANY_REQUESTS
        }
        crate::admission::Refused::Full => StatusCode::SERVICE_UNAVAILABLE,
    };
    HttpResponse::build(status)
        .insert_header((header::RETRY_AFTER, "1"))
        .json(json!({"error": "busy", "message": refused.to_string()}))
}

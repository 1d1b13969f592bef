//! The errors the node answers requests with, one vocabulary for every edge that answers a
//! person or a service: the HTTP API (a status code and `{"error", "message"}`) and browser
//! sessions (an `ERROR` frame with the same code and message).

use run_doc::rules::Invalid;
use run_doc::DocError;

use crate::runs::RunError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("request body is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    /// A body within the byte limit whose content costs too much (operations, inflated size).
    #[error("{0}")]
    TooLargeContent(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The run was deleted.
    #[error("{0}")]
    Gone(String),
    /// The request does not fit the resource's state (restoring a run that is not deleted).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    /// A request body that did not arrive within the deadline.
    #[error("{0}")]
    Timeout(String),
    /// The caller holds as many of something as one caller may (event streams).
    #[error("{0}")]
    TooMany(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ApiError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Invalid { .. } => "invalid_field",
            ApiError::TooLarge { .. } | ApiError::TooLargeContent(_) => "payload_too_large",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Gone(_) => "gone",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Timeout(_) => "request_timeout",
            ApiError::TooMany(_) => "too_many_requests",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<RunError> for ApiError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Unavailable(_)
            | RunError::Busy(_)
            | RunError::Stopped
            | RunError::Elsewhere(_) => ApiError::Unavailable(e.to_string()),
            RunError::Doc(DocError::InvalidChanges(_)) => ApiError::BadRequest(e.to_string()),
            RunError::Doc(DocError::TooLarge(ref why)) => ApiError::TooLargeContent(why.clone()),
            RunError::Doc(DocError::MissingDependencies(_))
            | RunError::Doc(DocError::Refused { .. })
            | RunError::PartiallyApplied { .. } => ApiError::Unprocessable(e.to_string()),
            RunError::Doc(DocError::Schema(_)) | RunError::Doc(DocError::ClockJump(_)) => {
                ApiError::Unprocessable(e.to_string())
            }
            RunError::Doc(DocError::NotPermitted(_)) => ApiError::Forbidden(e.to_string()),
            RunError::Doc(DocError::UnknownChange(_)) => ApiError::NotFound(e.to_string()),
            RunError::Doc(_) => ApiError::Internal(e.to_string()),
            RunError::Deleted(_) => ApiError::Gone(e.to_string()),
            RunError::NoSuchRun(_) => ApiError::NotFound(e.to_string()),
            RunError::NotDeleted(_) => ApiError::Conflict(e.to_string()),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        if e.too_large {
            return ApiError::TooLargeContent(e.to_string());
        }
        ApiError::Invalid {
            field: e.field,
            reason: e.reason,
        }
    }
}

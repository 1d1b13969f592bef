//! Checks on values from requests, shared by the routes.

use automerge::ChangeHash;
use base64::Engine;
use uuid::Uuid;

use super::error::ApiError;
use crate::runs::RunActivity;
use run_doc::rules;

pub fn run_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|e| ApiError::invalid("runId", format!("{raw:?} is not a UUID: {e}")))
}

/// A required, trimmed, printable name (the domain's rule, answered as a 400).
pub fn name(field: &'static str, value: Option<&str>) -> Result<String, ApiError> {
    Ok(rules::name(field, value)?)
}

/// A region name as the event log stores it.
pub fn region(field: &'static str, value: Option<&str>) -> Result<String, ApiError> {
    Ok(rules::region(field, value)?)
}

pub fn base64(field: &'static str, value: Option<&str>) -> Result<Vec<u8>, ApiError> {
    let value = value.ok_or_else(|| ApiError::invalid(field, "is required"))?;
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| ApiError::invalid(field, format!("is not valid base64: {e}")))
}

pub fn lamport(field: &'static str, value: Option<i64>) -> Result<Option<u64>, ApiError> {
    Ok(rules::lamport(field, value)?)
}

/// Comma-separated hex change hashes.
pub fn heads(raw: Option<&str>) -> Result<Vec<ChangeHash>, ApiError> {
    raw.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|h| {
            h.parse::<ChangeHash>().map_err(|_| {
                ApiError::invalid("heads", format!("{h:?} is not a 64-hex-digit change hash"))
            })
        })
        .collect()
}

pub fn flag_value(field: &'static str, value: &serde_json::Value) -> Result<(), ApiError> {
    Ok(rules::flag_value(field, value)?)
}

/// A runs-list cursor: the last entry of the previous page, as `<micros since epoch>.<uuid>`.
/// Clients treat it as opaque.
pub fn cursor(raw: &str) -> Result<RunActivity, ApiError> {
    let bad = || ApiError::invalid("cursor", "is not a cursor this node gave out");
    let (micros, id) = raw.split_once('.').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let last_activity = chrono::DateTime::from_timestamp_micros(micros)
        .ok_or_else(bad)?
        .naive_utc();
    let run_id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(RunActivity {
        run_id,
        last_activity,
    })
}

pub fn encode_cursor(a: &RunActivity) -> String {
    format!(
        "{}.{}",
        a.last_activity.and_utc().timestamp_micros(),
        a.run_id.simple()
    )
}

pub fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

//! Checks on values from requests, shared by the routes.

use automerge::ChangeHash;
use base64::Engine;
use uuid::Uuid;

use super::error::ApiError;
use run_doc::MAX_LAMPORT;
use run_store::RunActivity;

/// Longest accepted name (agent, step, user, flag key).
pub const MAX_NAME: usize = 200;

pub fn run_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|e| ApiError::invalid("runId", format!("{raw:?} is not a UUID: {e}")))
}

/// A required, trimmed, printable name.
pub fn name(field: &'static str, value: Option<&str>) -> Result<String, ApiError> {
    let value = value.map(str::trim).unwrap_or("");
    if value.is_empty() {
        return Err(ApiError::invalid(
            field,
            "is required and must not be empty",
        ));
    }
    if value.chars().count() > MAX_NAME {
        return Err(ApiError::invalid(
            field,
            format!("is longer than {MAX_NAME} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value.to_string())
}

/// A region name as the event log stores it (VARCHAR(50)).
pub fn region(field: &'static str, value: Option<&str>) -> Result<String, ApiError> {
    let value = name(field, value)?;
    if value.len() > 50
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError::invalid(
            field,
            "must be 1-50 letters, digits, '-' or '_'",
        ));
    }
    Ok(value)
}

pub fn base64(field: &'static str, value: Option<&str>) -> Result<Vec<u8>, ApiError> {
    let value = value.ok_or_else(|| ApiError::invalid(field, "is required"))?;
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| ApiError::invalid(field, format!("is not valid base64: {e}")))
}

pub fn lamport(field: &'static str, value: Option<i64>) -> Result<Option<u64>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) => match u64::try_from(v) {
            Ok(l) if l <= MAX_LAMPORT => Ok(Some(l)),
            Ok(_) => Err(ApiError::invalid(
                field,
                format!("must be at most {MAX_LAMPORT}"),
            )),
            Err(_) => Err(ApiError::invalid(field, "must not be negative")),
        },
    }
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

/// Deepest nesting accepted in a flag value.
pub const MAX_JSON_DEPTH: usize = 32;

pub fn json_depth(field: &'static str, value: &serde_json::Value) -> Result<(), ApiError> {
    fn depth(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            serde_json::Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    if depth(value) > MAX_JSON_DEPTH {
        return Err(ApiError::invalid(
            field,
            format!("nests deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    Ok(())
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

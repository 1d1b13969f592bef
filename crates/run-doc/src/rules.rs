//! The domain's rules for values from outside, defined once: every door (HTTP, browser
//! sessions, the mesh, automerge-repo clients, legacy rows) checks names, regions, clocks and
//! flag values here.

use serde_json::Value as Json;

/// Longest accepted name (agent, step, user, flag key), in characters.
pub const MAX_NAME: usize = 200;
/// Longest region name: the event log stores it as VARCHAR(50).
pub const MAX_REGION: usize = 50;
/// Deepest nesting accepted in a flag value.
pub const MAX_JSON_DEPTH: usize = 32;

/// How far past the run's clock a foreign client's own `lamport` field may move it.
pub(crate) const MAX_FOREIGN_JUMP: u64 = 1 << 20;

/// How far past the run's clock a node's stamp (or a request's `lamportTimestamp`) may be.
/// Twice the client jump: a node's stamp may follow a client's largest allowed jump.
pub const MAX_LAMPORT_STEP: u64 = 2 * MAX_FOREIGN_JUMP;

/// The largest Lamport timestamp accepted: JavaScript's largest safe integer. A stamp beyond it
/// is ignored, so one bad peer cannot exhaust the clock.
pub const MAX_LAMPORT: u64 = (1 << 53) - 1;

/// A value that breaks one of these rules, with the field it came in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {reason}")]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// A required, trimmed, printable name of at most [`MAX_NAME`] characters.
pub fn name(field: &'static str, value: Option<&str>) -> Result<String, Invalid> {
    let value = value.map(str::trim).unwrap_or("");
    if value.is_empty() {
        return Err(Invalid::new(field, "is required and must not be empty"));
    }
    if value.chars().count() > MAX_NAME {
        return Err(Invalid::new(
            field,
            format!("is longer than {MAX_NAME} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(value.to_string())
}

/// Whether `value` is a region name as the event log stores it.
pub fn is_region(value: &str) -> bool {
    (1..=MAX_REGION).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A required region name: 1-50 letters, digits, '-' or '_'.
pub fn region(field: &'static str, value: Option<&str>) -> Result<String, Invalid> {
    let value = name(field, value)?;
    if !is_region(&value) {
        return Err(Invalid::new(
            field,
            "must be 1-50 letters, digits, '-' or '_'",
        ));
    }
    Ok(value)
}

/// An optional Lamport timestamp from outside: not negative, at most [`MAX_LAMPORT`].
pub fn lamport(field: &'static str, value: Option<i64>) -> Result<Option<u64>, Invalid> {
    match value {
        None => Ok(None),
        Some(v) => match u64::try_from(v) {
            Ok(l) if l <= MAX_LAMPORT => Ok(Some(l)),
            Ok(_) => Err(Invalid::new(
                field,
                format!("must be at most {MAX_LAMPORT}"),
            )),
            Err(_) => Err(Invalid::new(field, "must not be negative")),
        },
    }
}

/// A flag value nests at most [`MAX_JSON_DEPTH`] levels.
pub fn json_depth(field: &'static str, value: &Json) -> Result<(), Invalid> {
    fn depth(v: &Json) -> usize {
        match v {
            Json::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Json::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    if depth(value) > MAX_JSON_DEPTH {
        return Err(Invalid::new(
            field,
            format!("nests deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_bounded_and_printable() {
        assert_eq!(name("agent", Some("  a b ")).unwrap(), "a b");
        assert!(name("agent", None).is_err());
        assert!(name("agent", Some("   ")).is_err());
        assert!(name("agent", Some(&"x".repeat(MAX_NAME + 1))).is_err());
        assert!(name("agent", Some(&"é".repeat(MAX_NAME))).is_ok());
        let e = name("stepId", Some("a\u{7}")).unwrap_err();
        assert_eq!(e.field, "stepId");
        assert!(e.to_string().contains("control characters"), "{e}");
    }

    #[test]
    fn regions_fit_the_log_column() {
        assert!(is_region("us-east_1"));
        assert!(!is_region(""));
        assert!(!is_region("eu west"));
        assert!(!is_region(&"r".repeat(MAX_REGION + 1)));
        assert!(region("sourceRegion", Some("ü")).is_err());
    }

    #[test]
    fn lamports_are_bounded() {
        assert_eq!(lamport("l", None).unwrap(), None);
        assert_eq!(lamport("l", Some(7)).unwrap(), Some(7));
        assert!(lamport("l", Some(-1)).is_err());
        assert!(lamport("l", Some(MAX_LAMPORT as i64 + 1)).is_err());
    }

    #[test]
    fn flag_values_nest_at_most_the_limit() {
        let mut v = Json::Null;
        for _ in 0..MAX_JSON_DEPTH {
            v = Json::Array(vec![v]);
        }
        assert!(json_depth("value", &v).is_ok());
        assert!(json_depth("value", &Json::Array(vec![v])).is_err());
    }
}

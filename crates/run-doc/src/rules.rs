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
/// Values (scalars, arrays, objects) one flag value may hold: each is one Automerge
/// operation, and a flag's change must stay far inside what every replica's loader accepts
/// of one change ([`crate::MAX_OPS_PER_CHANGE`]).
pub const MAX_FLAG_VALUES: usize = 10_000;
/// Bytes of text (strings and object keys) one flag value may hold.
pub const MAX_FLAG_TEXT_BYTES: usize = 256 * 1024;

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
    /// The value is well-formed but larger than accepted (an HTTP 413, not a 400).
    pub too_large: bool,
}

impl Invalid {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Invalid {
            field,
            reason: reason.into(),
            too_large: false,
        }
    }

    pub fn too_large(field: &'static str, reason: impl Into<String>) -> Self {
        Invalid {
            too_large: true,
            ..Invalid::new(field, reason)
        }
    }
}

/// Characters that change how text around them is shown without showing themselves: bidi
/// controls (U+202E turns `ana` into what reads as another name) and zero-width characters.
/// A name holding one could pass for another.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// A required, printable name of at most [`MAX_NAME`] characters, taken as it is: one with
/// spaces around it, control, bidi or zero-width characters is refused, never altered (` ana `
/// trimmed would become another user, `ana` with U+202E would read as one).
pub fn name(field: &'static str, value: Option<&str>) -> Result<String, Invalid> {
    let value = value.unwrap_or("");
    if value.trim().is_empty() {
        return Err(Invalid::new(field, "is required and must not be empty"));
    }
    if value.trim() != value {
        return Err(Invalid::new(
            field,
            "must not start or end with white space",
        ));
    }
    if value.chars().any(is_invisible) {
        return Err(Invalid::new(
            field,
            "must not contain bidi controls or zero-width characters",
        ));
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

/// A name in a row stored before the rules above were strict (legacy OT events): trimmed as
/// it was then. What the log already holds is never judged more strictly than when it was
/// written.
pub fn stored_name(field: &'static str, value: Option<&str>) -> Result<String, Invalid> {
    let value = value.map(str::trim).unwrap_or("");
    if value.is_empty() || value.chars().count() > MAX_NAME || value.chars().any(char::is_control) {
        return Err(Invalid::new(field, "is missing or not a valid name"));
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

/// Longest node id, in bytes.
pub const MAX_NODE_ID: usize = 100;

/// Whether `value` is a node id: 1-100 printable characters, no white space, no bidi or
/// zero-width characters (configuration, mesh handshakes and presence check it here).
pub fn is_node_id(value: &str) -> bool {
    (1..=MAX_NODE_ID).contains(&value.len())
        && !value
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || is_invisible(c))
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

/// A flag value: nested at most [`MAX_JSON_DEPTH`] levels, at most [`MAX_FLAG_VALUES`]
/// values and [`MAX_FLAG_TEXT_BYTES`] bytes of text. The last two keep every flag's change
/// one that every replica accepts and loads again.
pub fn flag_value(field: &'static str, value: &Json) -> Result<(), Invalid> {
    #[derive(Default)]
    struct Size {
        depth: usize,
        values: usize,
        text: usize,
    }
    // One pass: nesting, values and text together (serde_json bounds the recursion: it
    // parses at most 128 levels).
    fn walk(v: &Json, level: usize, size: &mut Size) {
        size.values += 1;
        match v {
            Json::Array(items) => {
                size.depth = size.depth.max(level + 1);
                items.iter().for_each(|i| walk(i, level + 1, size));
            }
            Json::Object(fields) => {
                size.depth = size.depth.max(level + 1);
                fields.iter().for_each(|(k, i)| {
                    size.text += k.len();
                    walk(i, level + 1, size)
                });
            }
            Json::String(s) => size.text += s.len(),
            _ => {}
        }
    }
    let mut size = Size::default();
    walk(value, 0, &mut size);
    if size.depth > MAX_JSON_DEPTH {
        return Err(Invalid::new(
            field,
            format!("nests deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    if size.values > MAX_FLAG_VALUES {
        return Err(Invalid::too_large(
            field,
            format!(
                "holds {} values; at most {MAX_FLAG_VALUES} are accepted",
                size.values
            ),
        ));
    }
    if size.text > MAX_FLAG_TEXT_BYTES {
        return Err(Invalid::too_large(
            field,
            format!(
                "holds {} bytes of text; at most {MAX_FLAG_TEXT_BYTES} are accepted",
                size.text
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_printable_and_never_altered() {
        assert_eq!(name("agent", Some("a b")).unwrap(), "a b");
        assert!(
            name("agent", Some("  a b ")).is_err(),
            "refused, not trimmed"
        );
        assert!(name("sub", Some(" ana ")).is_err());
        assert_eq!(stored_name("user", Some(" ana ")).unwrap(), "ana");
        for sneaky in ["an\u{202E}a", "a\u{200B}na", "\u{FEFF}ana", "ana\u{2066}"] {
            let e = name("sub", Some(sneaky)).unwrap_err();
            assert!(e.to_string().contains("bidi"), "{sneaky:?}: {e}");
        }
        assert!(name("agent", None).is_err());
        assert!(name("agent", Some("   ")).is_err());
        assert!(name("agent", Some(&"x".repeat(MAX_NAME + 1))).is_err());
        assert!(name("agent", Some(&"é".repeat(MAX_NAME))).is_ok());
        let e = name("stepId", Some("a\u{7}")).unwrap_err();
        assert_eq!(e.field, "stepId");
        assert!(e.to_string().contains("control characters"), "{e}");
    }

    #[test]
    fn node_ids_are_printable_and_bounded() {
        assert!(is_node_id("crdt-node-0.eu"));
        assert!(!is_node_id(""));
        assert!(!is_node_id("a b"));
        assert!(!is_node_id("node\u{202E}0"));
        assert!(!is_node_id(&"n".repeat(MAX_NODE_ID + 1)));
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
        assert!(flag_value("value", &v).is_ok());
        assert!(
            !flag_value("value", &Json::Array(vec![v]))
                .unwrap_err()
                .too_large
        );
    }

    #[test]
    fn flag_values_are_bounded_in_values_and_text() {
        let at_limit = Json::Array(vec![Json::from(0); MAX_FLAG_VALUES - 1]);
        assert!(flag_value("value", &at_limit).is_ok());
        let over = Json::Array(vec![Json::from(0); MAX_FLAG_VALUES]);
        let e = flag_value("value", &over).unwrap_err();
        assert!(e.too_large && e.reason.contains("values"), "{e}");
        let text = Json::from("x".repeat(MAX_FLAG_TEXT_BYTES + 1));
        assert!(flag_value("value", &text).unwrap_err().too_large);
        let keys: serde_json::Map<String, Json> = (0..300)
            .map(|i| (format!("{i:01000}"), Json::Null))
            .collect();
        assert!(
            flag_value("value", &Json::Object(keys))
                .unwrap_err()
                .too_large
        );
    }
}

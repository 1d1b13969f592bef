//! The read model of a run: what the state API and browser sessions show.
//!
//! Grafts are shown in one total order, identical on every node whatever order Automerge's list
//! merge produced: by (lamport, region, user, id). A graft made after seeing another has a higher
//! Lamport timestamp, so causal order is kept; concurrent grafts tie-break by region, then user.

use std::collections::BTreeMap;

use automerge::{AutoCommit, ObjId, ObjType, ScalarValue, Value, ValueRef, ROOT};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::genesis::{FLAGS, PRUNED_STEPS};
use super::json::{read_json, read_json_at};
use super::reader::At;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Graft {
    pub id: String,
    pub agent: String,
    pub after_step: String,
    pub user: String,
    pub region: String,
    pub lamport: u64,
    pub created_at: String,
}

impl Graft {
    pub(super) fn order_key(&self) -> (u64, &str, &str, &str) {
        (self.lamport, &self.region, &self.user, &self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrunedStep {
    pub step_id: String,
    pub user: String,
    pub region: String,
    pub lamport: u64,
}

/// A run's state as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    pub grafts: Vec<Graft>,
    pub pruned_steps: Vec<PrunedStep>,
    pub flags: Map<String, Json>,
    /// Flags that regions set concurrently: every value still held; `flags` shows the winner,
    /// which Automerge picks identically on every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flag_conflicts: BTreeMap<String, Vec<Json>>,
    /// Entries that do not fit the run schema (written by a foreign client); they are skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schema_errors: Vec<String>,
    /// False when the run breaks its schema (see `schema_errors`): a foreign Automerge client
    /// wrote something the run's shape does not allow. The change is kept (it is a valid CRDT
    /// change, and every replica holds it); readers see the rest of the run.
    #[serde(default = "valid_default")]
    pub valid: bool,
    pub lamport: u64,
    pub heads: Vec<String>,
}

fn valid_default() -> bool {
    true
}

/// A run's state as shared by its readers, with its JSON made at most once: a large run's
/// state is read far more often than it changes, and writing 50,000 grafts as JSON costs tens
/// of milliseconds each time. Immutable: a change makes a new one.
#[derive(Debug)]
pub struct SharedState {
    state: RunState,
    json: std::sync::OnceLock<String>,
}

impl SharedState {
    pub fn new(state: RunState) -> Self {
        SharedState {
            state,
            json: std::sync::OnceLock::new(),
        }
    }

    /// The state with the JSON it was read from (a snapshot's projection): nothing to redo.
    pub(super) fn with_json(state: RunState, json: String) -> Self {
        SharedState {
            state,
            json: std::sync::OnceLock::from(json),
        }
    }

    /// The state as a JSON object.
    pub fn json(&self) -> &str {
        // Serializing plain data cannot fail.
        self.json
            .get_or_init(|| serde_json::to_string(&self.state).unwrap_or_default())
    }
}

impl std::ops::Deref for SharedState {
    type Target = RunState;

    fn deref(&self) -> &RunState {
        &self.state
    }
}

/// The state, with the grafts (once per id, in display order) and their schema errors read
/// from the graft index.
pub(super) fn read_state(
    doc: At<'_>,
    lamport: u64,
    heads: Vec<String>,
    grafts: (Vec<Graft>, Vec<String>),
) -> RunState {
    let mut state = read_parts(doc, lamport, heads, grafts);
    state.valid = state.schema_errors.is_empty();
    state
}

fn read_parts(
    doc: At<'_>,
    lamport: u64,
    heads: Vec<String>,
    (grafts, schema_errors): (Vec<Graft>, Vec<String>),
) -> RunState {
    let mut state = RunState {
        lamport,
        heads,
        grafts,
        schema_errors,
        ..RunState::default()
    };
    match root_obj_in(doc, PRUNED_STEPS, ObjType::Map) {
        Ok(pruned) => {
            for step_id in doc.keys(&pruned) {
                let entry = doc.get(&pruned, step_id.as_str()).ok().flatten();
                match entry {
                    Some((Value::Object(ObjType::Map), id)) => {
                        state.pruned_steps.push(PrunedStep {
                            user: str_field_in(doc, &id, "user").unwrap_or_default(),
                            region: str_field_in(doc, &id, "region").unwrap_or_default(),
                            lamport: u64_field(doc, &id, "lamport").unwrap_or(0),
                            step_id,
                        })
                    }
                    _ => state
                        .schema_errors
                        .push(format!("prunedSteps.{step_id} is not a map")),
                }
            }
        }
        Err(e) => state.schema_errors.push(e),
    }
    let json = |value: &Value<'_>, id: &ObjId| match doc.heads {
        Some(h) => read_json_at(doc.doc, value, id, h),
        None => read_json(doc.doc, value, id),
    };
    match root_obj_in(doc, FLAGS, ObjType::Map) {
        Ok(flags) => {
            for key in doc.keys(&flags) {
                let all = doc.get_all(&flags, key.as_str()).unwrap_or_default();
                if let Ok(Some((value, id))) = doc.get(&flags, key.as_str()) {
                    state.flags.insert(key.clone(), json(&value, &id));
                }
                if all.len() > 1 {
                    let values = all.iter().map(|(v, id)| json(v, id)).collect();
                    state.flag_conflicts.insert(key, values);
                }
            }
        }
        Err(e) => state.schema_errors.push(e),
    }
    state
}

/// The id of a root object, checked to be of the kind the run schema says.
pub(super) fn root_obj(doc: &AutoCommit, key: &str, kind: ObjType) -> Result<ObjId, String> {
    root_obj_in(At::now(doc), key, kind)
}

/// [`root_obj`], now or at some heads.
pub(super) fn root_obj_in(doc: At<'_>, key: &str, kind: ObjType) -> Result<ObjId, String> {
    match doc.get(&ROOT, key) {
        Ok(Some((Value::Object(k), id))) if k == kind => Ok(id),
        Ok(Some(_)) => Err(format!("{key} is not a {kind:?}")),
        _ => Err(format!("{key} is missing")),
    }
}

/// The graft stored in map `id`, if it has every field with the right type. One pass over the
/// map's entries: a look-up per field costs a seek in Automerge's op set each, and a run's
/// first read after loading reads every graft (50,000 took 1.2 s that way).
pub(super) fn read_graft(doc: &AutoCommit, id: &ObjId) -> Option<Graft> {
    read_graft_in(At::now(doc), id)
}

/// [`read_graft`], now or at some heads.
pub(super) fn read_graft_in(doc: At<'_>, id: &ObjId) -> Option<Graft> {
    const KEYS: [&str; 7] = [
        "id",
        "agent",
        "afterStep",
        "user",
        "region",
        "lamport",
        "createdAt",
    ];
    let mut fields: [Option<Field>; 7] = Default::default();
    for item in doc.map_range(id) {
        let Some(slot) = KEYS.iter().position(|k| *k == item.key.as_ref()) else {
            continue;
        };
        fields[slot] = Some(match item.value {
            ValueRef::Scalar(value) => Field::Scalar(value.into()),
            ValueRef::Object(ObjType::Text) => Field::Text(item.id()),
            ValueRef::Object(_) => Field::Other,
        });
    }
    let [id, agent, after_step, user, region, lamport, created_at] = fields;
    let text = |f: Option<Field>| f.and_then(|f| f.text(doc));
    Some(Graft {
        id: text(id)?,
        agent: text(agent)?,
        after_step: text(after_step)?,
        user: text(user)?,
        region: text(region)?,
        lamport: match lamport? {
            Field::Scalar(v) => as_u64(&v)?,
            _ => return None,
        },
        created_at: created_at.and_then(|f| f.time(doc)).unwrap_or_default(),
    })
}

/// A graft field as read from its map.
#[derive(Debug)]
enum Field {
    Scalar(ScalarValue),
    /// Automerge's JavaScript library writes plain strings as text objects.
    Text(ObjId),
    Other,
}

impl Field {
    fn text(self, doc: At<'_>) -> Option<String> {
        match self {
            Field::Scalar(ScalarValue::Str(s)) => Some(s.to_string()),
            Field::Text(id) => doc.text(&id).ok(),
            _ => None,
        }
    }

    /// A creation time: a timestamp, milliseconds as a number (JavaScript's `Date.now()`), or
    /// a string as written.
    fn time(self, doc: At<'_>) -> Option<String> {
        let millis = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        };
        match self {
            Field::Scalar(ScalarValue::Timestamp(ms)) | Field::Scalar(ScalarValue::Int(ms)) => {
                millis(ms)
            }
            Field::Scalar(ScalarValue::F64(ms)) if ms.is_finite() => millis(ms as i64),
            other => other.text(doc),
        }
    }
}

fn scalar(doc: At<'_>, obj: &ObjId, key: &str) -> Option<ScalarValue> {
    match doc.get(obj, key).ok()?? {
        (Value::Scalar(s), _) => Some(s.into_owned()),
        _ => None,
    }
}

pub(super) fn str_field(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<String> {
    str_field_in(At::now(doc), obj, key)
}

fn str_field_in(doc: At<'_>, obj: &ObjId, key: &str) -> Option<String> {
    match doc.get(obj, key).ok()?? {
        (Value::Scalar(s), _) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        // Automerge's JavaScript library writes plain strings as text objects.
        (Value::Object(ObjType::Text), id) => doc.text(&id).ok(),
        _ => None,
    }
}

fn u64_field(doc: At<'_>, obj: &ObjId, key: &str) -> Option<u64> {
    as_u64(&scalar(doc, obj, key)?)
}

/// A non-negative whole number, however it was written.
pub(super) fn as_u64(value: &ScalarValue) -> Option<u64> {
    match *value {
        ScalarValue::Int(i) => u64::try_from(i).ok(),
        ScalarValue::Uint(u) => Some(u),
        // JavaScript clients write numbers as floats.
        ScalarValue::F64(f) if f >= 0.0 && f.fract() == 0.0 => Some(f as u64),
        _ => None,
    }
}

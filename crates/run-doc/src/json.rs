//! Conversion between JSON values and Automerge values, for flags.
//!
//! JSON objects become Automerge maps and arrays become lists, so two regions editing different
//! keys of one flag object merge instead of one overwriting the other. Integers keep their
//! integer type; every other number is an `f64`.

use std::collections::HashMap;

use automerge::{
    hydrate, transaction::Transactable, AutoCommit, AutomergeError, ChangeHash, ObjId, ObjType,
    Prop, ReadDoc, ScalarValue, Value,
};
use serde_json::{Map, Number, Value as Json};

/// Writes `value` at `prop` of `obj`. An object or array is created whole in one batch
/// operation, which Automerge applies far faster than one put per field.
pub fn put_json(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    value: &Json,
) -> Result<(), AutomergeError> {
    match value {
        Json::Object(_) | Json::Array(_) => {
            doc.batch_create_object(obj, prop, &to_hydrate(value), false)?;
        }
        scalar => doc.put(obj, prop, to_scalar(scalar))?,
    }
    Ok(())
}

/// The Automerge value tree of a JSON value.
fn to_hydrate(value: &Json) -> hydrate::Value {
    match value {
        Json::Object(fields) => {
            let map: HashMap<&str, hydrate::Value> = fields
                .iter()
                .map(|(k, v)| (k.as_str(), to_hydrate(v)))
                .collect();
            hydrate::Value::from(map)
        }
        Json::Array(items) => {
            hydrate::Value::from(items.iter().map(to_hydrate).collect::<Vec<_>>())
        }
        scalar => hydrate::Value::scalar(to_scalar(scalar)),
    }
}

fn to_scalar(value: &Json) -> ScalarValue {
    match value {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        // Objects and arrays are handled by the callers.
        Json::Object(_) | Json::Array(_) => ScalarValue::Null,
    }
}

/// Deepest nesting read back; deeper objects (only a foreign client could write them) read as
/// null, so a hostile document cannot overflow the stack.
pub const MAX_DEPTH: usize = 64;

/// Reads an Automerge value (and, for objects, everything below it) as JSON.
pub fn read_json(doc: &AutoCommit, value: &Value<'_>, id: &ObjId) -> Json {
    read_at_depth(doc, value, id, None, 0)
}

/// [`read_json`] as the document was at `heads`.
pub fn read_json_at(doc: &AutoCommit, value: &Value<'_>, id: &ObjId, heads: &[ChangeHash]) -> Json {
    read_at_depth(doc, value, id, Some(heads), 0)
}

fn read_at_depth(
    doc: &AutoCommit,
    value: &Value<'_>,
    id: &ObjId,
    heads: Option<&[ChangeHash]>,
    depth: usize,
) -> Json {
    if depth > MAX_DEPTH {
        return Json::Null;
    }
    let below =
        |value: Value<'_>, child: &ObjId| read_at_depth(doc, &value, child, heads, depth + 1);
    match value {
        Value::Scalar(s) => scalar_to_json(s),
        // One pass over the entries: a look-up per key or index seeks from the top each time.
        Value::Object(ObjType::Map) | Value::Object(ObjType::Table) => {
            let entries = match heads {
                Some(h) => doc.map_range_at(id, .., h),
                None => doc.map_range(id, ..),
            };
            let mut out = Map::new();
            for item in entries {
                let child = item.id();
                out.insert(item.key.to_string(), below(item.value.into(), &child));
            }
            Json::Object(out)
        }
        Value::Object(ObjType::List) => {
            let items = match heads {
                Some(h) => doc.list_range_at(id, .., h),
                None => doc.list_range(id, ..),
            };
            Json::Array(
                items
                    .map(|item| {
                        let child = item.id();
                        below(item.value.into(), &child)
                    })
                    .collect(),
            )
        }
        Value::Object(ObjType::Text) => Json::String(
            match heads {
                Some(h) => doc.text_at(id, h),
                None => doc.text(id),
            }
            .unwrap_or_default(),
        ),
    }
}

fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Null => Json::Null,
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::Number((*i).into()),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::Number(i64::from(c).into()),
        ScalarValue::Timestamp(t) => Json::Number((*t).into()),
        ScalarValue::Bytes(b) => Json::Array(b.iter().map(|x| Json::Number((*x).into())).collect()),
        ScalarValue::Unknown { .. } => Json::Null,
    }
}

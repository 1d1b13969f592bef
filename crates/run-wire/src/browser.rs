//! The browser session protocol: JSON text frames on `/ws/runs/{runId}`.
//!
//! Client → node: `JOIN {user, token?}` first, then `MUTATE {opId, op, …}` with `op` one of
//! `GRAFT {agent, afterStep, id?}`, `PRUNE {stepId}`, `UNPRUNE {stepId}`,
//! `SET_FLAG {key, value}`, `DELETE_FLAG {key}`; `TOKEN {token}` renews a user token in-band.
//!
//! Node → client: `WELCOME` (the session is joined), `STATE` (the whole run, on join and after
//! every change, coalesced), `PRESENCE` (who views the run, in every region), `ACK {opId, …}`
//! once a mutation is durable, `TOKEN_ACCEPTED {expires}` for a renewed token,
//! `ERROR {opId?, error, message}` for what was refused.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use uuid::Uuid;

use run_doc::rules::{self, Invalid};
use run_doc::{Graft, Mutation, RunState};

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientFrame {
    Join {
        user: Option<String>,
        #[serde(default)]
        token: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Mutate {
        op_id: Option<String>,
        #[serde(flatten)]
        op: Op,
    },
    /// A fresh user token for this session, before the one it joined with expires.
    Token { token: Option<String> },
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Op {
    #[serde(rename_all = "camelCase")]
    Graft {
        id: Option<String>,
        agent: Option<String>,
        after_step: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Prune {
        step_id: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Unprune {
        step_id: Option<String>,
    },
    SetFlag {
        key: Option<String>,
        /// Any JSON value; `null` is a value, a missing field is an error.
        #[serde(default, deserialize_with = "present")]
        value: Option<Json>,
    },
    DeleteFlag {
        key: Option<String>,
    },
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Json>, D::Error> {
    Json::deserialize(d).map(Some)
}

/// Longest client operation id.
pub const MAX_OP_ID: usize = 100;

impl Op {
    /// Validates the operation by the domain's rules (as the HTTP routes do) and turns it into a mutation by `user`.
    pub fn into_mutation(self, user: &str) -> Result<Mutation, Invalid> {
        Ok(match self {
            Op::Graft {
                id,
                agent,
                after_step,
            } => {
                let agent = rules::name("agent", agent.as_deref())?;
                let after_step = rules::name("afterStep", after_step.as_deref())?;
                let (id, retry_safe) = match id.as_deref() {
                    Some(raw) => (
                        Uuid::parse_str(raw).map_err(|e| {
                            Invalid::new("id", format!("{raw:?} is not a UUID: {e}"))
                        })?,
                        true,
                    ),
                    None => (Uuid::new_v4(), false),
                };
                Mutation::Graft {
                    id,
                    retry_safe,
                    agent,
                    after_step,
                    user: user.to_string(),
                }
            }
            Op::Prune { step_id } => Mutation::Prune {
                step_id: rules::name("stepId", step_id.as_deref())?,
                user: user.to_string(),
            },
            Op::Unprune { step_id } => Mutation::Unprune {
                step_id: rules::name("stepId", step_id.as_deref())?,
            },
            Op::SetFlag { key, value } => {
                let key = rules::name("key", key.as_deref())?;
                let value =
                    value.ok_or_else(|| Invalid::new("value", "is required (any JSON value)"))?;
                rules::flag_value("value", &value)?;
                Mutation::SetFlag { key, value }
            }
            Op::DeleteFlag { key } => Mutation::DeleteFlag {
                key: rules::name("key", key.as_deref())?,
            },
        })
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerFrame<'a> {
    #[serde(rename_all = "camelCase")]
    Welcome {
        run_id: Uuid,
        region: &'a str,
        node_id: &'a str,
        user: &'a str,
        session_id: u64,
    },
    #[serde(rename_all = "camelCase")]
    State {
        run_id: Uuid,
        region: &'a str,
        state: &'a RunState,
    },
    #[serde(rename_all = "camelCase")]
    Presence { run_id: Uuid, users: &'a [Viewer] },
    #[serde(rename_all = "camelCase")]
    Ack {
        op_id: Option<&'a str>,
        changed: bool,
        lamport: u64,
        heads: &'a [String],
        #[serde(skip_serializing_if = "Option::is_none")]
        graft: Option<&'a Graft>,
    },
    /// A renewed token was taken; the session now lasts until `expires` (seconds since the
    /// epoch).
    TokenAccepted { expires: u64 },
    #[serde(rename_all = "camelCase")]
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        op_id: Option<&'a str>,
        error: &'a str,
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> String {
        // Plain data: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One user viewing the run, on one region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, PartialOrd, Ord)]
pub struct Viewer {
    pub user: String,
    pub region: String,
    pub sessions: u32,
}

/// Why a client frame could not be read, for the `ERROR` reply.
pub fn decode(text: &str) -> Result<ClientFrame, String> {
    serde_json::from_str(text).map_err(|e| match serde_json::from_str::<Json>(text) {
        Err(_) => format!("frame is not JSON: {e}"),
        Ok(v) => match v.get("type").and_then(Json::as_str) {
            None => "frame has no \"type\"".into(),
            Some(t @ ("JOIN" | "MUTATE" | "TOKEN")) => format!("malformed {t}: {e}"),
            Some(t) => format!("unknown message type {t:?}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_and_validate() {
        let f = decode(r#"{"type":"MUTATE","opId":"1","op":"SET_FLAG","key":"k","value":null}"#)
            .unwrap();
        let ClientFrame::Mutate { op_id, op } = f else {
            panic!("not a mutate")
        };
        assert_eq!(op_id.as_deref(), Some("1"));
        assert!(matches!(
            op.into_mutation("u").unwrap(),
            Mutation::SetFlag {
                value: Json::Null,
                ..
            }
        ));
        let f = decode(r#"{"type":"MUTATE","op":"SET_FLAG","key":"k"}"#).unwrap();
        let ClientFrame::Mutate { op, .. } = f else {
            panic!("not a mutate")
        };
        assert!(op.into_mutation("u").is_err(), "a flag needs a value");
        assert!(decode("nope").unwrap_err().contains("not JSON"));
        assert!(decode(r#"{"type":"HELLO"}"#)
            .unwrap_err()
            .contains("unknown message type"));
        assert!(decode(r#"{"type":"MUTATE","op":"EXPLODE"}"#)
            .unwrap_err()
            .contains("malformed MUTATE"));
        let f = decode(r#"{"type":"MUTATE","op":"GRAFT","agent":"a","afterStep":"s","id":"x"}"#)
            .unwrap();
        let ClientFrame::Mutate { op, .. } = f else {
            panic!("not a mutate")
        };
        assert!(op.into_mutation("u").is_err(), "a graft id must be a UUID");
    }
}

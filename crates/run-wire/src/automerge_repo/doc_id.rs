//! Document ids: automerge-repo names a document by a UUID's 16 bytes in bs58check (Base58 with
//! a 4-byte double-SHA-256 checksum), and an `automerge:<id>` URL. A run's document id is its
//! own UUID written that way, so the two map both ways with no table.

use uuid::Uuid;

pub const URL_PREFIX: &str = "automerge:";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DocIdError {
    #[error("document id {0:?} is empty")]
    Empty(String),
    #[error("document id {id:?} is not bs58check: {reason}")]
    NotBs58Check { id: String, reason: String },
    #[error("document id {id:?} holds {len} bytes; a run's id is a 16-byte UUID")]
    WrongLength { id: String, len: usize },
}

/// The document id of a run.
pub fn encode(run_id: Uuid) -> String {
    bs58::encode(run_id.as_bytes()).with_check().into_string()
}

/// The `automerge:` URL of a run.
pub fn url(run_id: Uuid) -> String {
    format!("{URL_PREFIX}{}", encode(run_id))
}

/// The run a document id (or an `automerge:` URL) names.
pub fn decode(id: &str) -> Result<Uuid, DocIdError> {
    let bare = id.strip_prefix(URL_PREFIX).unwrap_or(id);
    // automerge-repo URLs may carry heads after a `#`; a run is opened at its latest state.
    let bare = bare.split('#').next().unwrap_or(bare);
    if bare.is_empty() {
        return Err(DocIdError::Empty(id.to_string()));
    }
    // 16 bytes and a checksum fit in 28 Base58 characters; anything far longer is not an id.
    if bare.len() > 64 {
        return Err(DocIdError::NotBs58Check {
            id: shorten(bare),
            reason: format!("{} characters is far too long", bare.len()),
        });
    }
    let bytes = bs58::decode(bare)
        .with_check(None)
        .into_vec()
        .map_err(|e| DocIdError::NotBs58Check {
            id: bare.to_string(),
            reason: e.to_string(),
        })?;
    let raw: [u8; 16] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| DocIdError::WrongLength {
            id: bare.to_string(),
            len: bytes.len(),
        })?;
    Ok(Uuid::from_bytes(raw))
}

fn shorten(s: &str) -> String {
    s.chars().take(32).chain("…".chars()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_accepts_urls() {
        for _ in 0..100 {
            let run = Uuid::new_v4();
            let id = encode(run);
            assert_eq!(decode(&id), Ok(run));
            assert_eq!(decode(&url(run)), Ok(run));
            assert_eq!(decode(&format!("{}#abc", url(run))), Ok(run));
        }
    }

    #[test]
    fn matches_automerge_repo() {
        // automerge-repo's `stringifyAutomergeUrl` of this UUID's bytes (checked with
        // @automerge/automerge-repo 2.5.6 in Node).
        let run = Uuid::parse_str("5d2e6b3c-1f7a-4b8e-9c0d-2a1b3c4d5e6f").unwrap();
        assert_eq!(url(run), "automerge:2JJ42RLpfrJGoZXNrfRR4SFapjsL");
        assert_eq!(decode("2JJ42RLpfrJGoZXNrfRR4SFapjsL"), Ok(run));
    }

    #[test]
    fn rejects_malformed_ids_with_a_reason() {
        let good = encode(Uuid::new_v4());
        let mut flipped = good.clone().into_bytes();
        flipped[5] = if flipped[5] == b'a' { b'b' } else { b'a' };
        let flipped = String::from_utf8(flipped).unwrap();
        for (id, expect) in [
            ("", "empty"),
            ("0OIl", "not bs58check"),
            (flipped.as_str(), "not bs58check"),
            (
                &bs58::encode(b"short").with_check().into_string(),
                "5 bytes",
            ),
            (&"z".repeat(500), "too long"),
        ] {
            let err = decode(id).unwrap_err().to_string();
            assert!(err.contains(expect), "{id:?}: {err}");
        }
    }
}

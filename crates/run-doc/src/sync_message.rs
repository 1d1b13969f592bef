//! Decoding a peer's sync message with its counts bounded first.
//!
//! Automerge's decoder allocates per entry with no bound but the input's length, and some
//! entries cost far more decoded than encoded: an empty `have` is 2 bytes on the wire and
//! ~64 in memory, an empty change 1 byte and 24 (8 M empty haves in a 16 MB message kept
//! +526 MiB). So the message is walked first, counting without allocating, and handed to
//! Automerge only when its counts are what an honest peer sends.

use automerge::sync;

use super::changes::read_uleb128;
use super::DocError;

/// `have` entries one message may carry. Automerge sends one; a few more are harmless.
pub const MAX_HAVES: u64 = 64;
/// Changes one message may carry (each is one op at least: the request bound).
pub const MAX_CHANGES: u64 = super::bounds::MAX_PEER_OPS_PER_REQUEST;
/// The shortest change chunk (magic, checksum, type, length): shorter entries are refused
/// before they cost a vector each.
const MIN_CHUNK: usize = 10;
const HASH_LEN: usize = 32;
const V1: u8 = 0x42;
const V2: u8 = 0x43;

/// Decodes a sync message from outside: bounded walk, then Automerge (whose panics on
/// malformed input become errors).
pub fn decode_sync_message(bytes: &[u8]) -> Result<sync::Message, DocError> {
    check_shape(bytes)?;
    match std::panic::catch_unwind(|| sync::Message::decode(bytes)) {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(e)) => Err(invalid(format!("not an Automerge sync message: {e}"))),
        Err(_) => Err(invalid("a malformed Automerge sync message".into())),
    }
}

fn invalid(why: String) -> DocError {
    DocError::InvalidChanges(why)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn uleb(&mut self) -> Result<u64, DocError> {
        let (v, len) = read_uleb128(&self.bytes[self.pos..])
            .ok_or_else(|| invalid("a truncated sync message".into()))?;
        self.pos += len;
        Ok(v)
    }

    fn skip(&mut self, len: u64) -> Result<(), DocError> {
        let left = (self.bytes.len() - self.pos) as u64;
        if len > left {
            return Err(invalid("a truncated sync message".into()));
        }
        self.pos += len as usize;
        Ok(())
    }

    fn hashes(&mut self) -> Result<(), DocError> {
        let count = self.uleb()?;
        self.skip(count.saturating_mul(HASH_LEN as u64))
    }
}

/// Walks the message's layout (version, heads, need, haves, changes) counting entries.
fn check_shape(bytes: &[u8]) -> Result<(), DocError> {
    if !matches!(bytes.first(), Some(&V1) | Some(&V2)) {
        return Err(invalid(
            "not an Automerge sync message (wrong first byte)".into(),
        ));
    }
    let mut c = Cursor { bytes, pos: 1 };
    c.hashes()?; // heads
    c.hashes()?; // need
    let haves = c.uleb()?;
    if haves > MAX_HAVES {
        return Err(DocError::TooLarge(format!(
            "the sync message carries {haves} `have` entries; at most {MAX_HAVES} are accepted"
        )));
    }
    for _ in 0..haves {
        c.hashes()?;
        let bloom = c.uleb()?;
        c.skip(bloom)?;
    }
    let changes = c.uleb()?;
    if changes > MAX_CHANGES {
        return Err(DocError::TooLarge(format!(
            "the sync message carries {changes} changes; at most {MAX_CHANGES} are accepted"
        )));
    }
    for i in 0..changes {
        let len = c.uleb()?;
        if len < MIN_CHUNK as u64 {
            return Err(invalid(format!(
                "change {i} of the sync message is {len} bytes, too short to be a change"
            )));
        }
        c.skip(len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{sync::SyncDoc, transaction::Transactable, AutoCommit, ROOT};

    fn uleb(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn honest_messages_decode() {
        let mut a = AutoCommit::new();
        a.put(ROOT, "k", 1).unwrap();
        a.commit();
        let mut state = sync::State::new();
        let message = a.sync().generate_sync_message(&mut state).unwrap();
        let bytes = message.clone().encode();
        let decoded = decode_sync_message(&bytes).unwrap();
        assert_eq!(decoded.heads, message.heads);
        // A round with changes in it.
        let mut b = AutoCommit::new();
        let mut bs = sync::State::new();
        b.sync().receive_sync_message(&mut bs, decoded).unwrap();
        let reply = b.sync().generate_sync_message(&mut bs).unwrap();
        a.sync()
            .receive_sync_message(&mut state, decode_sync_message(&reply.encode()).unwrap())
            .unwrap();
        let with_changes = a.sync().generate_sync_message(&mut state).unwrap();
        assert!(!with_changes.changes.is_empty());
        assert!(decode_sync_message(&with_changes.encode()).is_ok());
    }

    #[test]
    fn a_flood_of_empty_haves_is_refused_before_decoding() {
        let mut bytes = vec![V1, 0, 0];
        uleb(&mut bytes, 8_000_000);
        bytes.extend(std::iter::repeat_n(0u8, 16_000_000));
        let e = decode_sync_message(&bytes).unwrap_err();
        assert!(matches!(e, DocError::TooLarge(_)), "{e}");
        assert!(e.to_string().contains("`have`"), "{e}");
    }

    #[test]
    fn empty_change_entries_are_refused() {
        let mut bytes = vec![V1, 0, 0, 0];
        uleb(&mut bytes, 1_000);
        bytes.extend(std::iter::repeat_n(0u8, 1_000));
        let e = decode_sync_message(&bytes).unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
        let mut many = vec![V1, 0, 0, 0];
        uleb(&mut many, MAX_CHANGES + 1);
        assert!(matches!(
            decode_sync_message(&many).unwrap_err(),
            DocError::TooLarge(_)
        ));
    }

    #[test]
    fn truncated_and_foreign_bytes_are_errors() {
        assert!(decode_sync_message(&[]).is_err());
        assert!(decode_sync_message(b"hello").is_err());
        let mut bytes = vec![V1];
        uleb(&mut bytes, 1 << 40); // heads that are not there
        assert!(decode_sync_message(&bytes).is_err());
    }
}

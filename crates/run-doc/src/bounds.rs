//! What outside Automerge bytes may cost, checked before Automerge reads them.
//!
//! Automerge's loader trusts its input's counts: run-length encoded columns let a few bytes
//! stand for millions of operations (an "op bomb": 6.8 KB inflating to 5 M inserted characters
//! cost 1.36 GB and 51 s), and some tiny inputs (`fuzz/known/`, experimental bundle chunks) make
//! it allocate gigabytes. So every chunk from outside is walked here first, without
//! materialising anything: header, actors, column layout, and the number of rows each column
//! encodes (the sum of its runs). A chunk is handed to Automerge only when its rows, the sum of
//! its group counts and its inflated size fit a [`Budget`]; the walk itself costs one pass over
//! the bytes and allocates at most the bounded inflated size.

use std::io::Read;

use super::changes::read_uleb128;
use super::DocError;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const DOCUMENT: u8 = 0;
const CHANGE: u8 = 1;
const COMPRESSED_CHANGE: u8 = 2;
/// A change hash in a chunk's dependency or heads list.
const HASH_LEN: usize = 32;

/// Operations one change may hold. A mutation made through this node is under 20 ops; a
/// client's `change()` inserting a long text is the largest legitimate change.
pub const MAX_OPS_PER_CHANGE: u64 = 100_000;
/// Operations one request from a client or service (an HTTP body, a sync message) may carry
/// in all. Applying a batch costs about twice its ~185 bytes per op at its peak: 250,000 ops
/// stay under 100 MiB, inside a 512 MiB pod's budget (one request of 1,000,000 peaked at
/// 493 MiB), and hold a run of 30,000 grafts whole.
pub const MAX_OPS_PER_REQUEST: u64 = 250_000;
/// Operations one mesh frame or sync message from a peer node may carry: a run too large for
/// a client's request still replicates whole between regions.
pub const MAX_PEER_OPS_PER_REQUEST: u64 = 1_000_000;
/// Bytes compressed chunks and columns of one request may inflate to in all (deflate expands
/// up to ~1000×).
pub const MAX_INFLATED_PER_REQUEST: usize = 64 * 1024 * 1024;

/// Bytes a snapshot's deflated columns may inflate to.
pub const MAX_SNAPSHOT_INFLATED: usize = 4 << 30;

/// What one request may still spend: operations and inflated bytes, summed over its chunks.
#[derive(Debug, Clone)]
pub struct Budget {
    ops_left: u64,
    inflated_left: usize,
    /// Operations one change may hold.
    per_change: u64,
    /// Whether a change stamped by a node (its commit message) may hold more than
    /// `per_change` (see [`Budget::peer`]).
    stamped_past_per_change: bool,
    /// The request's operations in all, for the refusal's reason.
    ops_limit: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            ops_left: MAX_OPS_PER_REQUEST,
            inflated_left: MAX_INFLATED_PER_REQUEST,
            per_change: MAX_OPS_PER_CHANGE,
            stamped_past_per_change: false,
            ops_limit: MAX_OPS_PER_REQUEST,
        }
    }
}

/// What a checked chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSize {
    pub is_document: bool,
    /// Operations (the rows of its operation columns).
    pub ops: u64,
}

impl Budget {
    /// A budget of `ops` operations and `inflated` bytes (the defaults are the node's limits).
    pub fn with_limits(ops: u64, inflated: usize) -> Self {
        Budget {
            ops_left: ops,
            inflated_left: inflated,
            ops_limit: ops,
            ..Budget::default()
        }
    }

    /// The walk for the node's own stored bytes (snapshots): structure checked, no bound on
    /// counts, inflated size bounded by what a snapshot may hold.
    pub fn own() -> Self {
        Budget {
            per_change: u64::MAX,
            ..Budget::with_limits(u64::MAX, MAX_SNAPSHOT_INFLATED)
        }
    }

    /// For changes a mesh peer sends. A change a node made and stamped before every door
    /// bounded mutations may hold more than [`MAX_OPS_PER_CHANGE`] operations, and everything
    /// its region wrote after it depends on it: refusing it would keep the run split between
    /// regions for good. Such a stamped change is taken within the request's bounds; any
    /// other (an unstamped op bomb) is held to the per-change bound as everywhere.
    pub fn peer() -> Self {
        Budget {
            stamped_past_per_change: true,
            ..Budget::with_limits(MAX_PEER_OPS_PER_REQUEST, MAX_INFLATED_PER_REQUEST)
        }
    }

    /// Whether this is a peer node's budget ([`Budget::peer`]).
    pub fn is_peer(&self) -> bool {
        self.stamped_past_per_change
    }

    /// Checks the one chunk `chunk` holds (header included, nothing after it) and charges it.
    pub fn admit(&mut self, chunk: &[u8]) -> Result<ChunkSize, DocError> {
        let (kind, body) = split_header(chunk).map_err(invalid)?;
        let size = match kind {
            DOCUMENT => ChunkSize {
                is_document: true,
                ops: self.document_ops(body)?,
            },
            CHANGE => ChunkSize {
                is_document: false,
                ops: self.change_ops(body)?,
            },
            COMPRESSED_CHANGE => {
                let inflated = self.inflate(body)?;
                ChunkSize {
                    is_document: false,
                    ops: self.change_ops(&inflated)?,
                }
            }
            other => {
                return Err(invalid(format!(
                    "chunk type {other} is not accepted (only documents and changes)"
                )))
            }
        };
        Ok(size)
    }

    /// Checks a run of concatenated chunks (what `AutoCommit::load` reads), each one whole.
    pub fn admit_all(&mut self, mut bytes: &[u8]) -> Result<Vec<ChunkSize>, DocError> {
        let mut sizes = Vec::new();
        while !bytes.is_empty() {
            let len =
                chunk_len(bytes).map_err(|why| invalid(format!("chunk {}: {why}", sizes.len())))?;
            let (chunk, rest) = bytes.split_at(len);
            sizes.push(self.admit(chunk)?);
            bytes = rest;
        }
        Ok(sizes)
    }

    fn charge_ops(&mut self, ops: u64) -> Result<(), DocError> {
        if ops > self.ops_left {
            return Err(DocError::TooLarge(format!(
                "the request carries more operations than the {} accepted",
                self.ops_limit
            )));
        }
        self.ops_left -= ops;
        Ok(())
    }

    /// Inflates raw deflate data, refusing it past what is left of the inflated-bytes budget.
    fn inflate(&mut self, compressed: &[u8]) -> Result<Vec<u8>, DocError> {
        let limit = self.inflated_left;
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(compressed)
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| invalid(format!("compressed data does not inflate: {e}")))?;
        if out.len() > limit {
            return Err(DocError::TooLarge(format!(
                "compressed data inflates to more than {MAX_INFLATED_PER_REQUEST} bytes"
            )));
        }
        self.inflated_left -= out.len();
        Ok(out)
    }

    fn change_ops(&mut self, body: &[u8]) -> Result<u64, DocError> {
        let mut r = Reader::new(body);
        let deps = r.uleb()?;
        r.skip_n(deps, HASH_LEN)?;
        r.length_prefixed()?; // actor
        r.uleb()?; // seq
        r.uleb()?; // start op
        r.sleb()?; // time
        let message = r.length_prefixed()?;
        let others = r.uleb()?;
        for _ in 0..others {
            r.length_prefixed()?;
        }
        let columns = r.columns()?;
        let mut rows = Rows::default();
        for (spec, data) in r.column_data(&columns)? {
            if spec & DEFLATE_BIT != 0 {
                return Err(invalid("a change's columns may not be compressed".into()));
            }
            rows.add(spec, data)?;
        }
        let grandfathered = self.stamped_past_per_change
            && std::str::from_utf8(message).is_ok_and(|m| super::Stamp::parse(m).is_some());
        if rows.max > self.per_change && !grandfathered {
            return Err(DocError::TooLarge(format!(
                "a change holds {} operations; at most {MAX_OPS_PER_CHANGE} are accepted",
                rows.max
            )));
        }
        self.charge_ops(rows.max.max(rows.grouped))?;
        Ok(rows.max)
    }

    fn document_ops(&mut self, body: &[u8]) -> Result<u64, DocError> {
        let mut r = Reader::new(body);
        let actors = r.uleb()?;
        for _ in 0..actors {
            r.length_prefixed()?;
        }
        let heads = r.uleb()?;
        r.skip_n(heads, HASH_LEN)?;
        let change_columns = r.columns()?;
        let op_columns = r.columns()?;
        let mut changes = Rows::default();
        for (spec, data) in r.column_data(&change_columns)? {
            self.add_maybe_deflated(&mut changes, spec, data)?;
        }
        let mut ops = Rows::default();
        for (spec, data) in r.column_data(&op_columns)? {
            self.add_maybe_deflated(&mut ops, spec, data)?;
        }
        // Each change is charged as an op at least: a document of empty changes is not free.
        let cost = ops
            .max
            .max(ops.grouped)
            .max(changes.max)
            .max(changes.grouped);
        self.charge_ops(cost)?;
        Ok(ops.max)
    }

    fn add_maybe_deflated(
        &mut self,
        rows: &mut Rows,
        spec: u64,
        data: &[u8],
    ) -> Result<(), DocError> {
        if spec & DEFLATE_BIT != 0 {
            let inflated = self.inflate(data)?;
            rows.add(spec, &inflated)
        } else {
            rows.add(spec, data)
        }
    }
}

/// The length (header included) of the chunk `bytes` starts with, of any type.
pub fn chunk_len(bytes: &[u8]) -> Result<usize, String> {
    header(bytes).map(|(_, body)| body.end)
}

/// The chunk's type and its data, which must be exactly the rest of `chunk`.
fn split_header(chunk: &[u8]) -> Result<(u8, &[u8]), String> {
    let (kind, body) = header(chunk)?;
    if body.end != chunk.len() {
        return Err("bytes after the chunk".into());
    }
    Ok((kind, &chunk[body]))
}

fn header(bytes: &[u8]) -> Result<(u8, std::ops::Range<usize>), String> {
    if bytes.len() < 10 {
        return Err("truncated chunk header".into());
    }
    if bytes[..4] != MAGIC {
        return Err("missing Automerge magic bytes".into());
    }
    let kind = bytes[8];
    let (len, leb_len) = read_uleb128(&bytes[9..]).ok_or("bad chunk length")?;
    let start = 9 + leb_len;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| start.checked_add(l))
        .ok_or("chunk length overflows")?;
    if end > bytes.len() {
        return Err(format!(
            "chunk claims {end} bytes, only {} remain",
            bytes.len()
        ));
    }
    Ok((kind, start..end))
}

fn invalid(why: String) -> DocError {
    DocError::InvalidChanges(why)
}

/// Column specification bits (Automerge's storage format): the low three bits are the type,
/// the fourth says the column is deflated.
const DEFLATE_BIT: u64 = 0b1000;
const GROUP: u64 = 0;
const DELTA: u64 = 3;
const BOOLEAN: u64 = 4;
const STRING: u64 = 5;
const VALUE: u64 = 7;

/// Row counts of one chunk's columns.
#[derive(Default)]
struct Rows {
    /// The most rows any one column encodes.
    max: u64,
    /// The largest sum of a group column's values (how many rows its grouped columns claim).
    grouped: u64,
}

impl Rows {
    fn add(&mut self, spec: u64, data: &[u8]) -> Result<(), DocError> {
        let kind = spec & 0b111;
        if kind == VALUE {
            // Raw bytes whose lengths another column gives: no rows of its own.
            return Ok(());
        }
        let (rows, sum) =
            count_rows(kind, data).map_err(|why| invalid(format!("column {spec}: {why}")))?;
        self.max = self.max.max(rows);
        if kind == GROUP {
            self.grouped = self.grouped.max(sum);
        }
        Ok(())
    }
}

/// (rows, sum of values) of one column, walking its runs without expanding them.
fn count_rows(kind: u64, data: &[u8]) -> Result<(u64, u64), String> {
    let mut r = Reader::new(data);
    let mut rows = 0u64;
    let mut sum = 0u64;
    if kind == BOOLEAN {
        // Alternating run lengths of false and true.
        while !r.done() {
            rows = rows.saturating_add(r.uleb().map_err(|e| e.to_string())?);
        }
        return Ok((rows, 0));
    }
    while !r.done() {
        let count = r.sleb().map_err(|e| e.to_string())?;
        if count > 0 {
            let value = r.rle_value(kind).map_err(|e| e.to_string())?;
            let n = count.unsigned_abs();
            rows = rows.saturating_add(n);
            sum = sum.saturating_add(value.saturating_mul(n));
        } else if count < 0 {
            for _ in 0..count.unsigned_abs() {
                let value = r.rle_value(kind).map_err(|e| e.to_string())?;
                sum = sum.saturating_add(value);
            }
            rows = rows.saturating_add(count.unsigned_abs());
        } else {
            rows = rows.saturating_add(r.uleb().map_err(|e| e.to_string())?);
        }
    }
    Ok((rows, sum))
}

/// A cursor over bytes that fails, never panics, on truncated input.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn truncated() -> DocError {
        invalid("truncated or malformed chunk".into())
    }

    fn uleb(&mut self) -> Result<u64, DocError> {
        let (value, len) = read_uleb128(&self.bytes[self.pos..]).ok_or_else(Self::truncated)?;
        self.pos += len;
        Ok(value)
    }

    fn sleb(&mut self) -> Result<i64, DocError> {
        let mut value: i64 = 0;
        for (i, byte) in self.bytes[self.pos..].iter().take(10).enumerate() {
            let low = i64::from(byte & 0x7f);
            value |= low.checked_shl(7 * i as u32).ok_or_else(Self::truncated)?;
            if byte & 0x80 == 0 {
                self.pos += i + 1;
                let shift = 7 * (i as u32 + 1);
                if shift < 64 && byte & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
        }
        Err(Self::truncated())
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], DocError> {
        let len = usize::try_from(len).map_err(|_| Self::truncated())?;
        let end = self.pos.checked_add(len).ok_or_else(Self::truncated)?;
        let out = self.bytes.get(self.pos..end).ok_or_else(Self::truncated)?;
        self.pos = end;
        Ok(out)
    }

    fn skip_n(&mut self, count: u64, each: usize) -> Result<(), DocError> {
        let len = count.checked_mul(each as u64).ok_or_else(Self::truncated)?;
        self.take(len).map(|_| ())
    }

    fn length_prefixed(&mut self) -> Result<&'a [u8], DocError> {
        let len = self.uleb()?;
        self.take(len)
    }

    /// One value of a run-length encoded column; integers are returned (strings as 0).
    fn rle_value(&mut self, kind: u64) -> Result<u64, DocError> {
        match kind {
            STRING => self.length_prefixed().map(|_| 0),
            DELTA => self.sleb().map(|v| v.unsigned_abs()),
            _ => self.uleb(),
        }
    }

    /// A column layout: (specification, data length) pairs.
    fn columns(&mut self) -> Result<Vec<(u64, u64)>, DocError> {
        let count = self.uleb()?;
        // Each pair takes two bytes at least: a count beyond that is a lie, not an allocation.
        if count > (self.bytes.len() - self.pos) as u64 / 2 {
            return Err(Self::truncated());
        }
        (0..count)
            .map(|_| Ok((self.uleb()?, self.uleb()?)))
            .collect()
    }

    /// The data of each column of `layout`, which follow one another.
    fn column_data(&mut self, layout: &[(u64, u64)]) -> Result<Vec<(u64, &'a [u8])>, DocError> {
        layout
            .iter()
            .map(|&(spec, len)| Ok((spec, self.take(len)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{transaction::Transactable, AutoCommit, ObjType, ReadDoc, ROOT};

    #[test]
    fn ordinary_changes_and_documents_pass_with_their_op_counts() {
        let mut doc = AutoCommit::new();
        let list = doc.put_object(ROOT, "l", ObjType::List).unwrap();
        for i in 0..50 {
            doc.insert(&list, i, i as i64).unwrap();
        }
        doc.commit();
        let change = doc.get_last_local_change().unwrap();
        let mut budget = Budget::default();
        let size = budget.admit(change.raw_bytes()).unwrap();
        assert_eq!(size.ops, change.len() as u64);
        assert!(!size.is_document);
        let saved = doc.save();
        let size = Budget::default().admit(&saved).unwrap();
        assert!(size.is_document);
        assert_eq!(size.ops, 51, "one list and 50 inserts");
        assert_eq!(doc.length(&list), 50);
    }

    #[test]
    fn compressed_changes_are_counted_after_inflating() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "t", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, &"x".repeat(5000)).unwrap();
        doc.commit();
        let mut change = doc.get_last_local_change().unwrap();
        let compressed = change.bytes().into_owned();
        assert_eq!(
            compressed[8], COMPRESSED_CHANGE,
            "large changes are deflated"
        );
        let size = Budget::default().admit(&compressed).unwrap();
        assert_eq!(size.ops, 5001);
    }

    #[test]
    fn an_op_bomb_is_refused_before_automerge_reads_it() {
        // 200,000 identical inserts: a few KB once run-length encoded and deflated.
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "t", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, &"a".repeat(200_000)).unwrap();
        doc.commit();
        let mut change = doc.get_last_local_change().unwrap();
        let bomb = change.bytes().into_owned();
        assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
        let err = Budget::default().admit(&bomb).unwrap_err();
        assert!(matches!(err, DocError::TooLarge(_)), "{err}");
        assert!(err.to_string().contains("operations"), "{err}");
    }

    #[test]
    fn a_request_is_bounded_across_its_chunks() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "t", ObjType::Text).unwrap();
        let mut chunks = Vec::new();
        for _ in 0..4 {
            doc.splice_text(&text, 0, 0, &"b".repeat(3_000)).unwrap();
            doc.commit();
            chunks.push(doc.get_last_local_change().unwrap().bytes().into_owned());
        }
        let mut budget = Budget::with_limits(10_000, MAX_INFLATED_PER_REQUEST);
        let outcome: Result<Vec<_>, _> = chunks.iter().map(|c| budget.admit(c)).collect();
        let err = outcome.unwrap_err();
        assert!(err.to_string().contains("request"), "{err}");
    }

    #[test]
    fn a_client_request_is_held_to_less_than_a_peer_frame() {
        // Three changes of 90,000 ops: past a client's request, within a peer's frame.
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "t", ObjType::Text).unwrap();
        let mut chunks = Vec::new();
        for _ in 0..3 {
            doc.splice_text(&text, 0, 0, &"c".repeat(90_000)).unwrap();
            doc.commit();
            chunks.push(doc.get_last_local_change().unwrap().bytes().into_owned());
        }
        let mut client = Budget::default();
        let refused: Result<Vec<_>, _> = chunks.iter().map(|c| client.admit(c)).collect();
        let e = refused.unwrap_err();
        assert!(
            e.to_string().contains(&MAX_OPS_PER_REQUEST.to_string()),
            "{e}"
        );
        let mut peer = Budget::peer();
        assert!(chunks.iter().all(|c| peer.admit(c).is_ok()));
    }

    #[test]
    fn the_known_loader_bombs_are_refused() {
        for name in [
            "snapshot_load-oom-automerge-load",
            "snapshot_load-oom-automerge-load-2",
        ] {
            let path = format!("{}/../../fuzz/known/{name}", env!("CARGO_MANIFEST_DIR"));
            let bytes = std::fs::read(&path).unwrap();
            let err = Budget::default().admit_all(&bytes).unwrap_err();
            assert!(err.to_string().contains("not accepted"), "{name}: {err}");
        }
    }

    #[test]
    fn truncated_and_garbage_chunks_are_errors() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "a", 1).unwrap();
        let saved = doc.save();
        for cut in [0, 5, 12, saved.len() - 1] {
            assert!(Budget::default().admit_all(&saved[..cut]).is_err() || cut == 0);
        }
        assert!(Budget::default().admit(b"not automerge at all").is_err());
        let mut wrong = saved.clone();
        wrong[8] = 9;
        assert!(Budget::default().admit(&wrong).is_err());
    }
}

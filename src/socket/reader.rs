//! Reading a server socket's frames with memory bounded while reading, not after.
//!
//! actix-ws reads whatever the connection has before it decodes, and actix-http's decoder
//! refuses an oversized frame only once all of it is buffered: a client declaring a 600 MiB
//! frame was buffered whole although the limit was 8 MiB. This reader looks at each frame's
//! declared length as soon as its header is in and refuses it past the limit (close 1009)
//! before buffering its payload; it aggregates continuations within the same limit; a message
//! must arrive within a deadline once it has begun (a client trickling a byte every few
//! seconds holds its buffer no longer); and what it buffers is charged to the node-wide
//! [`MemoryBudget`] before it is taken, so that many sockets together cannot pass it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_codec::Decoder;
use actix_http::ws::{Codec, Frame, Item, ProtocolError};
use actix_web::web::{self, Bytes, BytesMut};
use futures_util::StreamExt;

use run_wire::close;

/// The largest message a socket's reader takes now: `unproven` until the session proves
/// itself (a JOIN, a handshake, an automerge-repo `join`), then the edge's limit. An unproven
/// socket so holds a few KiB at most, whatever it claims to send.
#[derive(Clone, Debug)]
pub struct FrameLimit {
    current: Arc<AtomicUsize>,
    proven: usize,
    /// Set when the socket proved itself (whatever the two limits are).
    raised: Arc<std::sync::atomic::AtomicBool>,
    /// Set by admission when the socket, still unproven, is evicted to make room.
    evicted: Arc<tokio::sync::Notify>,
}

impl FrameLimit {
    pub fn new(unproven: usize, proven: usize) -> Self {
        FrameLimit {
            current: Arc::new(AtomicUsize::new(unproven.min(proven))),
            proven,
            raised: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            evicted: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Closes the socket (1013): it has not proved itself and its place is wanted.
    pub fn evict(&self) {
        self.evicted.notify_one();
    }

    /// The same limit before and after proof (a link this node opened).
    pub fn fixed(limit: usize) -> Self {
        Self::new(limit, limit)
    }

    /// The session proved itself: its messages may now be as large as the edge takes.
    pub fn raise(&self) {
        self.current.store(self.proven, Ordering::Relaxed);
        self.raised.store(true, Ordering::Relaxed);
    }

    /// Whether admission evicted the socket (its close is pending or done).
    #[cfg(test)]
    pub fn is_evicted(&self) -> bool {
        use futures_util::FutureExt;
        self.evicted.notified().now_or_never().is_some()
    }

    /// Whether the socket proved itself: eviction no longer applies.
    fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Relaxed)
    }

    pub fn get(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
}

/// Bytes the node holds for what clients and peers are sending it (frames being read), in
/// all. Cheap to clone; a reservation is returned when dropped.
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    held: Arc<AtomicUsize>,
    limit: usize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            held: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// An empty reservation, grown with [`Reservation::grow_to`].
    pub fn reservation(&self) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }
}

/// Bytes taken from a [`MemoryBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: MemoryBudget,
    bytes: usize,
}

impl Reservation {
    /// Why what it was asked to grow by was refused, for the client.
    pub fn refusal(&self) -> String {
        format!(
            "the node holds as much incoming data as its memory budget ({} bytes) allows; \
             try again later",
            self.budget.limit
        )
    }

    /// Holds `bytes` in all (more or fewer than now); false, holding what it held, if the
    /// budget has no room for the growth.
    pub fn grow_to(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            self.budget
                .held
                .fetch_sub(self.bytes - bytes, Ordering::Relaxed);
            self.bytes = bytes;
            return true;
        }
        let more = bytes - self.bytes;
        let taken = self.budget.held.fetch_add(more, Ordering::Relaxed);
        if taken.saturating_add(more) > self.budget.limit {
            self.budget.held.fetch_sub(more, Ordering::Relaxed);
            return false;
        }
        self.bytes = bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What the reader hands on.
#[derive(Debug, PartialEq)]
pub enum Read {
    Text(String),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The peer closed, the connection ended, or it failed (the reason, if any).
    Closed(Option<String>),
    /// The reader refuses the socket: close it with this code and reason.
    Refused(u16, String),
}

/// How the reader bounds one socket.
#[derive(Clone, Debug)]
pub struct ReadLimits {
    pub frame: FrameLimit,
    /// How long one message may take to arrive once its first byte is in.
    pub message_deadline: Duration,
    pub budget: MemoryBudget,
}

pub struct FrameReader<S> {
    payload: S,
    buf: BytesMut,
    codec: Codec,
    /// The message being aggregated from continuation frames: (text?, bytes so far).
    partial: Option<(bool, BytesMut)>,
    /// When the message in progress began.
    started: Option<Instant>,
    limits: ReadLimits,
    held: Reservation,
}

impl FrameReader<web::Payload> {
    pub fn new(payload: web::Payload, limits: ReadLimits) -> Self {
        Self::over(payload, limits)
    }
}

impl<S> FrameReader<S>
where
    S: futures_util::Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + Unpin,
{
    /// A reader over any stream of the connection's bytes (tests feed it directly).
    pub fn over(payload: S, limits: ReadLimits) -> Self {
        let held = limits.budget.reservation();
        FrameReader {
            payload,
            buf: BytesMut::new(),
            codec: Codec::new(),
            partial: None,
            started: None,
            limits,
            held,
        }
    }

    /// The next message, control frame or end.
    pub async fn next(&mut self) -> Read {
        loop {
            match self.decode() {
                Ok(Step::Message(read)) => {
                    // The next message's deadline starts at its first byte.
                    self.started = None;
                    return read;
                }
                // A continuation frame taken in: there may be more frames buffered.
                Ok(Step::Taken) => continue,
                Ok(Step::NeedMore) => {}
                Err(refused) => return refused,
            }
            if self.buf.is_empty() && self.partial.is_none() {
                self.started = None;
            } else {
                self.started.get_or_insert_with(Instant::now);
            }
            let deadline = self
                .started
                .map(|t| (t + self.limits.message_deadline).into());
            let evicted = self.limits.frame.evicted.clone();
            // A socket that proved itself as it was being evicted stays.
            let evictable = !self.limits.frame.is_raised();
            let read = async {
                match deadline {
                    None => Ok(self.payload.next().await),
                    Some(at) => tokio::time::timeout_at(at, self.payload.next()).await,
                }
            };
            let next = tokio::select! {
                biased;
                _ = evicted.notified(), if evictable => {
                    return Read::Refused(
                        close::TRY_AGAIN_LATER,
                        "evicted: too many connections are still to prove themselves; \
                         prove this one sooner after connecting"
                            .into(),
                    )
                }
                next = read => match next {
                    Ok(next) => next,
                    Err(_) => {
                        return Read::Refused(
                            close::POLICY,
                            format!(
                                "a message took longer than {} s to arrive",
                                self.limits.message_deadline.as_secs()
                            ),
                        )
                    }
                },
            };
            match next {
                Some(Ok(bytes)) => {
                    if let Err(refused) = self.take_in(&bytes) {
                        return refused;
                    }
                }
                Some(Err(e)) => return Read::Closed(Some(format!("read error: {e}"))),
                None => return Read::Closed(None),
            }
        }
    }

    /// Appends what the connection delivered, charged to the budget first.
    fn take_in(&mut self, bytes: &Bytes) -> Result<(), Read> {
        let need = self.buf.len() + bytes.len() + self.partial_len();
        if !self.held.grow_to(need) {
            return Err(Read::Refused(close::TRY_AGAIN_LATER, self.held.refusal()));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Decodes one frame from what is buffered, after checking the declared length of the
    /// frame in progress against the limit.
    fn decode(&mut self) -> Result<Step, Read> {
        let limit = self.limits.frame.get();
        // Control frames (ping, pong, close) between fragments are not part of the message.
        let control = self.buf.first().is_some_and(|b| b & 0x08 != 0);
        let so_far = if control { 0 } else { self.partial_len() };
        if let Some(declared) = declared_length(&self.buf) {
            if declared.saturating_add(so_far as u64) > limit as u64 {
                return Err(too_big(limit));
            }
        }
        let mut codec = self.codec.clone().max_size(limit);
        let frame = codec.decode(&mut self.buf);
        self.codec = codec;
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(Step::NeedMore),
            Err(ProtocolError::Overflow) => return Err(too_big(limit)),
            Err(e) => {
                return Err(Read::Refused(
                    close::PROTOCOL,
                    format!("protocol error: {e}"),
                ))
            }
        };
        let read = match frame {
            Frame::Text(b) => Some(text(b)?),
            Frame::Binary(b) => Some(Read::Binary(b)),
            Frame::Ping(b) => Some(Read::Ping(b)),
            Frame::Pong(b) => Some(Read::Pong(b)),
            Frame::Close(reason) => Some(Read::Closed(Some(
                reason.map_or_else(|| "closed by peer".into(), super::describe),
            ))),
            Frame::Continuation(item) => self.continued(item, limit)?,
        };
        // What was handed on is no longer held here.
        self.held.grow_to(self.buf.len() + self.partial_len());
        Ok(read.map_or(Step::Taken, Step::Message))
    }

    /// Bytes of the message being put together from continuation frames.
    fn partial_len(&self) -> usize {
        self.partial.as_ref().map_or(0, |(_, p)| p.len())
    }

    fn continued(&mut self, item: Item, limit: usize) -> Result<Option<Read>, Read> {
        match item {
            Item::FirstText(b) => self.partial = Some((true, BytesMut::from(&b[..]))),
            Item::FirstBinary(b) => self.partial = Some((false, BytesMut::from(&b[..]))),
            Item::Continue(b) => self.append(&b, limit)?,
            Item::Last(b) => {
                self.append(&b, limit)?;
                let (is_text, bytes) = self.partial.take().unwrap_or_default();
                let bytes = bytes.freeze();
                return Ok(Some(if is_text {
                    text(bytes)?
                } else {
                    Read::Binary(bytes)
                }));
            }
        }
        Ok(None)
    }

    /// Adds a continuation frame to the message begun, within the limit for the whole.
    fn append(&mut self, more: &[u8], limit: usize) -> Result<(), Read> {
        let Some((_, so_far)) = self.partial.as_mut() else {
            return Err(Read::Refused(
                close::PROTOCOL,
                "a continuation frame with no message begun".into(),
            ));
        };
        if so_far.len() + more.len() > limit {
            return Err(too_big(limit));
        }
        so_far.extend_from_slice(more);
        Ok(())
    }
}

/// What one decoding step came to.
enum Step {
    Message(Read),
    /// A frame was taken in, with no message complete yet.
    Taken,
    /// The frame in progress is not all here.
    NeedMore,
}

fn too_big(limit: usize) -> Read {
    Read::Refused(
        close::TOO_BIG,
        format!("a message larger than the {limit}-byte limit"),
    )
}

fn text(bytes: Bytes) -> Result<Read, Read> {
    String::from_utf8(bytes.to_vec())
        .map(Read::Text)
        .map_err(|_| Read::Refused(close::INVALID_DATA, "a text frame that is not UTF-8".into()))
}

/// The payload length the frame at the start of `buf` declares, once its header is in.
fn declared_length(buf: &[u8]) -> Option<u64> {
    let len7 = buf.get(1)? & 0x7f;
    match len7 {
        126 => Some(u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]))),
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        }
        n => Some(u64::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Encoder;
    use actix_http::ws::Message;

    /// A client's (masked) frames.
    fn frames(messages: Vec<Message>) -> Vec<u8> {
        let mut codec = Codec::new().client_mode();
        let mut out = BytesMut::new();
        for m in messages {
            codec.encode(m, &mut out).unwrap();
        }
        out.to_vec()
    }

    fn limits(unproven: usize, proven: usize, budget: usize) -> ReadLimits {
        ReadLimits {
            frame: FrameLimit::new(unproven, proven),
            message_deadline: Duration::from_secs(5),
            budget: MemoryBudget::new(budget),
        }
    }

    type Chunks = futures_util::stream::Iter<
        std::vec::IntoIter<Result<Bytes, actix_web::error::PayloadError>>,
    >;

    fn reader(chunks: Vec<Vec<u8>>, limits: ReadLimits) -> FrameReader<Chunks> {
        let items: Vec<_> = chunks.into_iter().map(|c| Ok(Bytes::from(c))).collect();
        FrameReader::over(futures_util::stream::iter(items), limits)
    }

    #[actix_web::test]
    async fn messages_and_control_frames_come_through() {
        let bytes = frames(vec![
            Message::Text("hello".into()),
            Message::Binary(Bytes::from_static(b"\x01\x02")),
            Message::Ping(Bytes::from_static(b"p")),
        ]);
        // Split anywhere: the reader puts frames together across reads.
        let (a, b) = bytes.split_at(3);
        let mut r = reader(vec![a.to_vec(), b.to_vec()], limits(1024, 1024, 1 << 20));
        assert_eq!(r.next().await, Read::Text("hello".into()));
        assert_eq!(
            r.next().await,
            Read::Binary(Bytes::from_static(b"\x01\x02"))
        );
        assert_eq!(r.next().await, Read::Ping(Bytes::from_static(b"p")));
        assert_eq!(r.next().await, Read::Closed(None));
    }

    #[actix_web::test]
    async fn a_declared_length_past_the_limit_is_refused_before_its_payload() {
        // Only the header of a 600 MiB frame: refused at once, nothing more read.
        let mut header = vec![0x82, 0xFF];
        header.extend_from_slice(&(600u64 << 20).to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0]);
        let budget = MemoryBudget::new(1 << 20);
        let mut r = reader(
            vec![header],
            ReadLimits {
                budget: budget.clone(),
                ..limits(4096, 8 << 20, 1 << 20)
            },
        );
        match r.next().await {
            Read::Refused(code, why) => {
                assert_eq!(code, close::TOO_BIG);
                assert!(why.contains("4096"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        drop(r);
        assert_eq!(budget.held(), 0, "the reservation is given back");
    }

    #[actix_web::test]
    async fn the_limit_rises_once_the_session_proves_itself() {
        let big = || Message::Binary(Bytes::from(vec![7u8; 10_000]));
        let l = limits(4096, 16_384, 1 << 20);
        let mut before = reader(vec![frames(vec![big()])], l.clone());
        assert!(matches!(before.next().await, Read::Refused(1009, _)));
        l.frame.raise();
        let mut after = reader(vec![frames(vec![big()])], l);
        assert!(matches!(after.next().await, Read::Binary(b) if b.len() == 10_000));
    }

    #[actix_web::test]
    async fn the_deadline_is_per_message_under_steady_traffic() {
        // Six quick messages whose reads always end inside the next frame, 60 ms apart: 360
        // ms in all, against a deadline of 200 ms for one message.
        let one = frames(vec![Message::Binary(Bytes::from(vec![5u8; 40]))]);
        let all: Vec<u8> = one.iter().cycle().take(one.len() * 6).copied().collect();
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        let mut at = 0;
        while at < all.len() {
            let end = (at + one.len()).min(all.len());
            let end = if at == 0 { one.len() / 2 } else { end };
            chunks.push(all[at..end].to_vec());
            at = end;
        }
        let paced = futures_util::stream::iter(chunks).then(|c| async move {
            tokio::time::sleep(Duration::from_millis(60)).await;
            Ok::<_, actix_web::error::PayloadError>(Bytes::from(c))
        });
        let mut r = FrameReader::over(
            Box::pin(paced),
            ReadLimits {
                message_deadline: Duration::from_millis(200),
                ..limits(1024, 1024, 1 << 20)
            },
        );
        for i in 0..6 {
            let got = r.next().await;
            assert!(
                matches!(got, Read::Binary(ref b) if b.len() == 40),
                "message {i}: {got:?}"
            );
        }
    }

    #[actix_web::test]
    async fn a_control_frame_between_fragments_is_not_counted_in_the_message() {
        let part = Message::Continuation;
        let ok = frames(vec![
            part(Item::FirstBinary(Bytes::from(vec![1u8; 1000]))),
            Message::Ping(Bytes::from(vec![9u8; 100])),
            part(Item::Last(Bytes::from(vec![1u8; 1000]))),
        ]);
        let mut r = reader(vec![ok], limits(2048, 2048, 1 << 20));
        assert!(matches!(r.next().await, Read::Ping(_)));
        assert!(matches!(r.next().await, Read::Binary(b) if b.len() == 2000));
    }

    #[actix_web::test]
    async fn eviction_closes_an_unproven_socket_and_spares_a_proven_one() {
        let l = limits(1024, 4096, 1 << 20);
        l.frame.evict();
        let bytes = frames(vec![Message::Binary(Bytes::from(vec![1u8; 100]))]);
        let stalled = futures_util::stream::iter(vec![Ok(Bytes::from(bytes.clone()))])
            .chain(futures_util::stream::pending());
        let mut r = FrameReader::over(Box::pin(stalled), l);
        // Evicted before anything more is read.
        assert!(matches!(r.next().await, Read::Refused(1013, _)));
        // Proved as it was being evicted: it stays.
        let proven = limits(1024, 4096, 1 << 20);
        proven.frame.raise();
        proven.frame.evict();
        let mut r = reader(vec![bytes], proven);
        assert!(matches!(r.next().await, Read::Binary(_)));
        assert_eq!(r.next().await, Read::Closed(None));
    }

    #[actix_web::test]
    async fn continuations_are_bounded_in_all() {
        let part = |item| Message::Continuation(item);
        let chunk = || Bytes::from(vec![1u8; 600]);
        let ok = frames(vec![
            part(Item::FirstBinary(chunk())),
            part(Item::Continue(chunk())),
            part(Item::Last(chunk())),
        ]);
        let mut r = reader(vec![ok], limits(2000, 2000, 1 << 20));
        let got = r.next().await;
        assert!(
            matches!(&got, Read::Binary(b) if b.len() == 1800),
            "{got:?}"
        );
        let over = frames(vec![
            part(Item::FirstBinary(chunk())),
            part(Item::Continue(chunk())),
            part(Item::Continue(chunk())),
            part(Item::Last(chunk())),
        ]);
        let mut r = reader(vec![over], limits(2000, 2000, 1 << 20));
        assert!(matches!(r.next().await, Read::Refused(1009, _)));
    }

    #[actix_web::test]
    async fn the_node_wide_budget_refuses_what_it_has_no_room_for() {
        let budget = MemoryBudget::new(10_000);
        let mut hog = budget.reservation();
        assert!(hog.grow_to(9_000));
        let big = frames(vec![Message::Binary(Bytes::from(vec![0u8; 4_000]))]);
        let mut r = reader(
            vec![big],
            ReadLimits {
                budget: budget.clone(),
                ..limits(8_000, 8_000, 0)
            },
        );
        assert!(matches!(r.next().await, Read::Refused(1013, _)));
        drop(hog);
        assert_eq!(budget.held(), 0);
    }

    #[actix_web::test]
    async fn a_message_that_trickles_in_is_cut_off_at_its_deadline() {
        let bytes = frames(vec![Message::Text("slow".into())]);
        let (first, _) = bytes.split_at(2);
        let stalled = futures_util::stream::iter(vec![Ok(Bytes::from(first.to_vec()))])
            .chain(futures_util::stream::pending());
        let mut r = FrameReader::over(
            Box::pin(stalled),
            ReadLimits {
                message_deadline: Duration::from_millis(50),
                ..limits(1024, 1024, 1 << 20)
            },
        );
        assert!(matches!(r.next().await, Read::Refused(1008, _)));
    }
}

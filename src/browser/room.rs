//! `RunRoom`: one actor per run that has sessions on this node.
//!
//! After each committed change the room asks the run's actor for the state once, encodes the
//! `STATE` frame once, and queues the same bytes on every session. Changes that arrive while
//! a fetch is out are coalesced into the next fetch, so a busy run costs one state read per
//! round trip, not one per change per session. Presence is coalesced too: joins and leaves
//! within [`PRESENCE_DELAY`] make one `PRESENCE` frame and one mesh announcement.
//!
//! Each session's queue is bounded in frames and in bytes: a session that lets either fill is
//! told to close (4009). It reconnects and resyncs, and the others never wait for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use uuid::Uuid;

use super::session::BrowserSession;
use super::Shared;
use crate::api_error::ApiError;
use crate::edge_kit::Kick;
use crate::presence::{MAX_USERS, REFRESH};
use crate::runs::RunError;
use crate::socket::{Outbox, Queued};
use run_doc::RunState;
use run_wire::browser::ServerFrame;

/// A failed state read is retried after this long.
const RETRY: Duration = Duration::from_secs(1);
/// Joins and leaves this close together make one presence update.
const PRESENCE_DELAY: Duration = Duration::from_millis(200);

pub struct Member {
    pub session: Addr<BrowserSession>,
    /// The session's queue, bounded in frames and bytes.
    pub outbox: Outbox,
    pub user: String,
}

struct Seat {
    member: Member,
    /// Has the room's latest state.
    current: bool,
    /// Told to close; nothing more is queued for it.
    kicked: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct AddMember(pub u64, pub Member);

#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveMember(pub u64);

/// The run has committed changes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Changed;

/// Who is present changed elsewhere (another region).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceChanged;

/// Announce this node's viewers to the mesh now (a peer connected).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Announce;

/// The last member left: tell the mesh and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseRoom;

pub struct RunRoom {
    run_id: Uuid,
    /// Which room of this run this is (see `PresenceBook::set_local`).
    generation: u64,
    shared: Arc<Shared>,
    seats: HashMap<u64, Seat>,
    /// The last `STATE` frame queued, and the heads it showed.
    last: Option<(ByteString, Vec<String>)>,
    fetching: bool,
    /// Changes committed since the fetch in flight began.
    dirty: bool,
    retry: Option<SpawnHandle>,
    /// A presence update is scheduled; `local_moved` when this node's viewers changed.
    presence_due: Option<SpawnHandle>,
    local_moved: bool,
}

impl RunRoom {
    pub fn new(run_id: Uuid, generation: u64, shared: Arc<Shared>) -> Self {
        RunRoom {
            run_id,
            generation,
            shared,
            seats: HashMap::new(),
            last: None,
            fetching: false,
            dirty: true,
            retry: None,
            presence_due: None,
            local_moved: false,
        }
    }

    fn fetch(&mut self, ctx: &mut Context<Self>) {
        if self.fetching {
            return;
        }
        self.fetching = true;
        self.dirty = false;
        let runs = self.shared.runs.clone();
        let run_id = self.run_id;
        let fut = async move { runs.state(run_id).await };
        ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
            act.fetching = false;
            match result {
                Ok(state) => act.fetched(&state),
                Err(e) => act.failed(e, ctx),
            }
            if act.dirty {
                act.fetch(ctx);
            }
        }));
    }

    fn fetched(&mut self, state: &RunState) {
        let config = &self.shared.config;
        let changed = self
            .last
            .as_ref()
            .is_none_or(|(_, heads)| *heads != state.heads);
        if changed {
            let text = ServerFrame::State {
                run_id: self.run_id,
                region: &config.region,
                state,
            }
            .encode();
            self.last = Some((ByteString::from(text), state.heads.clone()));
            for seat in self.seats.values_mut() {
                seat.current = false;
            }
        }
        if let Some((text, _)) = self.last.clone() {
            self.broadcast(&text, true);
        }
    }

    fn failed(&mut self, e: RunError, ctx: &mut Context<Self>) {
        if let RunError::Deleted(_) = e {
            // Nothing to retry: every session is told why and closed.
            let reason = e.to_string();
            for seat in self.seats.values_mut().filter(|s| !s.kicked) {
                seat.kicked = true;
                seat.member.session.do_send(Kick {
                    code: run_wire::close::GONE,
                    reason: reason.clone(),
                    label: "deleted",
                });
            }
            return;
        }
        log::warn!("browser: run {}: cannot read its state: {e}", self.run_id);
        let e = ApiError::from(e);
        let text = ServerFrame::Error {
            op_id: None,
            error: e.code(),
            message: &format!("the run's state is not available: {e}; retrying"),
        }
        .encode();
        self.broadcast(&ByteString::from(text), true);
        // Still without the state: they get it when the retry succeeds.
        for seat in self.seats.values_mut() {
            seat.current = false;
        }
        if self.retry.is_none() {
            self.retry = Some(ctx.run_later(RETRY, |act, ctx| {
                act.retry = None;
                act.dirty = true;
                act.fetch(ctx);
            }));
        }
    }

    /// Queues `text` on every seat (only those without the latest state, with `stale_only`,
    /// which then have it).
    fn broadcast(&mut self, text: &ByteString, stale_only: bool) {
        let mut sent = 0;
        for seat in self.seats.values_mut() {
            if stale_only && seat.current {
                continue;
            }
            seat.current = true;
            sent += u64::from(queue(seat, text));
        }
        if sent > 0 {
            let frames = &self.shared.metrics.browser_frames;
            frames.with_label_values(&["out"]).inc_by(sent);
        }
    }

    /// Schedules one presence update for whatever moves in the next moment.
    fn presence_soon(&mut self, local_moved: bool, ctx: &mut Context<Self>) {
        self.local_moved |= local_moved;
        if self.presence_due.is_none() {
            self.presence_due = Some(ctx.run_later(PRESENCE_DELAY, |act, _| {
                act.presence_due = None;
                act.update_presence();
            }));
        }
    }

    fn update_presence(&mut self) {
        if std::mem::take(&mut self.local_moved) {
            let mut users = BTreeMap::new();
            for seat in self.seats.values() {
                *users.entry(seat.member.user.clone()).or_insert(0) += 1;
            }
            self.shared
                .book
                .set_local(self.run_id, self.generation, users);
            self.announce();
        }
        let viewers = self
            .shared
            .book
            .viewers(self.run_id, &self.shared.config.region);
        let text = ServerFrame::Presence {
            run_id: self.run_id,
            users: &viewers,
        }
        .encode();
        self.broadcast(&ByteString::from(text), false);
    }

    /// Tells the mesh who views the run here, as the book has it (so a closing room and its
    /// successor both announce the truth).
    fn announce(&self) {
        let users = self.shared.book.local_users(self.run_id, MAX_USERS);
        self.shared.announcer.announce(self.run_id, users);
    }
}

/// Queues a frame on a seat; a session past its frame or byte budget is told to close. True
/// if queued. One frame is always allowed, however big: a run's state must reach its viewers.
fn queue(seat: &mut Seat, text: &ByteString) -> bool {
    if seat.kicked {
        return false;
    }
    match seat.member.outbox.shared(text) {
        Queued::Sent => true,
        outcome => {
            seat.kicked = true;
            if outcome == Queued::TooSlow {
                seat.member.session.do_send(Kick::too_slow());
            }
            false
        }
    }
}

impl Actor for RunRoom {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(REFRESH, |act, _| act.announce());
    }
}

impl Handler<AddMember> for RunRoom {
    type Result = ();

    fn handle(&mut self, AddMember(id, member): AddMember, ctx: &mut Self::Context) {
        self.seats.insert(
            id,
            Seat {
                member,
                current: false,
                kicked: false,
            },
        );
        self.presence_soon(true, ctx);
        if self.fetching || self.dirty {
            self.fetch(ctx);
        } else if let Some((text, _)) = self.last.clone() {
            self.broadcast(&text, true);
        }
    }
}

impl Handler<RemoveMember> for RunRoom {
    type Result = ();

    fn handle(&mut self, RemoveMember(id): RemoveMember, ctx: &mut Self::Context) {
        if self.seats.remove(&id).is_some() {
            self.presence_soon(true, ctx);
        }
    }
}

impl Handler<Changed> for RunRoom {
    type Result = ();

    fn handle(&mut self, _: Changed, ctx: &mut Self::Context) {
        self.dirty = true;
        self.fetch(ctx);
    }
}

impl Handler<PresenceChanged> for RunRoom {
    type Result = ();

    fn handle(&mut self, _: PresenceChanged, ctx: &mut Self::Context) {
        self.presence_soon(false, ctx);
    }
}

impl Handler<Announce> for RunRoom {
    type Result = ();

    fn handle(&mut self, _: Announce, _ctx: &mut Self::Context) {
        self.announce();
    }
}

impl Handler<CloseRoom> for RunRoom {
    type Result = ();

    fn handle(&mut self, _: CloseRoom, ctx: &mut Self::Context) {
        self.shared
            .book
            .set_local(self.run_id, self.generation, BTreeMap::new());
        self.announce();
        ctx.stop();
    }
}

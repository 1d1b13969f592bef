//! `RunRoom`: one actor per run that has sessions on this node.
//!
//! After each committed change the room asks the run's actor for the state once, encodes the
//! `STATE` frame once, and queues the same bytes on every session. Changes that arrive while
//! a fetch is out are coalesced into the next fetch, so a busy run costs one state read per
//! round trip, not one per change per session. A session whose queue is full is told to close:
//! it reconnects and resyncs, and the others never wait for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::protocol::{close, ServerFrame};
use super::session::{BrowserSession, Kick};
use super::Shared;
use crate::doc::RunState;
use crate::http::error::ApiError;
use crate::mesh::presence::{PresenceUser, REFRESH};
use crate::runs::{GetState, RunError};
use crate::socket::Out;

/// A failed state read is retried after this long.
const RETRY: Duration = Duration::from_secs(1);

pub struct Member {
    pub session: Addr<BrowserSession>,
    pub out: mpsc::Sender<Out>,
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

/// Close every session: the node is stopping.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSessions;

pub struct RunRoom {
    run_id: Uuid,
    shared: Arc<Shared>,
    seats: HashMap<u64, Seat>,
    /// The last `STATE` frame queued, and the heads it showed.
    last: Option<(ByteString, Vec<String>)>,
    fetching: bool,
    /// Changes committed since the fetch in flight began.
    dirty: bool,
    retry: Option<SpawnHandle>,
}

impl RunRoom {
    pub fn new(run_id: Uuid, shared: Arc<Shared>) -> Self {
        RunRoom {
            run_id,
            shared,
            seats: HashMap::new(),
            last: None,
            fetching: false,
            dirty: true,
            retry: None,
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
        let fut = async move { runs.send(run_id, GetState).await };
        ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
            act.fetching = false;
            match result.and_then(|r| r) {
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
        self.push_state();
    }

    /// Queues the latest state on every seat that lacks it.
    fn push_state(&mut self) {
        let Some((text, _)) = &self.last else { return };
        let mut sent = 0;
        for seat in self.seats.values_mut().filter(|s| !s.current) {
            seat.current = true;
            sent += u64::from(queue(seat, Out::Shared(text.clone())));
        }
        self.count_out(sent);
    }

    fn failed(&mut self, e: RunError, ctx: &mut Context<Self>) {
        log::warn!("browser: run {}: cannot read its state: {e}", self.run_id);
        let e = ApiError::from(e);
        let text = ServerFrame::Error {
            op_id: None,
            error: e.code(),
            message: &format!("the run's state is not available: {e}; retrying"),
        }
        .encode();
        let text = ByteString::from(text);
        let mut sent = 0;
        for seat in self.seats.values_mut().filter(|s| !s.current) {
            sent += u64::from(queue(seat, Out::Shared(text.clone())));
        }
        self.count_out(sent);
        if self.retry.is_none() {
            self.retry = Some(ctx.run_later(RETRY, |act, ctx| {
                act.retry = None;
                act.dirty = true;
                act.fetch(ctx);
            }));
        }
    }

    fn count_out(&self, n: u64) {
        if n > 0 {
            self.shared
                .metrics
                .browser_frames
                .with_label_values(&["out"])
                .inc_by(n);
        }
    }

    /// This node's viewers, by user.
    fn local_users(&self) -> BTreeMap<String, u32> {
        let mut users = BTreeMap::new();
        for seat in self.seats.values() {
            *users.entry(seat.member.user.clone()).or_insert(0) += 1;
        }
        users
    }

    /// Records this node's viewers, tells the mesh and pushes the presence to every session.
    fn local_presence_changed(&mut self) {
        let users = self.local_users();
        self.shared.book.set_local(self.run_id, users);
        self.announce();
        self.push_presence();
    }

    fn announce(&self) {
        let users = self
            .local_users()
            .into_iter()
            .map(|(user, sessions)| PresenceUser { user, sessions })
            .collect();
        self.shared.mesh.announce_presence(self.run_id, users);
    }

    fn push_presence(&mut self) {
        let viewers = self
            .shared
            .book
            .viewers(self.run_id, &self.shared.config.region);
        let text = ServerFrame::Presence {
            run_id: self.run_id,
            users: &viewers,
        }
        .encode();
        let text = ByteString::from(text);
        let mut sent = 0;
        for seat in self.seats.values_mut() {
            sent += u64::from(queue(seat, Out::Shared(text.clone())));
        }
        self.count_out(sent);
    }
}

/// Queues a frame on a seat; a full queue has its session closed. True if queued.
fn queue(seat: &mut Seat, out: Out) -> bool {
    if seat.kicked {
        return false;
    }
    match seat.member.out.try_send(out) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            seat.kicked = true;
            seat.member.session.do_send(Kick {
                code: close::TOO_SLOW,
                reason: "too far behind: reconnect to resync".into(),
                label: "too_slow",
            });
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            seat.kicked = true;
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
        self.local_presence_changed();
        if self.fetching || self.dirty {
            self.fetch(ctx);
        } else {
            self.push_state();
        }
    }
}

impl Handler<RemoveMember> for RunRoom {
    type Result = ();

    fn handle(&mut self, RemoveMember(id): RemoveMember, _ctx: &mut Self::Context) {
        if self.seats.remove(&id).is_some() {
            self.local_presence_changed();
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

    fn handle(&mut self, _: PresenceChanged, _ctx: &mut Self::Context) {
        self.push_presence();
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
        self.seats.clear();
        self.shared.book.set_local(self.run_id, BTreeMap::new());
        self.announce();
        ctx.stop();
    }
}

impl Handler<CloseSessions> for RunRoom {
    type Result = ();

    fn handle(&mut self, _: CloseSessions, _ctx: &mut Self::Context) {
        for seat in self.seats.values() {
            seat.member.session.do_send(Kick {
                code: close::GOING_AWAY,
                reason: "node shutting down".into(),
                label: "shutdown",
            });
        }
    }
}

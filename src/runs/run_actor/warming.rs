//! A run being loaded, answered from its snapshot's projection meanwhile.
//!
//! When everything stored of a run is in its newest snapshot, the projection written with it
//! is exactly what the document will read once loaded. So while a blocking thread inflates the
//! document (a 50,000-graft run: most of a second), the actor answers state reads and retried
//! grafts from the projection, and every other request waits, in arrival order, to be handled
//! once the document is there.

use std::sync::Arc;

use actix::prelude::*;
use run_doc::{Mutation, SharedState};
use tokio::sync::oneshot;

use super::handlers::Answer;
use super::RunActor;
use crate::runs::api::MutationOutcome;
use crate::runs::RunError;

type Deferred = Box<dyn FnOnce(&mut RunActor, &mut Context<RunActor>)>;

pub(super) struct Warming {
    /// The projection's state, shared with every read.
    state: Arc<SharedState>,
    deferred: Vec<Deferred>,
}

impl Warming {
    pub fn new(state: Arc<SharedState>) -> Self {
        Warming {
            state,
            deferred: Vec::new(),
        }
    }

    pub fn state(&self) -> Arc<SharedState> {
        self.state.clone()
    }

    /// The answer to a retried graft whose id the run holds; None for anything else.
    pub fn retried_graft(&self, mutation: &Mutation) -> Option<MutationOutcome> {
        let Mutation::Graft {
            id,
            retry_safe: true,
            ..
        } = mutation
        else {
            return None;
        };
        let id = id.to_string();
        let state = &self.state;
        let graft = state.grafts.iter().find(|g| g.id == id)?;
        Some(MutationOutcome {
            changed: false,
            graft: Some(graft.clone()),
            lamport: state.lamport,
            heads: state.heads.clone(),
        })
    }
}

impl RunActor {
    /// Holds `msg` until the document is loaded; then it is handled as if it arrived then,
    /// after those held before it.
    pub(super) fn defer<M, R>(&mut self, msg: M, ctx: &mut Context<Self>) -> Answer<R>
    where
        M: Message<Result = Result<R, RunError>> + 'static,
        R: 'static,
        RunActor: Handler<M, Result = Answer<R>>,
    {
        let (tx, rx) = oneshot::channel();
        match self.warming.as_mut() {
            Some(warming) => warming.deferred.push(Box::new(move |act, ctx| {
                let answer = <RunActor as Handler<M>>::handle(act, msg, ctx);
                actix::spawn(async move {
                    let _ = tx.send(answer.await);
                });
            })),
            None => return <RunActor as Handler<M>>::handle(self, msg, ctx),
        }
        Box::pin(async move { rx.await.map_err(|_| RunError::Stopped)? })
    }

    /// The document is loaded (or failed to): handles what waited for it, in order.
    pub(super) fn warmed(&mut self, ctx: &mut Context<Self>) {
        let Some(warming) = self.warming.take() else {
            return;
        };
        for deferred in warming.deferred {
            deferred(self, ctx);
        }
    }
}

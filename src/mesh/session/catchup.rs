//! Catch-up on connect: each end lists its runs (with heads digests); runs both hold and that
//! differ get a sync-protocol round, runs only this end holds are sent whole, the rest skipped.

use super::*;

/// Runs caught up at once per link; the rest wait their turn.
const CATCHUP_PARALLEL: usize = 8;
/// Run ids per `CRDT_RUNS` frame.
const RUNS_PAGE: i64 = 1000;

#[derive(Default)]
pub(super) struct Catchup {
    pub(super) mine: Option<HashMap<Uuid, Option<[u8; 32]>>>,
    /// The peer's runs, with their heads digests where it knows them.
    pub(super) theirs: HashMap<Uuid, Option<[u8; 32]>>,
    pub(super) theirs_done: bool,
    pub(super) started: Option<Instant>,
    pub(super) todo: VecDeque<(Uuid, Work)>,
    pub(super) active: usize,
    pub(super) synced: usize,
    pub(super) sent_whole: usize,
    pub(super) unchanged: usize,
    pub(super) finished: bool,
}

impl PeerSession {
    /// Sends the ids of every run this node holds, page by page, and keeps them for catch-up.
    pub(super) fn list_runs(&mut self, ctx: &mut Context<Self>) {
        self.catchup.started = Some(Instant::now());
        let runs = self.runs.clone();
        ctx.spawn(
            async move {
                let mut all = Vec::new();
                let mut after = None;
                loop {
                    let page = runs.stored_runs(after, RUNS_PAGE).await?;
                    after = page.last().copied();
                    let done = (page.len() as i64) < RUNS_PAGE;
                    all.push(page);
                    if done {
                        return Ok(all);
                    }
                }
            }
            .into_actor(self)
            .map(|result: Result<Vec<Vec<Uuid>>, RunError>, act, ctx| {
                let pages = match result {
                    Ok(p) => p,
                    Err(e) => {
                        return act.close(
                            close::HANDSHAKE,
                            format!("cannot list runs for catch-up: {e}"),
                            ctx,
                        )
                    }
                };
                let count = pages.len();
                let mut mine = HashMap::new();
                for (i, page) in pages.into_iter().enumerate() {
                    let digests: Vec<Option<[u8; 32]>> =
                        page.iter().map(|r| act.runs.digest(*r)).collect();
                    act.send(
                        &Frame::CrdtRuns {
                            run_ids: page.iter().map(Uuid::to_string).collect(),
                            digests: Some(digests.iter().map(|d| d.map(hex::encode)).collect()),
                            done: i + 1 == count,
                        },
                        ctx,
                    );
                    mine.extend(page.into_iter().zip(digests));
                }
                act.catchup.mine = Some(mine);
                act.start_catchup(ctx);
            }),
        );
    }

    pub(super) fn start_catchup(&mut self, ctx: &mut Context<Self>) {
        let c = &mut self.catchup;
        if !c.theirs_done || c.started.is_none() || !c.todo.is_empty() || c.active > 0 {
            return;
        }
        let Some(mine) = c.mine.take() else { return };
        let mut mine: Vec<(Uuid, Option<[u8; 32]>)> = mine.into_iter().collect();
        mine.sort();
        for (run, digest) in mine {
            match c.theirs.get(&run) {
                // Same heads on both sides: nothing to do, and nothing to load.
                Some(theirs) if digest.is_some() && *theirs == digest => c.unchanged += 1,
                Some(_) => c.todo.push_back((run, Work::Step(None))),
                None => c.todo.push_back((run, Work::SendFull)),
            }
        }
        c.theirs = HashMap::new();
        self.feed_catchup(ctx);
    }

    pub(super) fn feed_catchup(&mut self, ctx: &mut Context<Self>) {
        while self.catchup.active < CATCHUP_PARALLEL {
            let Some((run, work)) = self.catchup.todo.pop_front() else {
                break;
            };
            match work {
                Work::SendFull => self.catchup.sent_whole += 1,
                _ => self.catchup.synced += 1,
            }
            self.catchup.active += 1;
            self.push(run, work, true, ctx);
        }
        let label = self.peer_label();
        let c = &mut self.catchup;
        if c.todo.is_empty() && c.active == 0 && !c.finished {
            if let Some(started) = c.started {
                c.finished = true;
                log::info!(
                    "mesh: catch-up with {label} sent: {} shared runs syncing, {} sent whole, {} already in sync, in {} ms",
                    c.synced,
                    c.sent_whole,
                    c.unchanged,
                    started.elapsed().as_millis()
                );
            }
        }
    }
}

//! Copies the WAL back into the database file from a thread of its own, soon after each write.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold: with 4,000
//! pages, one commit in 25 under wrk took 10–50 ms instead of 3, and every append queued behind
//! it waited as long. A passive checkpoint takes no write lock, so it can run beside the commits.
//! A checkpoint that copies the whole WAL ends with an fsync of the database file, and a commit's
//! fsync of the WAL that meets a large one waits for it: checkpointing every 100 ms still left
//! commits of 10–27 ms and a p99 of 28–47 ms. Small checkpoints soon after each write (at most
//! one per 10 ms) keep that flush short: p99 18–24 ms against 28–34, for a fifth more bytes
//! written (BENCHMARKS.md).
//!
//! Only the writer restarts the WAL from its beginning, and only when its transaction begins
//! with everything copied back. Under a writer that never pauses that moment rarely comes, so the
//! WAL grows to the writer's own threshold (16,384 pages, 64 MiB), whose checkpoint inside a
//! commit then has little left to copy and restarts it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::Integer;
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};

use super::super::{pool_error, StoreError};

/// Least time between the starts of two checkpoints: writes closer together share one. Also how
/// soon a checkpoint that could not copy everything is tried again.
const MIN_GAP: Duration = Duration::from_millis(10);

/// Tells the checkpoint thread that something was written, and reads what it found.
#[derive(Clone)]
pub(super) struct Wake {
    tx: mpsc::SyncSender<()>,
    backlog: Arc<AtomicI64>,
}

impl Wake {
    /// Pages in the WAL not yet copied back into the database file, as the last checkpoint
    /// left them.
    pub(super) fn backlog(&self) -> i64 {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Never blocks: a wake already pending covers this write too.
    pub(super) fn committed(&self) {
        // Full: a wake is pending already. Disconnected: the thread is gone (it cannot stop
        // while a handle exists, so only in a panic), and the writer's own checkpoint bounds
        // the WAL.
        let _ = self.tx.try_send(());
    }
}

/// What `PRAGMA wal_checkpoint` reports.
#[derive(QueryableByName)]
struct Outcome {
    /// 1 when another checkpoint held the lock, so this one did nothing.
    #[diesel(sql_type = Integer)]
    busy: i32,
    /// Frames in the WAL (-1 when the database is not in WAL mode).
    #[diesel(sql_type = Integer)]
    log: i32,
    /// Frames copied back, this time or before.
    #[diesel(sql_type = Integer)]
    checkpointed: i32,
}

impl Outcome {
    /// Whether frames were left in the WAL: a reader still needed them, or the lock was taken.
    fn left_some(&self) -> bool {
        self.busy != 0 || self.checkpointed < self.log
    }

    /// Frames not copied back (none when the database is not in WAL mode).
    fn backlog(&self) -> i64 {
        i64::from(self.log.max(0) - self.checkpointed.max(0)).max(0)
    }
}

/// Starts checkpointing the database at `path` on a connection of its own. The thread ends,
/// after a last checkpoint, once every handle to it is dropped.
pub(super) fn start(path: &str) -> Result<Wake, StoreError> {
    let mut conn = SqliteConnection::establish(path).map_err(pool_error)?;
    // A passive checkpoint never waits for a lock: it copies what is committed, stops where a
    // reader still needs the WAL, and does nothing if another checkpoint runs. The busy timeout
    // covers the schema read it starts with.
    conn.batch_execute("PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL;")
        .map_err(pool_error)?;
    let (tx, woken) = mpsc::sync_channel::<()>(1);
    let backlog = Arc::new(AtomicI64::new(0));
    let found = backlog.clone();
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            let mut last = Instant::now();
            let mut left_some = false;
            loop {
                // With frames left behind, try again after the gap even if nothing is written.
                let stopping = if left_some {
                    matches!(
                        woken.recv_timeout(MIN_GAP),
                        Err(RecvTimeoutError::Disconnected)
                    )
                } else {
                    woken.recv().is_err()
                };
                if !stopping {
                    std::thread::sleep(MIN_GAP.saturating_sub(last.elapsed()));
                }
                last = Instant::now();
                left_some = match diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)")
                    .get_result::<Outcome>(&mut conn)
                {
                    Ok(outcome) => {
                        // Busy: it read nothing; the last count stands.
                        if outcome.busy == 0 {
                            found.store(outcome.backlog(), Ordering::Relaxed);
                        }
                        outcome.left_some()
                    }
                    Err(e) => {
                        log::warn!("SQLite checkpoint failed (the writer's own will run): {e}");
                        false
                    }
                };
                if stopping {
                    return;
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("SQLite checkpoint thread: {e}")))?;
    Ok(Wake { tx, backlog })
}

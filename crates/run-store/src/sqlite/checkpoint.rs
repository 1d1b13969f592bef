//! Copies the WAL back into the database file from a thread of its own, shortly after each
//! commit.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold: under load
//! one commit in twenty-five took 10–50 ms instead of 3, and every append queued behind it
//! waited as long. A passive checkpoint takes no write lock, so it can run beside the commits
//! instead. It still ends with an fsync of the database file, and a commit's fsync of the WAL
//! that meets a large one waits for it: checkpointing every 100 ms left commits of 10–27 ms
//! (the write path's p99 at 31–38 ms under wrk). Small checkpoints soon after each commit keep
//! that flush short (p99 17–19 ms at 5 ms apart) for about a third more bytes written; see
//! BENCHMARKS.md. The writer's own automatic checkpoint stays, at a larger threshold, as the
//! bound on the WAL should this thread fall behind.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};

use super::super::{pool_error, StoreError};

/// Least time between the starts of two checkpoints: commits closer together share one.
const MIN_GAP: Duration = Duration::from_millis(10);

/// Tells the checkpoint thread that something was committed.
#[derive(Clone)]
pub(super) struct Wake(mpsc::SyncSender<()>);

impl Wake {
    /// Never blocks: a wake already pending covers this commit too.
    pub(super) fn committed(&self) {
        // Full: a wake is pending already. Disconnected: the thread is gone (it cannot stop
        // while a handle exists, so only in a panic), and the writer's own checkpoint bounds
        // the WAL.
        let _ = self.0.try_send(());
    }
}

/// Starts checkpointing the database at `path` on a connection of its own. The thread ends,
/// after a last checkpoint, once every handle to it is dropped.
pub(super) fn start(path: &str) -> Result<Wake, StoreError> {
    let mut conn = SqliteConnection::establish(path).map_err(pool_error)?;
    // A passive checkpoint never waits for the writer: it copies what is committed and stops
    // where a reader still needs the WAL. The busy timeout covers the checkpoint lock, which
    // the writer's own automatic checkpoint may hold.
    conn.batch_execute("PRAGMA busy_timeout = 5000; PRAGMA synchronous = FULL;")
        .map_err(pool_error)?;
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            let mut last = Instant::now();
            loop {
                let stopping = woken.recv().is_err();
                if !stopping {
                    std::thread::sleep(MIN_GAP.saturating_sub(last.elapsed()));
                }
                last = Instant::now();
                if let Err(e) = conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE);") {
                    log::warn!("SQLite checkpoint failed (the writer's own bounds the WAL): {e}");
                }
                if stopping {
                    return;
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("SQLite checkpoint thread: {e}")))?;
    Ok(Wake(wake))
}

//! Where the pool's connections are driven.
//!
//! A diesel-async connection talks to its socket through a task it spawns when it is opened,
//! on the runtime of whoever opened it. The node has many runtimes (every actix arbiter has
//! its own, single-threaded), and the pool opens a connection for whichever caller first needs
//! one. So a connection opened by the snapshot thread or a run actor was driven there, and
//! while that thread was busy (saving a large run, applying a large sync) every query on the
//! connection waited, including appends from the group committer on another thread: on one hot
//! run, commits stalled for 0.5-2.5 s now and then. Every pooled connection is therefore opened
//! on one runtime of its own, whose single thread does nothing else.

use std::sync::OnceLock;

use diesel::ConnectionResult;
use diesel_async::pooled_connection::SetupCallback;
use diesel_async::{AsyncConnection, AsyncPgConnection};

/// The process's connection runtime: one thread, started on first use, for every store.
fn driver() -> Result<&'static tokio::runtime::Runtime, String> {
    static DRIVER: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("pg-connections")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the PostgreSQL connection thread: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Opens a connection on the connection runtime, so that its socket is driven there.
pub(super) fn open_on_driver() -> SetupCallback<AsyncPgConnection> {
    Box::new(|url| {
        let url = url.to_string();
        Box::pin(async move {
            let broken = diesel::ConnectionError::BadConnection;
            let opening = driver()
                .map_err(broken)?
                .spawn(async move { AsyncPgConnection::establish(&url).await });
            let opened: ConnectionResult<AsyncPgConnection> = opening
                .await
                .map_err(|e| broken(format!("opening a connection failed: {e}")))?;
            opened
        })
    })
}

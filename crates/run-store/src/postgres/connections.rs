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
use tokio::task::JoinHandle;

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
            let mut opening = Opening(
                driver()
                    .map_err(broken)?
                    .spawn(async move { AsyncPgConnection::establish(&url).await }),
            );
            let opened: ConnectionResult<AsyncPgConnection> = (&mut opening.0)
                .await
                .map_err(|e| broken(format!("opening a connection failed: {e}")))?;
            opened
        })
    })
}

/// A connection being opened on the driver, stopped if its caller stops waiting: the pool
/// drops a connect slower than its create timeout, and an attempt left running would hold a
/// socket to an unreachable server for minutes, one more every timeout.
struct Opening(JoinHandle<ConnectionResult<AsyncPgConnection>>);

impl Drop for Opening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    /// A connect whose caller stopped waiting is stopped too, and lets its socket go: here the
    /// server accepts and never answers, as one that is overloaded or half-reachable does.
    #[tokio::test]
    async fn an_abandoned_connect_closes_its_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let port = listener.local_addr().expect("its address").port();
        let setup = open_on_driver();
        let url = format!("postgres://postgres@127.0.0.1:{port}/none");
        let connecting = setup(&url);
        let waited = tokio::time::timeout(Duration::from_millis(300), connecting).await;
        assert!(
            waited.is_err(),
            "nothing answers, so the connect cannot finish"
        );
        let (mut socket, _) = listener.accept().expect("the connect reached the server");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a read timeout");
        let mut buf = [0u8; 512];
        // The startup message may be read first; then the client's side must close.
        loop {
            match socket.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => panic!("the abandoned connect still holds its socket after 5 s: {e}"),
            }
        }
    }
}

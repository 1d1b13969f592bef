//! crdt-node: load the configuration, start the node, serve until stopped.

use crdt_node::config::Settings;

/// mimalloc rather than glibc's malloc: the write path allocates many small, short-lived
/// objects across threads, where glibc spent ~14% of the node's samples (BENCHMARKS.md,
/// "Where the write path's time goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,automerge=warn,actix_web_prom=error"),
    )
    .init();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("crdt-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = actix_web::rt::System::new().block_on(async move {
        let node = crdt_node::node::start(&settings)
            .await
            .map_err(|e| e.to_string())?;
        // On SIGINT/SIGTERM: mesh links and browser sessions are closed first ("going away") so
        // they do not hold the server up, the server stops gracefully, then the runs are
        // drained and snapshotted, all within the shutdown grace.
        let server = node.server.clone();
        let grace = std::time::Duration::from_secs(settings.server.shutdown_grace_secs);
        let (stopping_tx, stopping) = tokio::sync::oneshot::channel();
        let edges = node.edges();
        let runs = node.runs.clone();
        actix_web::rt::spawn(async move {
            shutdown_signal().await;
            let _ = stopping_tx.send(std::time::Instant::now());
            log::info!("shutting down: closing mesh links, browser and automerge-repo sessions, event streams");
            edges.close();
            // A pod of a region sharing a database hands its runs to the others first.
            runs.hand_over(grace / 2).await;
            // Stop accepting; requests in flight finish (their writes commit) within the grace.
            server.stop(true).await;
        });
        let served = match node.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        // The server has finished its requests; what the runs still hold goes to storage.
        // Without a signal (the server ended by itself) there is nothing to wait for.
        let mut stopping = stopping;
        let since = stopping
            .try_recv()
            .map_or(std::time::Duration::ZERO, |t| t.elapsed());
        let left = grace
            .saturating_sub(since)
            .max(std::time::Duration::from_secs(1));
        let started = std::time::Instant::now();
        let n = node.runs.shutdown(left).await;
        log::info!(
            "stopped: {n} run(s) snapshotted in {} ms",
            started.elapsed().as_millis()
        );
        served
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("crdt-node: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

//! crdt-node: load the configuration, start the node, serve until stopped.

use crdt_node::config::Settings;

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,automerge=warn"),
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
        // actix-web stops gracefully on SIGINT/SIGTERM, waiting for open connections; mesh
        // links and browser sessions are closed first ("going away") so they do not hold it up.
        let mesh = node.mesh.clone();
        let browser = node.browser.clone();
        actix_web::rt::spawn(async move {
            shutdown_signal().await;
            log::info!("shutting down: closing mesh links and browser sessions");
            mesh.close();
            browser.close();
        });
        match node.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
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

//! A minimal automerge-repo sync server on samod 0.16: the third server of the side-by-side
//! benchmark (`scripts/side-by-side.sh`, BENCHMARKS.md). Like automerge-repo-sync-server, it
//! accepts WebSocket peers at `/`, syncs any document a peer asks for (announcing none) and keeps documents
//! on disk (samod's filesystem storage, the format of automerge-repo's Node storage adapter).
//!
//! `samod-server PORT DATA_DIR`

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;

#[derive(Clone)]
struct Server {
    acceptor: samod::AcceptorHandle,
}

async fn upgrade(ws: WebSocketUpgrade, State(server): State<Server>) -> Response {
    // Frames as large as the other servers take (a whole document on first sync).
    ws.max_message_size(64 << 20).on_upgrade(move |socket| async move {
        if let Err(e) = server.acceptor.accept_axum(socket, None) {
            eprintln!("samod-server: connection refused: {e:?}");
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().ok_or("usage: samod-server PORT DATA_DIR")?.parse()?;
    let dir = args.next().ok_or("usage: samod-server PORT DATA_DIR")?;
    let repo = samod::Repo::build_tokio()
        .with_storage(samod::storage::TokioFilesystemStorage::new(dir))
        // As automerge-repo-sync-server (its share policy answers false): every peer may sync
        // any document it asks for, but the server announces none to peers that did not ask.
        .with_share_policy(samod::ShareConfig::read_write().with_announce(false))
        .load()
        .await;
    let acceptor = repo.make_acceptor(format!("ws://127.0.0.1:{port}/").parse()?)?;
    let app = Router::new()
        .route("/", get(upgrade))
        .with_state(Server { acceptor });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    // Nagle off, as the other two servers have it: small frames in quick succession.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

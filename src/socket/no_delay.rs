//! The TCP connector of outbound links (mesh links, calls to the region's other pods): awc's own, with Nagle's algorithm turned off on
//! the socket. Mesh frames are small and follow each other closely; with Nagle a frame written
//! while the last is unacknowledged waits for the peer's delayed ACK (40 ms on Linux) or a whole
//! round trip, which on a wide-area link doubled the propagation delay.

use std::future::Future;
use std::pin::Pin;

use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection, ConnectorService};
use awc::http::Uri;
use tokio::net::TcpStream;

#[derive(Clone, Default)]
pub struct NoDelay(ConnectorService);

impl Service<ConnectInfo<Uri>> for NoDelay {
    type Response = Connection<Uri, TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>>>>;

    // awc's connector is always ready too.
    actix_service::always_ready!();

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let connecting = self.0.call(req);
        Box::pin(async move {
            let connection = connecting.await?;
            // Best effort: a socket that refuses it still works, only slower.
            let _ = connection.io_ref().set_nodelay(true);
            Ok(connection)
        })
    }
}

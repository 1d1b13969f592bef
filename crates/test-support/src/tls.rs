//! A TLS-terminating front for a node, as an ingress in front of a pod would be: it serves a
//! fresh self-signed certificate for `localhost` and forwards plain TCP to the node. The
//! certificate is written to a PEM file a node can be told to trust (`SSL_CERT_FILE`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;

pub struct TlsFront {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
    task: AbortHandle,
}

impl TlsFront {
    pub async fn start(upstream_base: &str) -> TlsFront {
        let key =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, key.cert.pem()).expect("write ca");
        let certs = vec![CertificateDer::from(key.cert.der().to_vec())];
        let private =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let upstream = upstream_base.trim_start_matches("http://").to_string();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Ok(mut plain) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        })
        .abort_handle();
        TlsFront {
            addr,
            ca_file,
            _dir: dir,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("wss://localhost:{}/ws", self.addr.port())
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

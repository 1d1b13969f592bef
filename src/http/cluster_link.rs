//! How this pod calls the owner of a run another pod of the region holds
//! (`runs::Transport`): a POST of the CBOR call to `/internal/runs/{runId}` on the owner, with
//! the region's proof. awc's client lives on one thread (it is not `Send`); the runtime hands
//! it calls through a queue and awaits the answer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use run_wire::cluster::{prove, MAX_BODY, PROOF_HEADER};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::runs::{remote_path, Transport};

/// A call's whole time, the owner's work included (its write timeout is 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Job {
    address: String,
    run_id: Uuid,
    body: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, String>>,
}

pub struct ClusterLink {
    queue: mpsc::UnboundedSender<Job>,
    /// The thread the client runs on, kept for the node's life.
    _thread: actix::Arbiter,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ClusterLink {
    pub fn start(secret: String) -> Arc<Self> {
        let (queue, jobs) = mpsc::unbounded_channel::<Job>();
        let thread = actix::Arbiter::new();
        // Built on the thread itself: the client is not `Send`.
        thread.spawn_fn(move || {
            actix_web::rt::spawn(serve(jobs, secret));
        });
        Arc::new(ClusterLink {
            queue,
            _thread: thread,
        })
    }
}

async fn serve(mut jobs: mpsc::UnboundedReceiver<Job>, secret: String) {
    let client = awc::Client::builder()
        .timeout(CALL_TIMEOUT)
        .max_http_version(awc::http::Version::HTTP_11)
        .connector(awc::Connector::new().connector(crate::socket::NoDelay::default()))
        .finish();
    let secret: Arc<str> = secret.into();
    while let Some(job) = jobs.recv().await {
        let (client, secret) = (client.clone(), secret.clone());
        actix_web::rt::spawn(async move {
            let answer = post(&client, &secret, &job.address, job.run_id, job.body).await;
            let _ = job.reply.send(answer);
        });
    }
}

async fn post(
    client: &awc::Client,
    secret: &str,
    address: &str,
    run_id: Uuid,
    body: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let path = remote_path(run_id);
    let proof = prove(secret, now_ms(), &path, &body);
    let mut answer = client
        .post(format!("{address}{path}"))
        .insert_header((PROOF_HEADER, proof))
        .content_type("application/cbor")
        .send_body(body)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    let bytes = answer
        .body()
        .limit(MAX_BODY)
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    Ok(bytes.to_vec())
}

impl Transport for ClusterLink {
    fn post(
        &self,
        address: &str,
        run_id: Uuid,
        body: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            address: address.to_string(),
            run_id,
            body,
            reply,
        };
        let queued = self.queue.send(job).is_ok();
        Box::pin(async move {
            if !queued {
                return Err("the cluster link has stopped".into());
            }
            answer
                .await
                .map_err(|_| "the cluster link dropped the call".to_string())?
        })
    }
}

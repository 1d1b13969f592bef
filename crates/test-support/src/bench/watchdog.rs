//! Running an attack against a node process while watching its memory.

use std::future::Future;
use std::time::{Duration, Instant};

use super::procfs;

/// Runs `attack` until it answers, the node `pid` passes `cap_kib` of resident memory, or
/// `limit` passes; returns the answer (or why there was none) and the seconds it took.
pub async fn watched(
    pid: u32,
    limit: Duration,
    cap_kib: u64,
    attack: impl Future<Output = String>,
) -> (String, f64) {
    let start = Instant::now();
    let sampler = async {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if procfs::rss_kib(pid) > cap_kib {
                return format!("none: over {} GiB, stopped", cap_kib >> 20);
            }
        }
    };
    let answer = tokio::select! {
        a = attack => a,
        s = sampler => s,
        _ = tokio::time::sleep(limit) => format!("none within {} s", limit.as_secs()),
    };
    (answer, start.elapsed().as_secs_f64())
}

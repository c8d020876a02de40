//! The Postgres fallback under load: Redis frozen with SIGSTOP (the fault
//! the fault suite injects), `claim-hot` driven through the open circuit,
//! and beside it pgbench's hot-row conditional UPDATE at the same
//! concurrency, the figure the fallback is held to.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::Channel;

use super::baselines;
use super::load::Plan;
use super::workloads::{self, Caller, Workload};

/// What the fallback probe needs from the bench's arguments.
pub struct Setup<'a> {
    pub redis_url: &'a str,
    pub database_url: &'a str,
    pub pgbench: &'a Path,
    pub dir: &'a Path,
    pub clients: usize,
    pub duration: Duration,
}

/// Freezes Redis, drives claims through the fallback, thaws Redis (also
/// on error or panic), then runs the pgbench baseline and prints
/// `bench-probe: fallback ...`.
pub async fn run(channels: &[Channel], c: &Caller, s: &Setup<'_>) -> anyhow::Result<()> {
    let pid = loopback_redis_pid(s.redis_url).await?;
    let measured = {
        let _frozen = Frozen::stop(pid)?;
        // The first calls wait out --redis-timeout-ms and open the
        // circuit; the warm-up absorbs them.
        let warm = Plan {
            clients: s.clients,
            duration: Duration::from_secs(3),
            rate: None,
            max_calls: None,
        };
        workloads::run(Workload::ClaimHot, channels, &warm, c).await;
        let plan = Plan {
            duration: s.duration,
            ..warm
        };
        workloads::run(Workload::ClaimHot, channels, &plan, c).await
    };
    let pg = baselines::pgbench(
        s.pgbench,
        s.database_url,
        s.dir,
        &Workload::ClaimHot.pg_alternative(),
        s.clients,
        s.duration.as_secs().clamp(1, 10),
    )
    .await?;
    let outcomes: Vec<String> = measured
        .outcomes
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect();
    println!(
        "bench-probe: fallback workload=claim-hot rps={:.0} p50_ms={:.2} p99_ms={:.2} outcomes={} pg_alt={pg:.0} ratio_pg={:.2}",
        measured.rate(),
        measured.ms(0.5),
        measured.ms(0.99),
        outcomes.join(","),
        measured.rate() / pg
    );
    Ok(())
}

/// The pid of the Redis at `url`, which must be on this machine: the probe
/// sends it signals.
async fn loopback_redis_pid(url: &str) -> anyhow::Result<u32> {
    let (host, _) = super::host_port(url);
    anyhow::ensure!(
        matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]"),
        "the fallback probe freezes Redis with SIGSTOP, so Redis must be on this machine's loopback (it is at {host})"
    );
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no process_id in Redis's INFO server")
}

/// Redis stopped with SIGSTOP until this is dropped (SIGCONT).
struct Frozen(u32);

impl Frozen {
    fn stop(pid: u32) -> anyhow::Result<Self> {
        signal(pid, "STOP")?;
        Ok(Self(pid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = signal(self.0, "CONT") {
            eprintln!(
                "bench: could not thaw Redis (pid {}): {e:#}; run `kill -CONT {}`",
                self.0, self.0
            );
        }
    }
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .context("run kill")?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
    Ok(())
}

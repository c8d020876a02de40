//! The Postgres fallback under load: Redis frozen with SIGSTOP (the fault
//! the fault suite injects), each workload driven through the open circuit
//! (`claim-hot` unless `--workload` names others), and beside each its
//! Postgres alternative through pgbench at the same concurrency. The issue
//! holds the fallback to 0.8 × pgbench for claim-hot's hot-row conditional
//! UPDATE; the other workloads answer what a user planning for a Redis
//! outage asks next: how fast do reservations, sale locks and slots go
//! while Redis is gone?

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
    /// Driven in turn, each already set up (`workloads::setup`): setting
    /// up goes through Redis.
    pub workloads: &'a [Workload],
}

/// Freezes Redis, drives each workload through the fallback, thaws Redis
/// (also on error or panic), then runs each workload's pgbench alternative
/// and prints one `bench-probe: fallback ...` line per workload, whose
/// `rps` counts the calls answered without an error.
pub async fn run(channels: &[Channel], c: &Caller, s: &Setup<'_>) -> anyhow::Result<()> {
    let pid = loopback_redis_pid(s.redis_url).await?;
    let mut measured = Vec::new();
    {
        let _frozen = Frozen::stop(vec![pid])?;
        for (i, &w) in s.workloads.iter().enumerate() {
            // The first calls wait out --redis-timeout-ms and open the
            // circuit; the first warm-up absorbs them.
            let warm = Plan {
                clients: s.clients,
                duration: Duration::from_secs(if i == 0 { 3 } else { 1 }),
                rate: None,
                max_calls: None,
            };
            workloads::run(w, channels, &warm, c).await;
            let plan = Plan {
                duration: s.duration,
                ..warm
            };
            measured.push((w, workloads::run(w, channels, &plan, c).await));
        }
    }
    for (w, run) in measured {
        let pg = baselines::pgbench(
            s.pgbench,
            s.database_url,
            s.dir,
            &w.pg_alternative(),
            s.clients,
            baselines::PgRun::Seconds(s.duration.as_secs().clamp(1, 10)),
        )
        .await?;
        println!(
            "bench-probe: fallback workload={} rps={:.0} p50_ms={:.2} p99_ms={:.2} outcomes={} pg_alt={pg:.0} ratio_pg={:.2}",
            w.name(),
            run.answered_rate(),
            run.ms(0.5),
            run.ms(0.99),
            run.outcomes_text(),
            run.answered_rate() / pg
        );
    }
    Ok(())
}

/// The pid of the Redis at `url`, which must be on this machine: the
/// probes that freeze it send it signals.
pub(super) async fn loopback_redis_pid(url: &str) -> anyhow::Result<u32> {
    let (host, _) = super::host_port(url);
    anyhow::ensure!(
        matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]"),
        "this probe freezes Redis with SIGSTOP, so Redis must be on this machine's loopback (it is at {host})"
    );
    super::cpu::redis_pid(url)
        .await
        .context("cannot read Redis's process_id from INFO server")
}

/// Processes (Redis, or Postgres's postmaster and backends) stopped with
/// SIGSTOP until this is dropped (SIGCONT), in the order given.
pub(super) struct Frozen(Vec<u32>);

impl Frozen {
    pub(super) fn stop(pids: Vec<u32>) -> anyhow::Result<Self> {
        let mut frozen = Self(Vec::with_capacity(pids.len()));
        for pid in pids {
            match signal(pid, "STOP") {
                Ok(()) => frozen.0.push(pid),
                // A backend that ended since it was listed has nothing to
                // stop.
                Err(_) if !super::cpu::is_local(pid) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // A backend that was exiting when stopped (its connection
            // closed) is reaped once the postmaster runs again.
            if let Err(e) = signal(pid, "CONT")
                && super::cpu::is_local(pid)
            {
                eprintln!("bench: could not thaw pid {pid}: {e:#}; run `kill -CONT {pid}`");
            }
        }
    }
}

/// Sends `sig` (`STOP`, `TERM`...) to `pid` with `kill`.
pub(super) fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status()
        .context("run kill")?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
    Ok(())
}

//! What client connections cost the daemon: the question of a platform
//! whose storefront fleet keeps a channel open from every pod, and of
//! whoever sizes the daemon's memory and file-descriptor limit for it.
//!
//! The probe runs claim-hot flat out, then opens `--idle-connections`
//! more connections, each making one no-op call and then idling (a
//! client that called once and waits for its next shopper). It reports
//! how fast they were opened (a fleet reconnecting after a deploy), the
//! daemon's resident memory and file descriptors per connection, each
//! process's CPU over `--duration` seconds with them open and idle (the
//! daemon pings each every `--http2-keepalive-secs`), claim-hot again
//! beside them, and the daemon's memory and descriptors (more than before
//! the probe) once they are closed.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::cpu::Watched;
use super::load::Plan;
use super::report::status_kib;
use super::workloads::{self, Caller, Workload};
use super::{BenchArgs, connect};

/// Connections opened at once: a fleet's pods reconnect together, but
/// not all of them in the same instant.
const OPENING_AT_ONCE: usize = 64;
/// Descriptors the bench and the daemon need besides the idle connections
/// (their own connections to each other, Redis and Postgres, files).
const OTHER_FDS: u64 = 256;
/// Time for the daemon to finish with connections opened or closed before
/// its memory is read.
const SETTLE: Duration = Duration::from_secs(2);

/// What the probe needs.
pub struct Setup<'a> {
    /// The daemon's address and the client's TLS for it.
    pub addr: &'a str,
    pub tls: Option<&'a ClientTlsConfig>,
    /// The daemon the bench started (its memory and descriptors are read).
    pub daemon: u32,
    pub watched: &'a Watched,
    pub plan: &'a Plan,
    pub idle: usize,
}

/// Refuses, before anything starts, a count of connections that this
/// process's descriptor limit (which the daemon it starts inherits)
/// cannot hold, naming the fix.
pub fn check(args: &BenchArgs) -> anyhow::Result<()> {
    let needed = args.idle_connections as u64 + OTHER_FDS;
    match open_files_limit() {
        Some(limit) if limit < needed => anyhow::bail!(
            "--idle-connections {} needs a limit of at least {needed} open files for the bench and its daemon, and it is {limit}: raise it (`ulimit -n {needed}`) or open fewer",
            args.idle_connections
        ),
        _ => Ok(()),
    }
}

/// Runs the probe and prints its line.
pub async fn run(channels: &[Channel], caller: &Caller, setup: &Setup<'_>) -> anyhow::Result<()> {
    let warm = Plan {
        duration: Duration::from_secs(1),
        ..setup.plan.clone()
    };
    workloads::run(Workload::ClaimHot, channels, &warm, caller).await;
    let alone = workloads::run(Workload::ClaimHot, channels, setup.plan, caller).await;
    let pid = setup.daemon;
    let (rss_before, fds_before) = (rss_kib(pid), open_fds(pid));

    let started = Instant::now();
    let idle = open(setup.addr, setup.tls, setup.idle).await?;
    let opened_in = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    let (rss_open, fds_open) = (rss_kib(pid), open_fds(pid));
    let before = setup.watched.sample();
    let quiet = Instant::now();
    tokio::time::sleep(setup.plan.duration).await;
    let idle_cpu = before.share(&setup.watched.sample(), quiet.elapsed());
    let beside = workloads::run(Workload::ClaimHot, channels, setup.plan, caller).await;
    drop(idle);
    tokio::time::sleep(SETTLE).await;

    let n = setup.idle as f64;
    println!(
        "probe: connections transport={} idle={} opened_per_sec={:.0} rss_kib_before={rss_before} rss_kib_open={rss_open} rss_kib_closed={} fds_closed={} bytes_per_connection={:.0} fds_per_connection={:.2} idle_cpu_pct={idle_cpu} claims_alone_rps={:.0} claims_beside_rps={:.0} claims_vs_alone={:.2} claims_p99_alone_ms={:.2} claims_p99_beside_ms={:.2} errors={}",
        if setup.tls.is_some() { "tls" } else { "plain" },
        setup.idle,
        n / opened_in.as_secs_f64(),
        rss_kib(pid),
        open_fds(pid) as i64 - fds_before as i64,
        (rss_open as f64 - rss_before as f64) * 1024.0 / n,
        (fds_open as f64 - fds_before as f64) / n,
        alone.rate(),
        beside.rate(),
        beside.rate() / alone.rate(),
        alone.ms(0.99),
        beside.ms(0.99),
        alone.errors() + beside.errors(),
    );
    Ok(())
}

/// `n` connections, `OPENING_AT_ONCE` being opened at a time, each once it
/// has answered a no-op call.
async fn open(addr: &str, tls: Option<&ClientTlsConfig>, n: usize) -> anyhow::Result<Vec<Channel>> {
    futures_util::stream::iter(0..n)
        .map(|_| async move {
            let channel = connect(addr, tls).await?;
            HealthClient::new(channel.clone())
                .check(HealthCheckRequest::default())
                .await?;
            anyhow::Ok(channel)
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .try_collect()
        .await
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:").unwrap_or(0)
}

pub(super) fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// This process's soft limit of open files (`ulimit -n`), from
/// `/proc/self/limits`; `None` when unlimited or unreadable.
pub(super) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files(&limits)
}

fn parse_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_the_soft_one() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95493                95493                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files     \n";
        assert_eq!(parse_open_files(unlimited), None);
    }
}

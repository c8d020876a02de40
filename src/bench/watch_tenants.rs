//! Many quiet shops, each with a live `Watch` subscriber: the question of
//! a platform that runs one holdfast for many shops, each shop's backend
//! watching its events. Every tenant with subscribers has a tap (src/grpc/
//! event_tap.rs), and up to 16 taps share a reader holding a Redis
//! connection in a blocking read, so the probe measures what the taps
//! cost when nothing happens, and that an event still reaches every shop's
//! subscriber.
//!
//! It starts a daemon of its own with an admin key for each of
//! `--tenants` shops (`bench-watch-<tag>-1` ...), gives each a sale, and reads
//! each process's CPU over `--duration` seconds of no traffic; then opens
//! one subscriber a shop over `--connections` connections, reads how long
//! that took, the Redis connections and daemon descriptors it added, and
//! each process's CPU and Redis's `XREAD`s a second over `--duration`
//! quiet seconds again; then claims once in each shop and reads what each
//! subscriber got and how long after its event; last, the subscribers
//! leave and it reads the taps and readers left. It counts taps and
//! readers by the daemon's gauges (`holdfast_watch_taps`,
//! `holdfast_watch_readers`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch as signal;

use super::load::Plan;
use super::redis_time::{Snapshot, info_number};
use super::workloads::{self, Caller, Workload};
use super::{BenchArgs, Daemon, DaemonAuth, connections, cpu, watch};
use crate::domain::TenantId;
use crate::grpc::WATCH_TAPS_PER_READER as SHARED;
use crate::telemetry::metric;

/// Longer than the daemon takes to read its tenants again and the drainer
/// to tend their new streams (as the idle probe waits), and than a
/// subscriber's tap takes to start its first read.
const SETTLE: Duration = Duration::from_secs(8);
/// Descriptors and Redis clients besides the taps': the bench's and the
/// daemon's own connections, with room to spare.
const OTHERS: u64 = 200;

/// Refuses, before anything starts, a count of shops whose readers (one
/// Redis connection each [`SHARED`] shops) the open-files limit (which
/// the daemon inherits) or Redis's `maxclients` cannot give a connection.
pub async fn check(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.addr.is_none(),
        "the watch-tenants probe starts a daemon of its own, with a key per shop; it cannot drive --addr"
    );
    let needed = (args.tenants as usize).div_ceil(SHARED) as u64 + OTHERS;
    if let Some(limit) = super::conns::open_files_limit() {
        anyhow::ensure!(
            limit >= needed,
            "--tenants {} with a Watch subscriber each needs a limit of at least {needed} open files (a Redis connection each {SHARED} shops), and it is {limit}: raise it (`ulimit -n {needed}`) or ask for fewer",
            args.tenants
        );
    }
    let mut con = redis::Client::open(args.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("the watch-tenants probe asks Redis how many clients it takes")?;
    if let Some(most) = crate::store::redis::config_get(&mut con, "maxclients")
        .await
        .and_then(|m| m.parse::<u64>().ok())
    {
        anyhow::ensure!(
            most >= needed,
            "--tenants {} with a Watch subscriber each needs Redis to take {needed} clients, and its maxclients is {most}: raise it (README, \"Events\") or ask for fewer",
            args.tenants
        );
    }
    Ok(())
}

/// Runs the probe and prints its line.
pub async fn run(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut stats = redis::Client::open(args.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("the watch-tenants probe reads Redis's clients and commands")?;
    let tag = Caller::new(None).tag;
    let (configs, shops) = keys(&tag, args.tenants)?;
    let mut daemon = Daemon::start(args, dir, DaemonAuth::Keys(&configs), None)?;
    let metrics = daemon.metrics_addr();
    let channels = connections(&daemon.addr(), None, args.connections).await?;
    for shop in &shops {
        workloads::setup(Workload::ClaimHot, &channels[0], shop)
            .await
            .context("setting up a shop's sale")?;
    }
    let watched = cpu::Watched::find(Some(daemon.pid()), &args.redis_url, &args.database_url).await;
    let quiet = Duration::from_secs(args.duration);
    tokio::time::sleep(SETTLE).await;
    let without = super::idle::busy(&watched, quiet).await;

    let fds_before = super::conns::open_fds(daemon.pid());
    let (stop, stopped) = signal::channel(false);
    let started = Instant::now();
    let subscribers: Vec<_> = shops
        .iter()
        .zip(channels.iter().cycle())
        .map(|(shop, ch)| tokio::spawn(watch::subscribe(ch.clone(), shop.clone(), stopped.clone())))
        .collect();
    // A tap is started by its first subscriber's call; its reader's
    // connection follows within moments.
    let subscribed = wait_for_taps(&metrics, i64::from(args.tenants)).await;
    let subscribe_ms = started.elapsed().as_millis();
    tokio::time::sleep(SETTLE).await;
    let (taps_with, readers) = taps(&metrics).await;
    let fds_with = super::conns::open_fds(daemon.pid());
    let commands_before = Snapshot::read(&mut stats).await;
    let busy_started = Instant::now();
    let with = super::idle::busy(&watched, quiet).await;
    let reads_per_sec = match (commands_before, Snapshot::read(&mut stats).await) {
        (Some(b), Some(a)) => {
            format!(
                "{:.0}",
                b.calls_between(&a, "xread") as f64 / busy_started.elapsed().as_secs_f64()
            )
        }
        _ => "unread".into(),
    };

    // One claim in each shop, then a moment for the events to arrive.
    let claims = Plan {
        clients: args.clients,
        duration: Duration::from_secs(60),
        rate: None,
        max_calls: Some(u64::from(args.tenants)),
    };
    let opened_before = connections_received(&mut stats).await;
    let claimed = workloads::spread(Workload::ClaimHot, &channels, &claims, &shops).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let opened = connections_received(&mut stats)
        .await
        .saturating_sub(opened_before);
    let _ = stop.send(true);
    let seen = watch::Tally::of(subscribers).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (taps_left, readers_left) = taps(&metrics).await;
    daemon.stop();
    println!(
        "probe: watch-tenants tenants={} subscribed={subscribed} subscribe_ms={subscribe_ms} taps={taps_with} readers={readers} daemon_fds_added={} cpu_pct_without={without} cpu_pct_with={with} xread_per_sec={reads_per_sec} claimed={} redis_connections_opened={opened} {} taps_left={taps_left} readers_left={readers_left}{}",
        args.tenants,
        fds_with.saturating_sub(fds_before),
        claimed.calls - claimed.errors(),
        seen.fields(),
        seen.first_end(),
    );
    Ok(())
}

/// Connections Redis has accepted so far (`total_connections_received`):
/// around the claims, whether the subscribers opened any to take their
/// events (in the bench's own Redis, nothing else connects meanwhile).
async fn connections_received(stats: &mut redis::aio::MultiplexedConnection) -> u64 {
    info_number(stats, "stats", "total_connections_received")
        .await
        .unwrap_or(0)
}

/// `n` shops' `--api-key` flags and callers, a fresh admin key each (the
/// probe makes their sales), their tenants named with `tag`.
fn keys(tag: &Arc<str>, n: u32) -> anyhow::Result<(Vec<String>, Vec<Caller>)> {
    let mut configs = Vec::with_capacity(n as usize);
    let mut callers = Vec::with_capacity(n as usize);
    for i in 1..=n {
        let tenant = TenantId::parse(&format!("bench-watch-{tag}-{i}"))?;
        let (_, key, _) = crate::grpc::auth::new_key();
        configs.push(format!("{tenant}:admin:{key}"));
        callers.push(Caller {
            tag: Arc::clone(tag),
            ..Caller::new(Some(Arc::from(key.as_str())))
        });
    }
    Ok((configs, callers))
}

/// The daemon's taps and readers, by its gauges (-1 where unread).
async fn taps(metrics: &str) -> (i64, i64) {
    let page = super::probes::scrape(metrics).await;
    let read = |name| super::probes::gauge(&page, name).map_or(-1, |v| v as i64);
    (read(metric::WATCH_TAPS), read(metric::WATCH_READERS))
}

/// Waits, half a minute at most, until the daemon has `want` taps: whether
/// it got there.
async fn wait_for_taps(metrics: &str, want: i64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if taps(metrics).await.0 >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

//! A restart of the daemon in the middle of a sale, as the shoppers see
//! it: what a deploy costs. The deploy files run one replica and replace
//! it with `Recreate` (README, "Deploying"): the old daemon is sent
//! SIGTERM, says NOT_SERVING, finishes the calls it holds and stops its
//! jobs; only then does the new one start, migrate and serve. A user
//! planning a deploy during trading hours asks how long checkout is
//! without holdfast, and whether a call caught by the restart is lost.
//!
//! The probe starts a daemon of its own (`serve --dev`, as the bench's),
//! drives claim-hot at `--rate` (1,000 a second when absent) from
//! `--clients` over `--connections` for [`BEFORE`] and then `--duration`
//! seconds: after [`BEFORE`] it sends the daemon SIGTERM, waits for it to
//! exit, and at once starts it again on the same ports and stores, as an
//! orchestrator would. It reads how long the old
//! one took to stop (`stop_ms`), how long the new one took from its start
//! to answering health SERVING (`start_ms`), and from the calls' timeline
//! (src/bench/load.rs, 100 ms slices) how long the shoppers were without
//! answers (`answered_again_ms`, from the SIGTERM), how many calls failed
//! and with what. A call that started before the SIGTERM and failed
//! (`failed_before`) would be one the shutdown dropped. The sale's sold
//! count, read at the end, must equal the claims its callers were told:
//! none is lost or sold twice across the restart.

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::failover::{Outage, slice_of};
use super::load::{Plan, SLICE};
use super::workloads::{self, Caller, Workload};
use super::{BenchArgs, Daemon, DaemonAuth, connections};

/// Claims served before the SIGTERM.
const BEFORE: Duration = Duration::from_secs(2);

/// The probe needs a daemon of its own, to stop and start.
pub fn check(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.addr.is_none(),
        "the restart probe stops and starts a daemon of its own; it cannot restart --addr"
    );
    Ok(())
}

/// Runs the probe and prints its `bench-probe: restart` line.
pub async fn run(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    check(args)?;
    let mut daemon = Daemon::start(args, dir, DaemonAuth::Dev, None)?;
    let channels = connections(&daemon.addr(), None, args.connections).await?;
    let caller = Caller::new(None);
    workloads::setup(Workload::ClaimHot, &channels[0], &caller).await?;
    let rate = args.rate.unwrap_or(super::failover::DEFAULT_RATE);
    let after = Duration::from_secs(args.duration);
    let plan = Plan {
        clients: args.clients,
        duration: BEFORE + after,
        rate: Some(rate),
        max_calls: None,
    };
    let started = Instant::now();
    let (run, restart) = tokio::join!(
        workloads::run(Workload::ClaimHot, &channels, &plan, &caller),
        restarted(args, dir, &mut daemon, started, after),
    );
    let Restart {
        term_at,
        stop,
        start,
    } = restart?;
    // Phases: before the SIGTERM, and from it to the run's last whole
    // slice (the "thaw" of a restart is the new daemon's answers).
    let o = Outage::read(
        &run.timeline,
        rate * SLICE.as_secs_f64(),
        slice_of(term_at),
        run.timeline.len().saturating_sub(1),
    );
    let claimed = run.outcomes.get("claimed").copied().unwrap_or(0);
    let sold = workloads::sold(&channels[0], &caller, Workload::ClaimHot).await?;
    let kept = if sold == claimed as i64 {
        "kept"
    } else {
        "BROKEN"
    };
    println!(
        "bench-probe: restart rate={rate:.0} stop_ms={} start_ms={} answered_again_ms={} failed_before={} failed_after={} worst_after_ms={} claimed={claimed} sold={sold} promises={kept} outcomes={}",
        stop.as_millis(),
        start.map_or("never".into(), |d| d.as_millis().to_string()),
        o.answered_again
            .map_or("never".into(), |d| d.as_millis().to_string()),
        o.failed[0],
        o.failed[1],
        o.worst_ms[1],
        run.outcomes_text(),
    );
    anyhow::ensure!(
        kept == "kept",
        "the sale sold {sold} but its callers were told of {claimed} claims"
    );
    Ok(())
}

/// When the restart happened and what it took.
struct Restart {
    /// From the run's start to the SIGTERM.
    term_at: Duration,
    /// From the SIGTERM to the old daemon's exit.
    stop: Duration,
    /// From the new daemon's start to health SERVING; `None` if it did
    /// not serve before the run ended.
    start: Option<Duration>,
}

/// After [`BEFORE`], stops `daemon` as an orchestrator does and starts it
/// again on the same ports, then waits for it to serve, for at most
/// `after` from the SIGTERM (when the claims end).
async fn restarted(
    args: &BenchArgs,
    dir: &std::path::Path,
    daemon: &mut Daemon,
    started: Instant,
    after: Duration,
) -> anyhow::Result<Restart> {
    tokio::time::sleep(BEFORE).await;
    let term_at = started.elapsed();
    let stop = daemon.terminate().await?;
    daemon.respawn(args, dir)?;
    let spawned = Instant::now();
    let left = after.saturating_sub(started.elapsed() - term_at);
    let start = serving(&daemon.addr(), left)
        .await
        .then(|| spawned.elapsed());
    Ok(Restart {
        term_at,
        stop,
        start,
    })
}

/// Polls the daemon at `addr` every 10 ms until its health check answers
/// SERVING; false if it did not within `within`.
async fn serving(addr: &str, within: Duration) -> bool {
    let until = Instant::now() + within;
    let Ok(endpoint) = Endpoint::from_shared(addr.to_string()) else {
        return false;
    };
    let endpoint = endpoint.connect_timeout(Duration::from_millis(100));
    while Instant::now() < until {
        if let Ok(ch) = endpoint.connect().await
            && answers_serving(ch).await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn answers_serving(ch: Channel) -> bool {
    let mut health = HealthClient::new(ch);
    let check = health.check(HealthCheckRequest {
        service: String::new(),
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

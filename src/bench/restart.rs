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
//! orchestrator would. It reads how long the old one took to stop
//! (`stop_ms`), how long the new one took from its start to answering
//! health SERVING (`start_ms`), and from the calls' timeline
//! (src/bench/load.rs, 100 ms slices) how long the shoppers were refused
//! (`answered_again_ms`, from the SIGTERM to the end of the last slice in
//! which a call failed), how many calls failed and with what. A call that
//! started before the SIGTERM and failed (`failed_before`) would be one
//! the shutdown dropped. The sale's sold count, read at the end, must
//! equal the claims its callers were told: none is lost or sold twice
//! across the restart.

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::failover::{Outage, slice_of};
use super::load::{Plan, SLICE, Slice};
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
    // Phases: before the SIGTERM, and from it to the end.
    let term = slice_of(term_at);
    let o = Outage::read(
        &run.timeline,
        rate * SLICE.as_secs_f64(),
        term,
        run.timeline.len(),
    );
    let again = answered_again(&run.timeline, term);
    let claimed = run.outcomes.get("claimed").copied().unwrap_or(0);
    let sold = workloads::sold(&channels[0], &caller, Workload::ClaimHot).await?;
    let kept = sold == claimed as i64;
    println!(
        "bench-probe: restart rate={rate:.0} stop_ms={} start_ms={} answered_again_ms={} failed_before={} failed_after={} worst_after_ms={} claimed={claimed} sold={sold} promises={} outcomes={}",
        stop.as_millis(),
        start.map_or("never".into(), |d| d.as_millis().to_string()),
        again.map_or("never".into(), |d| d.as_millis().to_string()),
        o.failed[0],
        o.failed[1],
        o.worst_ms[1],
        if kept { "kept" } else { "BROKEN" },
        run.outcomes_text(),
    );
    anyhow::ensure!(
        kept,
        "the sale sold {sold} but its callers were told of {claimed} claims"
    );
    Ok(())
}

/// From the SIGTERM (in slice `term`) to the end of the last slice in
/// which a call failed: how long the shoppers were refused. `None` when
/// calls still failed in the run's last slice (the new daemon never
/// served). The failover probe's measure (every slice answering 90 % of
/// the calls offered) is not used: at a set rate the calls started in a
/// slice vary by a tenth either way with the load generator's pacing,
/// which read as seconds of outage after a restart that refused calls
/// for a tenth of a second.
fn answered_again(timeline: &[Slice], term: usize) -> Option<Duration> {
    match timeline.iter().rposition(|s| s.failed > 0) {
        Some(last) if last + 1 == timeline.len() => None,
        Some(last) if last >= term => Some(SLICE * (last + 1 - term) as u32),
        _ => Some(Duration::ZERO),
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Slice, answered_again};

    fn slice(answered: u64, failed: u64) -> Slice {
        Slice {
            answered,
            failed,
            worst_us: 1_000,
        }
    }

    /// Refused from the SIGTERM's slice (2) to the end of slice 3; the
    /// short slice after (the pacing's jitter) is not an outage.
    #[test]
    fn the_shoppers_are_answered_again_after_the_last_refusal() {
        let timeline = [
            slice(100, 0),
            slice(100, 0),
            slice(70, 30),
            slice(90, 4),
            slice(85, 0),
            slice(100, 0),
        ];
        assert_eq!(
            answered_again(&timeline, 2),
            Some(Duration::from_millis(200))
        );
        let never_refused = [slice(100, 0), slice(100, 0)];
        assert_eq!(answered_again(&never_refused, 1), Some(Duration::ZERO));
        let never_back = [slice(100, 0), slice(0, 100), slice(0, 100)];
        assert_eq!(answered_again(&never_back, 1), None);
    }
}

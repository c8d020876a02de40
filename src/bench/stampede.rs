//! A stampede past what the machine serves: the question of a shop whose
//! flash sale draws more buyers at once than holdfast can answer within
//! their checkout's deadline. Every other run here keeps its crowd below
//! that point (64 clients by default); a real stampede does not, and a
//! buyer whose call timed out presses buy again.
//!
//! For each crowd of `--crowds`, a sale of its own is claimed by that many
//! clients for `--duration` seconds, each call carrying a deadline of
//! `--deadline-ms` ([`DEFAULT_DEADLINE_MS`] when absent) as `grpc-timeout`
//! and kept by the client too, as a generated stub does. A client whose
//! call ran past its deadline gives it up and calls again at once, with a
//! new claim id (a new press of the button, not a retry). Each crowd's
//! line: claims answered in time a second (`claimed_rps`), calls given up
//! a second, latency, each process's CPU per claim answered, the daemon's
//! peak memory, and what the sale counts sold beside what its callers were
//! told (`unanswered`: units sold to calls that had given up, which their
//! shop learns of only by retrying with the same id, and otherwise sells
//! to nobody until it reconciles). With `--probe fallback` too, every
//! crowd again with Redis frozen (`stampede-fallback` lines): a Redis
//! outage during a flash sale meets the same crowd with the slower store.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::Channel;

use super::cpu::Watched;
use super::fallback::Frozen;
use super::load::{Plan, Run, drive};
use super::report::ServerStats;
use super::workloads::{self, Caller, Workload};

/// Each call's deadline when `--deadline-ms` is absent: a checkout's
/// budget for one step of its own request.
pub const DEFAULT_DEADLINE_MS: u64 = 100;

/// The outcomes of a call given up: by the client (DEADLINE_EXCEEDED), or
/// by the daemon at the deadline the call carried (tonic answers
/// CANCELLED).
const GIVEN_UP: [&str; 2] = ["error:DeadlineExceeded", "error:Cancelled"];

/// What the probe needs beside the connections.
pub struct Setup<'a> {
    pub watched: &'a Watched,
    /// The daemon's process, when the bench started it.
    pub daemon: Option<u32>,
    pub crowds: &'a [usize],
    pub deadline: Duration,
    pub duration: Duration,
    /// Redis's process, to freeze for a second pass of every crowd
    /// through the Postgres fallback (with `--probe fallback` too): its
    /// knee is lower, since a fallback transaction is slower than a Redis
    /// call.
    pub fallback: Option<u32>,
}

/// What one crowd's run counted, its sale's sold count aside.
struct Crowd {
    crowd: usize,
    counted: Caller,
    run: Run,
    cpu: String,
    peak_kib: u64,
}

/// Runs the probe: one line per crowd, and one per crowd through the
/// fallback when asked.
pub async fn run(channels: &[Channel], caller: &Caller, setup: &Setup<'_>) -> anyhow::Result<()> {
    let mut crowds = Vec::new();
    for &crowd in setup.crowds {
        // A sale of its own, so that its sold count is this crowd's alone.
        let counted = caller.retagged();
        workloads::setup(Workload::ClaimHot, &channels[0], &counted).await?;
        crowds.push(press(channels, crowd, counted, setup).await);
    }
    report("stampede", channels, crowds, setup.deadline).await?;
    let Some(redis) = setup.fallback else {
        return Ok(());
    };
    // Sales made while Redis runs (the fallback sells what Postgres has
    // not granted it), one for the warm-up and one for each crowd.
    let mut counted = Vec::new();
    for _ in 0..=setup.crowds.len() {
        let c = caller.retagged();
        workloads::setup(Workload::ClaimHot, &channels[0], &c).await?;
        counted.push(c);
    }
    let warming = counted.remove(0);
    let mut crowds = Vec::new();
    {
        let _frozen = Frozen::stop(vec![redis])?;
        // The first calls wait out --redis-timeout-ms and open the circuit.
        let warm = Plan {
            clients: 64,
            duration: Duration::from_secs(3),
            rate: None,
            max_calls: None,
        };
        workloads::run(Workload::ClaimHot, channels, &warm, &warming).await;
        for (&crowd, c) in setup.crowds.iter().zip(counted) {
            crowds.push(press(channels, crowd, c, setup).await);
        }
    }
    // Read once Redis is back: every unit either store sold counts.
    report("stampede-fallback", channels, crowds, setup.deadline).await
}

/// `crowd` clients claiming `counted`'s claim-hot sale for the probe's
/// duration, each call given up at the deadline and pressed again.
async fn press(channels: &[Channel], crowd: usize, counted: Caller, setup: &Setup<'_>) -> Crowd {
    let pressing = counted.clone().with_deadline(setup.deadline);
    let plan = Plan {
        clients: crowd,
        duration: setup.duration,
        rate: None,
        max_calls: None,
    };
    if let Some(pid) = setup.daemon {
        ServerStats::reset_peak(pid);
    }
    let cpu_before = setup.watched.sample();
    let deadline = setup.deadline;
    let run = drive(channels, &plan, move |ch, n| {
        let c = pressing.clone();
        async move {
            let claim = workloads::claim(Workload::ClaimHot, ch, n, &c);
            match tokio::time::timeout(deadline, claim).await {
                Ok(answer) => answer,
                Err(_) => Err(tonic::Status::deadline_exceeded("given up by the client")),
            }
        }
    })
    .await;
    let claimed = run.outcomes.get("claimed").copied().unwrap_or(0);
    let cpu = cpu_before.per_op(&setup.watched.sample(), claimed);
    let peak_kib = setup
        .daemon
        .and_then(|pid| ServerStats::read(pid).ok())
        .map_or(0, |s| s.peak_rss_kib);
    // Calls given up may still be finishing in the daemon: what they sell
    // counts too, and the next crowd starts without them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Crowd {
        crowd,
        counted,
        run,
        cpu,
        peak_kib,
    }
}

/// Prints a `probe: <name>` line per crowd, with what its sale counts
/// sold beside what its callers were told.
async fn report(
    name: &str,
    channels: &[Channel],
    crowds: Vec<Crowd>,
    deadline: Duration,
) -> anyhow::Result<()> {
    for Crowd {
        crowd,
        counted,
        run,
        cpu,
        peak_kib,
    } in crowds
    {
        let sold = workloads::sold(&channels[0], &counted, Workload::ClaimHot).await?;
        let claimed = run.outcomes.get("claimed").copied().unwrap_or(0);
        let given_up: u64 = GIVEN_UP.iter().filter_map(|k| run.outcomes.get(*k)).sum();
        let secs = run.elapsed.as_secs_f64();
        println!(
            "probe: {name} crowd={crowd} deadline_ms={} calls={} claimed_rps={:.0} given_up_per_s={:.0} other_errors={} p50_ms={:.2} p99_ms={:.2} sold={sold} claimed={claimed} unanswered={} daemon_peak_rss_mib={:.1} cpu_us_per_claim={cpu}",
            deadline.as_millis(),
            run.calls,
            claimed as f64 / secs,
            given_up as f64 / secs,
            errors_but(&run.outcomes, &GIVEN_UP),
            run.ms(0.5),
            run.ms(0.99),
            sold - claimed as i64,
            peak_kib as f64 / 1024.0,
        );
    }
    Ok(())
}

/// A run's errors by code but those named in `but` (`error:<Code>`), as
/// `Code:n,...`, or `0` when there are none.
pub fn errors_but(outcomes: &BTreeMap<String, u64>, but: &[&str]) -> String {
    let errors: Vec<String> = outcomes
        .iter()
        .filter(|(k, _)| k.starts_with("error:") && !but.contains(&k.as_str()))
        .map(|(k, n)| format!("{}:{n}", &k["error:".len()..]))
        .collect();
    match errors.as_slice() {
        [] => "0".to_string(),
        some => some.join(","),
    }
}

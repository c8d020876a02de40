//! The load driver: N concurrent clients over C HTTP/2 connections, each
//! calling one operation in a loop until the time is up, recording every
//! call's latency in an HDR histogram and its outcome by name.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::transport::Channel;

/// What one call came to: an outcome name ("claimed", "sold_out",
/// "error:UNAVAILABLE"...) and the units it moved.
pub struct Done {
    pub outcome: &'static str,
    pub units: u64,
}

impl Done {
    pub fn ok(outcome: &'static str, units: u64) -> Self {
        Self { outcome, units }
    }
}

/// What a run measured.
pub struct Run {
    pub elapsed: Duration,
    pub calls: u64,
    pub units: u64,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    pub outcomes: BTreeMap<String, u64>,
    /// The calls by when they started, one [`Slice`] per [`SLICE`] of the
    /// run: what a fault did, and when (src/bench/failover.rs).
    pub timeline: Vec<Slice>,
}

/// The width of one [`Slice`] of a run's timeline.
pub const SLICE: Duration = Duration::from_millis(100);

/// The calls that started within one [`SLICE`] of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slice {
    /// Answered without a gRPC error.
    pub answered: u64,
    /// Answered with a gRPC error.
    pub failed: u64,
    /// The slowest of them, microseconds.
    pub worst_us: u64,
}

impl Slice {
    fn record(timeline: &mut Vec<Slice>, at: Duration, latency_us: u64, failed: bool) {
        let i = (at.as_nanos() / SLICE.as_nanos()) as usize;
        if timeline.len() <= i {
            timeline.resize(i + 1, Slice::default());
        }
        let s = &mut timeline[i];
        if failed {
            s.failed += 1;
        } else {
            s.answered += 1;
        }
        s.worst_us = s.worst_us.max(latency_us);
    }

    fn merge(into: &mut Vec<Slice>, from: &[Slice]) {
        if into.len() < from.len() {
            into.resize(from.len(), Slice::default());
        }
        for (a, b) in into.iter_mut().zip(from) {
            a.answered += b.answered;
            a.failed += b.failed;
            a.worst_us = a.worst_us.max(b.worst_us);
        }
    }
}

impl Run {
    /// Calls per second.
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// Calls answered without an error, per second: what a run through a
    /// fault delivered (`rate` counts a refusal as fast as a sale).
    pub fn answered_rate(&self) -> f64 {
        (self.calls - self.errors()) as f64 / self.elapsed.as_secs_f64()
    }

    /// Calls answered with a gRPC error.
    pub fn errors(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(outcome, _)| outcome.starts_with("error:"))
            .map(|(_, n)| n)
            .sum()
    }

    /// The outcomes as the probes print them: `claimed:7024,error:Unavailable:32`.
    pub fn outcomes_text(&self) -> String {
        let each: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        each.join(",")
    }

    /// Latency at quantile `q`, milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// How to drive: clients, for how long (or how many calls, whichever
/// ends first), and optionally at what total rate (calls per second)
/// instead of as fast as possible.
#[derive(Clone)]
pub struct Plan {
    pub clients: usize,
    pub duration: Duration,
    pub rate: Option<f64>,
    pub max_calls: Option<u64>,
}

/// How long one call may take before it counts as failed
/// (`DEADLINE_EXCEEDED`), so that a daemon that stops answering ends the run
/// on time instead of holding it forever. Far above any answer a working
/// daemon gives, even through a store's outage (the probes freeze one for
/// `--duration` seconds, and its calls wait for a timeout of 5 s at most).
const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// Call numbers, unique across every run of the process: warm-ups, runs and
/// workloads never repeat an id (a repeat would be an idempotent replay, or
/// a refusal, not the operation being measured).
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Runs `op(channel, n)` (n: a number unique to the call, for ids) from
/// `plan.clients` tasks spread over `channels` until the time is up.
pub async fn drive<F, Fut>(channels: &[Channel], plan: &Plan, op: F) -> Run
where
    F: Fn(Channel, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Done, tonic::Status>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = &NEXT;
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + plan.duration;
    let mut tasks = Vec::with_capacity(plan.clients);
    for c in 0..plan.clients {
        let channel = channels[c % channels.len()].clone();
        let op = op.clone();
        let max_calls = plan.max_calls;
        let issued = issued.clone();
        let share = c as f64 / plan.clients as f64;
        let pace = plan
            .rate
            .map(|r| Duration::from_secs_f64(plan.clients as f64 / r.max(1.0)));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
            let mut timeline = Vec::new();
            let (mut calls, mut units) = (0u64, 0u64);
            // Each client's ticks are offset by its share of the period, so
            // calls arrive spread evenly, as from independent shoppers. With
            // every client on the same phase they came in bursts of
            // `clients` at once, and a burst's last call waited for the
            // whole burst: that measured the burst, not the load. A client
            // whose call outlasted its period calls again at once, then
            // keeps to its own phase (`Skip`): with `Delay` it took the
            // phase of the moment its call returned, and every client a
            // Redis freeze released at once went on in step, in bursts
            // (deploy/BENCHMARKS.md, "the failover probe").
            let mut ticker = pace.map(|p| {
                let first = tokio::time::Instant::now() + p.mul_f64(share);
                let mut t = tokio::time::interval_at(first, p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                t
            });
            while Instant::now() < deadline {
                // A paced call's clock starts at its tick, not when it is
                // sent: a call held up by the one before it waited as a
                // shopper would have (until 2026-12-05 it counted from the
                // send, and a stall was one slow call, whatever it held
                // up). With `Skip`, the first tick after a stall is the
                // missed one, so its wait is counted; the ticks skipped
                // after it are not sent, and not counted either. (The
                // histogram's `record_correct` on top, tried the same
                // night, counted a stall's calls about twice: the slow
                // call's and the late one's synthetic samples cover the
                // same skipped ticks.)
                let t0 = match ticker.as_mut() {
                    Some(t) => t.tick().await.into_std(),
                    None => Instant::now(),
                };
                if max_calls.is_some_and(|m| issued.fetch_add(1, Ordering::Relaxed) >= m) {
                    break;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let result = match tokio::time::timeout(CALL_DEADLINE, op(channel.clone(), n)).await
                {
                    Ok(result) => result,
                    Err(_) => Err(tonic::Status::deadline_exceeded(
                        "no answer within the bench's deadline",
                    )),
                };
                let us = t0.elapsed().as_micros().max(1) as u64;
                let _ = hist.record(us);
                Slice::record(&mut timeline, t0 - started, us, result.is_err());
                calls += 1;
                let name = match result {
                    Ok(done) => {
                        units += done.units;
                        done.outcome.to_string()
                    }
                    Err(status) => format!("error:{:?}", status.code()),
                };
                *outcomes.entry(name).or_default() += 1;
            }
            (hist, outcomes, timeline, calls, units)
        }));
    }
    let mut run = Run {
        elapsed: Duration::ZERO,
        calls: 0,
        units: 0,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        outcomes: BTreeMap::new(),
        timeline: Vec::new(),
    };
    for t in tasks {
        let Ok((hist, outcomes, timeline, calls, units)) = t.await else {
            continue;
        };
        let _ = run.latency.add(&hist);
        Slice::merge(&mut run.timeline, &timeline);
        for (k, v) in outcomes {
            *run.outcomes.entry(k).or_default() += v;
        }
        run.calls += calls;
        run.units += units;
    }
    run.elapsed = started.elapsed();
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_through_a_fault_counts_only_what_was_answered() {
        let run = Run {
            elapsed: Duration::from_secs(2),
            calls: 100,
            units: 30,
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            outcomes: BTreeMap::from([
                ("claimed".to_string(), 30),
                ("sold_out".to_string(), 10),
                ("error:Unavailable".to_string(), 60),
            ]),
            timeline: Vec::new(),
        };
        assert_eq!(run.rate(), 50.0);
        assert_eq!(run.answered_rate(), 20.0);
    }

    #[test]
    fn calls_are_laid_out_by_when_they_started() {
        let mut a = Vec::new();
        Slice::record(&mut a, Duration::from_millis(30), 500, false);
        Slice::record(&mut a, Duration::from_millis(250), 1_200_000, true);
        Slice::record(&mut a, Duration::from_millis(299), 40, false);
        let mut b = Vec::new();
        Slice::record(&mut b, Duration::from_millis(99), 700, false);
        Slice::merge(&mut b, &a);
        assert_eq!(
            b,
            vec![
                Slice {
                    answered: 2,
                    failed: 0,
                    worst_us: 700
                },
                Slice::default(),
                Slice {
                    answered: 1,
                    failed: 1,
                    worst_us: 1_200_000
                },
            ]
        );
    }
}

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
}

impl Run {
    /// Calls per second.
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// Calls answered without an error, per second: what a run through a
    /// fault delivered (`rate` counts a refusal as fast as a sale).
    pub fn answered_rate(&self) -> f64 {
        let errors: u64 = self
            .outcomes
            .iter()
            .filter(|(outcome, _)| outcome.starts_with("error:"))
            .map(|(_, n)| n)
            .sum();
        (self.calls - errors) as f64 / self.elapsed.as_secs_f64()
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
            let (mut calls, mut units) = (0u64, 0u64);
            // Each client's ticks are offset by its share of the period, so
            // calls arrive spread evenly, as from independent shoppers. With
            // every client on the same phase they came in bursts of
            // `clients` at once, and a burst's last call waited for the
            // whole burst: that measured the burst, not the load.
            let mut ticker = pace.map(|p| {
                let first = tokio::time::Instant::now() + p.mul_f64(share);
                let mut t = tokio::time::interval_at(first, p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while Instant::now() < deadline {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                if max_calls.is_some_and(|m| issued.fetch_add(1, Ordering::Relaxed) >= m) {
                    break;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                let result = op(channel.clone(), n).await;
                let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
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
            (hist, outcomes, calls, units)
        }));
    }
    let mut run = Run {
        elapsed: Duration::ZERO,
        calls: 0,
        units: 0,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        outcomes: BTreeMap::new(),
    };
    for t in tasks {
        let Ok((hist, outcomes, calls, units)) = t.await else {
            continue;
        };
        let _ = run.latency.add(&hist);
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
        };
        assert_eq!(run.rate(), 50.0);
        assert_eq!(run.answered_rate(), 20.0);
    }
}

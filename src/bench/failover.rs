//! A Redis outage in the middle of a sale, as the shoppers see it: claims
//! at a steady rate, Redis frozen with SIGSTOP for `--duration` seconds,
//! then thawed. The fallback probe measures how fast the fallback serves
//! once it does; this one measures the switches a user planning for an
//! outage asks about next: how many calls fail while the daemon notices,
//! how long until every call is answered again, and how long after Redis
//! returns until it serves again.
//!
//! Calls are laid out by when they started (`Run::timeline`, 100 ms
//! slices), so the switch is read to within a slice. A call that started
//! in a slice ends wherever it ends: a claim caught by the freeze waits out
//! `--redis-timeout-ms` (1 s by default) and fails in its start's slice.

use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::fallback::{Frozen, loopback_redis_pid};
use super::load::{Plan, SLICE, Slice};
use super::probes::scrape;
use super::workloads::{self, Caller, Workload};

/// Redis serving before the freeze.
const BEFORE: Duration = Duration::from_secs(2);
/// Redis serving again after the thaw.
const AFTER: Duration = Duration::from_secs(3);
/// The rate when `--rate` names none: a busy sale, well within what either
/// path serves on this machine (the fallback's claim-hot: 4-5k/s).
pub const DEFAULT_RATE: f64 = 1_000.0;
/// A slice counts as served when this share of the calls offered in it
/// were answered without an error.
const SERVED: f64 = 0.9;

/// What the failover probe needs from the bench's arguments.
pub struct Setup<'a> {
    pub redis_url: &'a str,
    /// The daemon's /metrics address, when the bench started it: the
    /// circuit's state is read there.
    pub metrics: Option<&'a str>,
    pub clients: usize,
    pub rate: f64,
    pub outage: Duration,
}

/// Drives claim-hot at `s.rate` through a freeze and a thaw of Redis and
/// prints one `bench-probe: failover ...` line.
pub async fn run(channels: &[Channel], c: &Caller, s: &Setup<'_>) -> anyhow::Result<()> {
    let pid = loopback_redis_pid(s.redis_url).await?;
    let plan = Plan {
        clients: s.clients,
        duration: BEFORE + s.outage + AFTER,
        rate: Some(s.rate),
        max_calls: None,
    };
    let faults = async {
        tokio::time::sleep(BEFORE).await;
        let frozen = Frozen::stop(pid)?;
        tokio::time::sleep(s.outage).await;
        drop(frozen);
        let thawed = Instant::now();
        anyhow::Ok(match s.metrics {
            Some(m) => circuit_closed(m, AFTER).await.then(|| thawed.elapsed()),
            None => None,
        })
    };
    let (run, closed) = tokio::join!(
        workloads::run(Workload::ClaimHot, channels, &plan, c),
        faults
    );
    let closed = closed?;
    let freeze = slice_of(BEFORE);
    let thaw = slice_of(BEFORE + s.outage);
    let offered = s.rate * SLICE.as_secs_f64();
    let o = Outage::read(&run.timeline, offered, freeze, thaw);
    let ms = |d: Option<Duration>| d.map_or("never".to_string(), |d| d.as_millis().to_string());
    println!(
        "bench-probe: failover rate={:.0} outage_s={} failed_before={} failed_during={} answered_again_ms={} worst_during_ms={} circuit_closed_after_thaw_ms={} failed_after={} worst_after_ms={} outcomes={}",
        s.rate,
        s.outage.as_secs(),
        o.failed[0],
        o.failed[1],
        ms(o.answered_again),
        o.worst_ms[1],
        ms(closed),
        o.failed[2],
        o.worst_ms[2],
        run.outcomes
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(","),
    );
    Ok(())
}

fn slice_of(at: Duration) -> usize {
    (at.as_nanos() / SLICE.as_nanos()) as usize
}

/// Polls the daemon's circuit gauge until it reads closed; false if it
/// did not within `within`.
async fn circuit_closed(metrics: &str, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        let body = scrape(metrics).await;
        let open = body
            .lines()
            .find_map(|l| l.strip_prefix("holdfast_redis_circuit_open "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if open == Some(0.0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// What a timeline says about an outage from slice `freeze` to slice
/// `thaw`: three phases, before, during and after.
#[derive(Debug, PartialEq)]
struct Outage {
    /// Calls that failed in each phase.
    failed: [u64; 3],
    /// The slowest call of each phase, milliseconds.
    worst_ms: [u64; 3],
    /// From the freeze to the first slice from which, until the thaw,
    /// every slice was served (none failed, and at least [`SERVED`] of the
    /// calls offered were answered); `None` if that never came.
    answered_again: Option<Duration>,
}

impl Outage {
    fn read(timeline: &[Slice], offered: f64, freeze: usize, thaw: usize) -> Self {
        let phase = |i: usize| usize::from(i >= freeze) + usize::from(i >= thaw);
        let mut failed = [0; 3];
        let mut worst_us = [0; 3];
        for (i, s) in timeline.iter().enumerate() {
            failed[phase(i)] += s.failed;
            worst_us[phase(i)] = worst_us[phase(i)].max(s.worst_us);
        }
        let served = |s: &Slice| s.failed == 0 && s.answered as f64 >= SERVED * offered;
        let during = timeline
            .get(freeze..thaw.min(timeline.len()))
            .unwrap_or(&[]);
        let served_tail = during.iter().rev().take_while(|s| served(s)).count();
        let answered_again = (served_tail > 0 && during.len() == thaw - freeze)
            .then(|| SLICE * (during.len() - served_tail) as u32);
        Self {
            failed,
            worst_ms: worst_us.map(|us| us / 1000),
            answered_again,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(answered: u64, failed: u64, worst_us: u64) -> Slice {
        Slice {
            answered,
            failed,
            worst_us,
        }
    }

    #[test]
    fn an_outage_is_read_from_when_calls_failed_and_were_answered_again() {
        // 100 calls offered a slice; the freeze at slice 2, the thaw at 7.
        let timeline = [
            slice(100, 0, 3_000),
            slice(100, 0, 4_000),
            slice(20, 64, 1_001_000), // caught by the freeze
            slice(95, 0, 60_000),     // served, then a slow one
            slice(50, 0, 9_000),      // half answered: not yet
            slice(98, 0, 8_000),
            slice(100, 0, 7_000),
            slice(100, 1, 2_000), // after the thaw
            slice(100, 0, 1_000),
        ];
        let o = Outage::read(&timeline, 100.0, 2, 7);
        assert_eq!(o.failed, [0, 64, 1]);
        assert_eq!(o.worst_ms, [4, 1_001, 2]);
        assert_eq!(o.answered_again, Some(Duration::from_millis(300)));
    }

    #[test]
    fn an_outage_never_served_says_so() {
        let failing = [slice(100, 0, 1), slice(0, 64, 1_000_000), slice(90, 1, 1)];
        assert_eq!(Outage::read(&failing, 100.0, 1, 3).answered_again, None);
        // A run that ended before the thaw proves nothing either.
        let short = [slice(100, 0, 1), slice(100, 0, 1)];
        assert_eq!(Outage::read(&short, 100.0, 1, 3).answered_again, None);
    }
}

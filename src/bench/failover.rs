//! An outage of either store in the middle of a sale, as the shoppers see
//! it: claims at a steady rate, Redis (`failover`) or Postgres
//! (`pg-outage`) frozen with SIGSTOP for `--duration` seconds, then
//! thawed. The fallback probe measures how fast the fallback serves once
//! it does; this one measures what a user planning for an outage asks
//! next: how many calls fail while the daemon notices, how long until
//! every call is answered again, and how long after the store returns
//! until the daemon is back to normal (Redis serving again; the drainer
//! caught up with what Redis sold meanwhile).
//!
//! Calls are laid out by when they started (`Run::timeline`, 100 ms
//! slices), so the switch is read to within a slice. A call that started
//! in a slice ends wherever it ends: a claim caught by the freeze waits out
//! `--redis-timeout-ms` (1 s by default) and fails in its start's slice.

use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::cpu;
use super::fallback::{Frozen, loopback_redis_pid};
use super::load::{Plan, SLICE, Slice};
use super::probes::{gauge, scrape};
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

/// The store an outage stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Redis,
    Postgres,
}

/// The drainer has caught up once it writes events younger than this.
const CAUGHT_UP_SECS: f64 = 0.5;

/// What the outage probes need from the bench's arguments.
pub struct Setup<'a> {
    pub store: Store,
    pub redis_url: &'a str,
    pub database_url: &'a str,
    /// The daemon's /metrics address, when the bench started it: the
    /// circuit's state and the drainer's lag are read there.
    pub metrics: Option<&'a str>,
    pub clients: usize,
    pub rate: f64,
    pub outage: Duration,
}

/// Drives claim-hot at `s.rate` through a freeze and a thaw of `s.store`
/// and prints one `bench-probe: failover ...` (Redis) or `bench-probe:
/// pg-outage ...` line.
pub async fn run(channels: &[Channel], c: &Caller, s: &Setup<'_>) -> anyhow::Result<()> {
    let redis = match s.store {
        Store::Redis => Some(loopback_redis_pid(s.redis_url).await?),
        Store::Postgres => None,
    };
    let plan = Plan {
        clients: s.clients,
        duration: BEFORE + s.outage + AFTER,
        rate: Some(s.rate),
        max_calls: None,
    };
    let faults = async {
        tokio::time::sleep(BEFORE).await;
        // Postgres's processes as they are now: backends come and go.
        let pids = match redis {
            Some(pid) => vec![pid],
            None => postgres_pids(s.database_url).await?,
        };
        let frozen = Frozen::stop(pids)?;
        tokio::time::sleep(s.outage).await;
        drop(frozen);
        let thawed = Instant::now();
        let normal = match (s.metrics, s.store) {
            (Some(m), Store::Redis) => circuit_closed(m, AFTER).await,
            (Some(m), Store::Postgres) => drained(m, AFTER).await,
            (None, _) => false,
        };
        anyhow::Ok(normal.then(|| thawed.elapsed()))
    };
    let (run, recovered) = tokio::join!(
        workloads::run(Workload::ClaimHot, channels, &plan, c),
        faults
    );
    let recovered = match (recovered?, s.metrics) {
        (_, None) => "unmeasured".to_string(),
        (None, Some(_)) => "never".to_string(),
        (Some(d), Some(_)) => d.as_millis().to_string(),
    };
    let freeze = slice_of(BEFORE);
    let thaw = slice_of(BEFORE + s.outage);
    let offered = s.rate * SLICE.as_secs_f64();
    let o = Outage::read(&run.timeline, offered, freeze, thaw);
    let ms = |d: Option<Duration>| d.map_or("never".to_string(), |d| d.as_millis().to_string());
    let (probe, normal) = match s.store {
        Store::Redis => ("failover", "circuit_closed"),
        Store::Postgres => ("pg-outage", "drained"),
    };
    println!(
        "bench-probe: {probe} rate={:.0} outage_s={} failed_before={} failed_during={} answered_again_ms={} worst_during_ms={} {normal}_after_thaw_ms={} failed_after={} worst_after_ms={} outcomes={}",
        s.rate,
        s.outage.as_secs(),
        o.failed[0],
        o.failed[1],
        ms(o.answered_again),
        o.worst_ms[1],
        recovered,
        o.failed[2],
        o.worst_ms[2],
        run.outcomes_text(),
    );
    Ok(())
}

/// The postmaster, then its children (backends and workers): the whole
/// server stops, and the stopped postmaster starts no new backend.
async fn postgres_pids(database_url: &str) -> anyhow::Result<Vec<u32>> {
    let postmaster = cpu::postmaster_pid(database_url)
        .await
        .filter(|p| cpu::is_local(*p))
        .ok_or_else(|| {
            anyhow::anyhow!("the pg-outage probe freezes Postgres with SIGSTOP, so Postgres must run on this machine")
        })?;
    let mut pids = vec![postmaster];
    pids.extend(cpu::children_of(postmaster));
    Ok(pids)
}

/// The timeline's slice in which a call started at `at` falls.
pub(super) fn slice_of(at: Duration) -> usize {
    (at.as_nanos() / SLICE.as_nanos()) as usize
}

/// Polls the daemon's circuit gauge until it reads closed; false if it
/// did not within `within`.
async fn circuit_closed(metrics: &str, within: Duration) -> bool {
    poll(metrics, within, "holdfast_redis_circuit_open", |open| {
        open == 0.0
    })
    .await
}

/// Polls the drainer's lag (the age of the newest event it wrote) until it
/// has written the events Redis kept while Postgres was away (the lag
/// rises past [`CAUGHT_UP_SECS`]: the first write after the thaw is of
/// events from the start of the outage) and then events younger than
/// that; false if not within `within`.
async fn drained(metrics: &str, within: Duration) -> bool {
    let gauge = "holdfast_drainer_lag_seconds";
    let until = Instant::now() + within;
    poll(metrics, within, gauge, |lag| lag > CAUGHT_UP_SECS).await
        && poll(
            metrics,
            until.saturating_duration_since(Instant::now()),
            gauge,
            |lag| lag < CAUGHT_UP_SECS,
        )
        .await
}

/// Polls the daemon's gauge `name` every 10 ms until `done` holds for its
/// value; false if it did not within `within`.
async fn poll(metrics: &str, within: Duration, name: &str, done: impl Fn(f64) -> bool) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        let value = gauge(&scrape(metrics).await, name);
        if value.is_some_and(&done) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// What a timeline says about an outage from slice `freeze` to slice
/// `thaw`: three phases, before, during and after.
#[derive(Debug, PartialEq)]
pub(super) struct Outage {
    /// Calls that failed in each phase.
    pub failed: [u64; 3],
    /// The slowest call of each phase, milliseconds.
    pub worst_ms: [u64; 3],
    /// From the freeze to the first slice from which, until the thaw,
    /// every slice was served (none failed, and at least [`SERVED`] of the
    /// calls offered were answered); `None` if that never came.
    answered_again: Option<Duration>,
}

impl Outage {
    pub fn read(timeline: &[Slice], offered: f64, freeze: usize, thaw: usize) -> Self {
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

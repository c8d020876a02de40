//! The expiry probe: `--holds` single-line holds that all expire in the
//! same second, and claims on another product while they do. It answers
//! the question (is every hold finalised within a second, and do
//! claims keep 80% of their rate in the second the holds come due, and
//! over the three seconds around it?) and says what the burst cost: each
//! process's share of the machine before and during it, and Redis's time
//! per expired hold by command, so that a change to the sweep shows where
//! its gain came from (deploy/BENCHMARKS.md, "mass expiry").

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::transport::Channel;

use super::cpu::Watched;
use super::load::{Plan, SLICE, Slice};
use super::probes::{make_holds, scrape, stock};
use super::redis_time::Snapshot;
use super::workloads::{self, Caller, Workload};

/// What the probe needs from the bench.
pub struct Setup<'a> {
    pub redis_url: &'a str,
    /// The daemon's /metrics address, for the sweeper-lag histogram.
    pub metrics: Option<&'a str>,
    pub watched: &'a Watched,
    pub clients: usize,
    pub holds: u64,
}

/// How long claims run before the burst, and across it.
const WINDOW: Duration = Duration::from_secs(3);

/// Runs the probe and prints its two `bench-probe:` lines.
pub async fn run(channels: &[Channel], c: &Caller, s: &Setup<'_>) -> anyhow::Result<()> {
    let mut con = redis::Client::open(s.redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let product = format!("exp{}", c.tag);
    stock(&channels[0], c, &product, s.holds as i64 * 2).await?;
    // Every hold expires at the same wall-clock second, however long
    // making them takes (at most 60 s from now).
    let target = SystemTime::now() + Duration::from_secs(60);
    let made = make_holds(
        channels,
        c,
        &product,
        &format!("x{}n", c.tag),
        s.holds,
        s.clients,
        move || {
            target
                .duration_since(SystemTime::now())
                .map_or(1_000, |d| d.as_millis().max(1_000) as u64)
        },
    )
    .await;
    let claims = Plan {
        clients: s.clients,
        duration: WINDOW,
        rate: None,
        max_calls: None,
    };
    let cpu_before = s.watched.sample();
    let started = Instant::now();
    let normal = workloads::run(Workload::ClaimHot, channels, &claims, c).await;
    let share_normal = cpu_before.share(&s.watched.sample(), started.elapsed());
    let wait = target
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(Duration::from_millis(500));
    let lag_before = match s.metrics {
        Some(m) => sweeper_buckets(m).await,
        None => Vec::new(),
    };
    tokio::time::sleep(wait).await;
    let redis_before = Snapshot::read(&mut con).await;
    let due_ms = target
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let ended = tokio::spawn(watch_ends(con.clone(), due_ms));
    let cpu_before = s.watched.sample();
    let started = Instant::now();
    let burst_at = target.duration_since(SystemTime::now()).unwrap_or_default();
    let during = workloads::run(Workload::ClaimHot, channels, &claims, c).await;
    let slices = burst_second(&during.timeline, burst_at);
    let in_burst = slices.iter().sum::<u64>() as f64;
    let share_during = cpu_before.share(&s.watched.sample(), started.elapsed());
    let redis_after = Snapshot::read(&mut con).await;
    let (units_back, states_written) = ended.await?;
    // Only this probe's holds: those due by the target second (the memory
    // probe's, if it ran, are due ten minutes later).
    let left = crate::store::redis::overdue_holds(
        &mut con,
        "hf:{dev}:",
        due_ms + 1_000,
        &format!("x{}n", c.tag),
    )
    .await?;
    let lag_after = match s.metrics {
        Some(m) => sweeper_buckets(m).await,
        None => Vec::new(),
    };
    let bound = |q: f64| {
        quantile_between(&lag_before, &lag_after, q)
            .map_or("unknown".to_string(), |s| format!("<={s}"))
    };
    println!(
        "bench-probe: expiry holds={made} units_back_after_ms={} states_written_after_ms={} sweeper_lag_p99_s={} sweeper_lag_max_s={} still_active_after={left} claim_rate_before={:.0} claim_rate_during={:.0} ratio={:.2} claim_rate_burst_second={in_burst:.0} ratio_burst_second={:.2} burst_second_claims_per_100ms={}",
        after_ms(units_back),
        after_ms(states_written),
        bound(0.99),
        bound(1.0),
        normal.rate(),
        during.rate(),
        during.rate() / normal.rate(),
        in_burst / normal.rate(),
        slices
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let redis = match (redis_before, redis_after) {
        (Some(b), Some(a)) => b.per_op(&a, made),
        _ => "unknown".to_string(),
    };
    println!(
        "bench-probe: expiry-cost cpu_pct_before={share_normal} cpu_pct_during={share_during} redis_us_per_expired_hold(with_the_claims)={redis}"
    );
    Ok(())
}

/// How long after the holds' expiry (`due_ms`, on this machine's clock,
/// which Redis's follows) every unit of theirs was back, and every state
/// of theirs was EXPIRED: the first when the first expiry bucket not given
/// back yet (`xsums`, lua/lib.lua) starts after the second they expire in,
/// the second when the first bucket of the expiry index does. Polled every
/// 10 ms for at most [`ENDS_WITHIN`]; `None` for what did not happen by
/// then.
async fn watch_ends(
    con: redis::aio::MultiplexedConnection,
    due_ms: i64,
) -> (Option<Duration>, Option<Duration>) {
    // The first ms of the first bucket of `key` other than `mark`'s.
    let first = |key: &'static str, mark: &'static str| {
        let mut con = con.clone();
        async move {
            let r: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(format!("hf:{{dev}}:{key}"))
                .arg(0)
                .arg(1)
                .arg("WITHSCORES")
                .query_async(&mut con)
                .await
                .unwrap_or_default();
            r.into_iter()
                .find(|(m, _)| m != mark)
                .map_or(i64::MAX, |(_, from)| from as i64)
        }
    };
    let since_due = || {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Duration::from_millis(now_ms.saturating_sub(due_ms).max(0) as u64)
    };
    let after = due_ms + 1_000;
    let (mut units, mut states) = (None, None);
    let start = Instant::now();
    while start.elapsed() < ENDS_WITHIN && states.is_none() {
        if units.is_none() && first("xsums", "^").await > after {
            units = Some(since_due());
        }
        if units.is_some() && first("xdue", "").await > after {
            states = Some(since_due());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (units, states)
}

/// How long [`watch_ends`] waits for the burst's ends.
const ENDS_WITHIN: Duration = Duration::from_secs(40);

fn after_ms(d: Option<Duration>) -> String {
    d.map_or("unknown".into(), |d| d.as_millis().to_string())
}

/// The calls that started in each 100 ms slice of the second after
/// `burst_at` (from the run's start), when the holds come due and must all
/// be finalised: the run's whole window would dilute the burst with the
/// quiet seconds around it. Their sum is the burst second's rate.
fn burst_second(timeline: &[Slice], burst_at: Duration) -> Vec<u64> {
    let first = (burst_at.as_nanos() / SLICE.as_nanos()) as usize;
    let slices = (Duration::from_secs(1).as_nanos() / SLICE.as_nanos()) as usize;
    timeline
        .iter()
        .skip(first)
        .take(slices)
        .map(|s| s.answered + s.failed)
        .collect()
}

/// The sweeper-lag histogram's cumulative buckets from the daemon's
/// /metrics: (upper bound in seconds, count).
async fn sweeper_buckets(metrics: &str) -> Vec<(f64, f64)> {
    scrape(metrics)
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("holdfast_sweeper_lag_seconds_bucket{le=\""))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound at or below which the fraction `q` of the
/// observations between two scrapes fall (`q` = 1.0: all of them, so
/// the bound on the slowest).
fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - was)
        })
        .collect();
    let total = delta.last()?.1;
    (total > 0.0).then(|| {
        delta
            .iter()
            .find(|(_, n)| *n >= q * total)
            .map(|(le, _)| *le)
    })?
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Slice, burst_second, quantile_between};

    #[test]
    fn the_burst_second_counts_the_ten_slices_from_the_burst_on() {
        let slice = |n| Slice {
            answered: n,
            failed: 1,
            worst_us: 0,
        };
        // 100 ms slices: five before the burst, ten in its second, two after.
        let timeline: Vec<Slice> = (0..17)
            .map(|i| slice(if (5..15).contains(&i) { 9 } else { 99 }))
            .collect();
        assert_eq!(
            burst_second(&timeline, Duration::from_millis(520)),
            vec![10; 10]
        );
        // A run that ended early: the slices it has.
        assert_eq!(
            burst_second(&timeline[..8], Duration::from_millis(500)),
            vec![10; 3]
        );
    }

    #[test]
    fn a_quantile_is_the_first_bucket_that_holds_that_share_of_the_new_observations() {
        // Cumulative buckets: 10 old observations under 0.5 s; then 100
        // new ones, 98 under 0.5 s, one under 1 s, one under 2.5 s.
        let before = [(0.5, 10.0), (1.0, 10.0), (2.5, 10.0), (f64::INFINITY, 10.0)];
        let after = [
            (0.5, 108.0),
            (1.0, 109.0),
            (2.5, 110.0),
            (f64::INFINITY, 110.0),
        ];
        assert_eq!(quantile_between(&before, &after, 0.5), Some(0.5));
        assert_eq!(quantile_between(&before, &after, 0.99), Some(1.0));
        assert_eq!(quantile_between(&before, &after, 1.0), Some(2.5));
        assert_eq!(quantile_between(&after, &after, 0.99), None);
    }
}

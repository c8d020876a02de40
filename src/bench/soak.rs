//! A sale that lasts: the question of a shop that runs holdfast for
//! weeks, where every other measurement here lasts seconds. Does anything
//! grow with the operations served (the daemon's memory, its open files,
//! its metrics page, Redis's keys and memory, the event stream), and does
//! an operation cost more, or wait longer, the longer the daemon runs?
//!
//! The probe drives a steady mix for `--duration` seconds at `--rate`
//! operations a second in all (2,000 when absent), spread evenly over the
//! `--workload`s (claim-hot, reserve-commit, reserve-release and
//! slot-confirm when none is named) and abandoned carts: single-line holds
//! of 2 s that nobody commits or releases, so the sweeper's expiry runs
//! throughout. Every twelfth of the run it prints a line with that
//! interval's rate, p99 and CPU an operation, and the state of each
//! process and store; at the end, what each grew by per operation over
//! the run's second half, when every cache has had its first half to fill.
//!
//! What grows by design: Postgres, by the audit log (`--probe pg-growth`
//! has it per operation), and Redis, by each finished hold, kept for
//! `--retention-secs` (a day by default) so that a retry answers as the
//! first call did. To see Redis level off within a run, give the bench's
//! daemon a shorter retention (`--serve-arg=--retention-secs=60`).

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use sqlx::Connection;
use tonic::transport::Channel;

use super::cpu::Watched;
use super::load::{Done, Plan, Run, drive};
use super::probes::{reserve_req, scrape, stock, used_memory};
use super::redis_time::{Snapshot, info_number};
use super::report::status_kib;
use super::workloads::{self, Caller, Workload};
use crate::grpc::pb;

/// The mix when no `--workload` is named: every workload that finishes
/// holds of a kind of its own, without lock-complete, whose 100,000 cards
/// a long run would sell out (name it, with a rate and duration that sell
/// fewer, and the end checks every card's sale in Postgres; with
/// `--listings` above 1, that no sold card is still listed elsewhere).
pub const DEFAULT: [Workload; 4] = [
    Workload::ClaimHot,
    Workload::ReserveCommit,
    Workload::ReserveRelease,
    Workload::SlotConfirm,
];

/// Operations a second, in all, when `--rate` is absent: a busy shop's,
/// well below this machine's peak, so that what the lines show is drift,
/// not saturation.
pub const DEFAULT_RATE: f64 = 2_000.0;

/// The run's intervals: one line each.
const INTERVALS: u32 = 12;
/// No interval shorter: a p99 needs calls to stand on.
const SHORTEST: Duration = Duration::from_secs(5);
/// How long an abandoned cart's hold lasts.
const ABANDONED_TTL_MS: u64 = 2_000;
/// The product abandoned carts hold.
const ABANDONED: &str = "soak-abandoned";

/// What the probe needs beside the connections.
pub struct Setup<'a> {
    pub redis_url: &'a str,
    pub database_url: &'a str,
    /// The daemon's metrics address, when the bench started it.
    pub metrics: Option<&'a str>,
    /// The daemon's process, when the bench started it.
    pub daemon: Option<u32>,
    /// The tenant's event stream, when the bench knows it.
    pub stream: Option<String>,
    pub watched: &'a Watched,
    pub workloads: &'a [Workload],
    pub clients: usize,
    pub rate: f64,
    pub duration: Duration,
}

/// Runs the probe and prints a line per interval and the summary.
pub async fn run(channels: &[Channel], caller: &Caller, setup: &Setup<'_>) -> anyhow::Result<()> {
    // Sales, stock and a venue of its own, so that what the end checks
    // counts is this run's alone.
    let caller = &caller.retagged();
    for &w in setup.workloads {
        workloads::setup(w, &channels[0], caller).await?;
    }
    stock(&channels[0], caller, ABANDONED, 1_000_000_000).await?;
    let mut stores = Stores {
        redis: redis::Client::open(setup.redis_url)?
            .get_multiplexed_async_connection()
            .await
            .context("the soak probe reads Redis's memory and keys")?,
        pg: sqlx::PgConnection::connect(setup.database_url)
            .await
            .context("the soak probe reads Postgres's size")?,
    };
    let streams = setup.workloads.len() + 1;
    let interval = (setup.duration / INTERVALS).max(SHORTEST);
    let each = Plan {
        clients: (setup.clients / streams).max(1),
        duration: interval,
        rate: Some(setup.rate / streams as f64),
        max_calls: None,
    };
    let mut points = vec![Point {
        at: Duration::ZERO,
        ops: 0,
        state: stores.state(setup).await?,
    }];
    let started = Instant::now();
    let started_s = chrono::Utc::now().timestamp();
    let (mut ops, mut errors) = (0, 0);
    let mut p99s = Vec::new();
    // Units each stream moved, in the order of `runs` below.
    let mut units = vec![0; streams];
    while started.elapsed() + interval / 2 < setup.duration {
        let cpu_before = setup.watched.sample();
        let redis_before = stores.redis_counters().await;
        let (mut runs, carts) = tokio::join!(
            join_all(
                setup
                    .workloads
                    .iter()
                    .map(|&w| stream(w, channels, &each, caller)),
            ),
            abandon(channels, &each, caller),
        );
        runs.push(carts);
        for (sum, r) in units.iter_mut().zip(&runs) {
            *sum += r.units;
        }
        let done = Interval::of(&runs);
        let cpu = cpu_before.per_op(&setup.watched.sample(), done.ops);
        let redis_after = stores.redis_counters().await;
        let state = stores.state(setup).await?;
        ops += done.ops;
        errors += done.errors;
        p99s.push(done.p99_ms);
        println!(
            "probe: soak t_s={:.0} rps={:.0} p99_ms={:.2} max_ms={:.1} errors={} refused={} cpu_us_per_op={cpu} {}",
            started.elapsed().as_secs_f64(),
            done.ops as f64 / done.elapsed.as_secs_f64(),
            done.p99_ms,
            done.max_ms,
            done.errors,
            done.refused,
            state.fields(),
        );
        if let (Some((c0, e0)), Some((c1, e1))) = (redis_before, redis_after) {
            // What Redis spends besides the calls (keys expiring, the
            // stream's trim) shows in its CPU an operation, not here.
            println!(
                "probe: soak-redis t_s={:.0} expired_keys_per_op={:.2} {}",
                started.elapsed().as_secs_f64(),
                (e1 - e0) as f64 / done.ops.max(1) as f64,
                c0.per_op(&c1, done.ops),
            );
        }
        points.push(Point {
            at: started.elapsed(),
            ops,
            state,
        });
    }
    println!("{}", summary(&points, &p99s, errors));
    let moved = |w| {
        let i = setup.workloads.iter().position(|&x| x == w)?;
        Some(units[i])
    };
    let end = End {
        claimed: moved(Workload::ClaimHot),
        consumed: moved(Workload::ReserveCommit),
        confirmed: moved(Workload::SlotConfirm),
        cards_sold: moved(Workload::LockComplete),
        // Every window slot-confirm booked: from the hour before the run
        // to a day after its end.
        windows: (
            started_s - 3_600,
            chrono::Utc::now().timestamp() + 25 * 3_600,
        ),
        abandoned: units[streams - 1],
    };
    end.check(&channels[0], caller, setup, errors).await
}

/// The run's cards in Postgres at the end (`End::cards`).
#[derive(Default)]
struct Cards {
    sold: i64,
    listed_after_sale: i64,
}

/// What the run's operations moved, to set beside what the daemon counts
/// once they are over.
struct End {
    /// Units claim-hot claimed, if it ran.
    claimed: Option<u64>,
    /// Units reserve-commit consumed, if it ran.
    consumed: Option<u64>,
    /// Slots slot-confirm confirmed, if it ran.
    confirmed: Option<u64>,
    /// Cards lock-complete's completed locks sold, if it ran.
    cards_sold: Option<u64>,
    /// The range of the windows it booked, Unix seconds.
    windows: (i64, i64),
    /// Abandoned carts' holds made.
    abandoned: u64,
}

impl End {
    /// Once the last abandoned hold is past its end and the drainer has
    /// caught up (`drained=no` when it did not within a minute): every
    /// abandoned unit is back, and the daemon counts as sold (claimed,
    /// consumed, slots confirmed) exactly what the run was told was sold,
    /// with nothing left pending. Fails the probe when
    /// not (a promise broken over a long run: DESIGN.md); with failed
    /// calls, whose fate the run does not know, only prints.
    async fn check(
        &self,
        ch: &Channel,
        caller: &Caller,
        setup: &Setup<'_>,
        errors: u64,
    ) -> anyhow::Result<()> {
        tokio::time::sleep(Duration::from_millis(ABANDONED_TTL_MS + 1_000)).await;
        // The counts below are the daemon's answers; whether the drainer
        // wrote every event to Postgres is said beside them.
        let drained = match &setup.stream {
            Some(stream) => {
                let mut con = redis::Client::open(setup.redis_url)?
                    .get_multiplexed_async_connection()
                    .await?;
                let settled = super::drained::settle(&mut con, stream, Duration::from_secs(60));
                if settled.await.is_some() { "yes" } else { "no" }
            }
            None => "unknown",
        };
        let abandoned = pb::StockKey {
            product_id: ABANDONED.into(),
            variant_id: String::new(),
        };
        let levels = pb::reservation_service_client::ReservationServiceClient::new(ch.clone())
            .get_stock_levels(caller.req(pb::GetStockLevelsRequest {
                keys: vec![abandoned, workloads::stock_key(caller)],
            }))
            .await?
            .into_inner()
            .levels;
        let [carts, shop] = &levels[..] else {
            anyhow::bail!(
                "GetStockLevels answered {} levels for two keys",
                levels.len()
            );
        };
        let sold = workloads::sold(ch, caller, Workload::ClaimHot).await?;
        let (venue_confirmed, venue_pending) = self.booked(ch, caller).await?;
        let cards = self.cards(caller, setup).await?;
        let mut broken = Vec::new();
        if carts.reserved != 0 || carts.available != carts.on_hand {
            broken.push(format!(
                "abandoned carts still hold units: reserved={} available={} of {}",
                carts.reserved, carts.available, carts.on_hand
            ));
        }
        if let Some(claimed) = self.claimed
            && sold != claimed as i64
        {
            broken.push(format!(
                "the sale counts {sold} sold, the run claimed {claimed}"
            ));
        }
        if let Some(consumed) = self.consumed
            && (shop.sold != consumed as i64 || shop.reserved != 0)
        {
            broken.push(format!(
                "the stock counts {} sold and {} reserved, the run consumed {consumed} and left none",
                shop.sold, shop.reserved
            ));
        }
        if let Some(confirmed) = self.confirmed
            && (venue_confirmed != confirmed as i64 || venue_pending != 0)
        {
            broken.push(format!(
                "the venue counts {venue_confirmed} slots confirmed and {venue_pending} pending, the run confirmed {confirmed} and left none"
            ));
        }
        if let Some(locked) = self.cards_sold
            && (cards.sold != locked as i64 || cards.listed_after_sale != 0)
        {
            broken.push(format!(
                "Postgres has {} cards sold on the storefront and {} sold cards still listed elsewhere, the run's locks sold {locked}",
                cards.sold, cards.listed_after_sale
            ));
        }
        println!(
            "probe: soak-end drained={drained} abandoned_holds={} abandoned_reserved={} claimed={} sold={sold} consumed={} stock_sold={} stock_reserved={} confirmed={} venue_confirmed={venue_confirmed} venue_pending={venue_pending} locked={} cards_sold={} listed_after_sale={} promises={}",
            self.abandoned,
            carts.reserved,
            self.claimed.unwrap_or(0),
            self.consumed.unwrap_or(0),
            shop.sold,
            shop.reserved,
            self.confirmed.unwrap_or(0),
            self.cards_sold.unwrap_or(0),
            cards.sold,
            cards.listed_after_sale,
            match (broken.is_empty(), errors) {
                (true, _) => "kept",
                (false, 0) => "BROKEN",
                (false, _) => "unchecked (calls failed)",
            },
        );
        match (broken.is_empty(), errors) {
            (false, 0) => anyhow::bail!("{}", broken.join("; ")),
            _ => Ok(()),
        }
    }

    /// What Postgres, the system of record, holds of the run's cards once
    /// the drainer has caught up: how many were sold on the storefront
    /// (each lock sells one card, so a card sold twice would count once
    /// and fall short of the locks), and how many sold ones are still
    /// live on another channel (each sale pulls them). Zeros when
    /// lock-complete did not run.
    async fn cards(&self, caller: &Caller, setup: &Setup<'_>) -> anyhow::Result<Cards> {
        if self.cards_sold.is_none() {
            return Ok(Cards::default());
        }
        let mut pg = sqlx::PgConnection::connect(setup.database_url)
            .await
            .context("the soak probe reads the cards it sold")?;
        let (sold, listed_after_sale): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE c.sold_channel = $2),
                    count(*) FILTER (WHERE c.sold_channel IS NOT NULL AND EXISTS (
                        SELECT 1 FROM card_channels l
                        WHERE l.workspace = c.workspace AND l.card_id = c.card_id AND l.status = 'active'))
             FROM cards c WHERE c.card_id LIKE $1",
        )
        .bind(format!("c{}n%", caller.tag))
        .bind(workloads::CHANNEL)
        .fetch_one(&mut pg)
        .await?;
        Ok(Cards {
            sold,
            listed_after_sale,
        })
    }

    /// The venue's slots confirmed and pending over the windows the run
    /// booked, `(0, 0)` when slot-confirm did not run.
    async fn booked(&self, ch: &Channel, caller: &Caller) -> anyhow::Result<(i64, i64)> {
        if self.confirmed.is_none() {
            return Ok((0, 0));
        }
        let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
        let windows = pb::slot_service_client::SlotServiceClient::new(ch.clone())
            .get_availability(caller.req(pb::GetAvailabilityRequest {
                venue_id: workloads::venue(caller),
                from: at(self.windows.0),
                to: at(self.windows.1),
            }))
            .await?
            .into_inner()
            .windows;
        Ok(windows
            .iter()
            .fold((0, 0), |(c, p), w| (c + w.confirmed, p + w.pending)))
    }
}

/// Workload `w` driven per `plan`. slot-confirm books the venue's next
/// day, one window after another, as a booking page's customers pick
/// their times: its workload books now's window, whose 100,000 slots an
/// hour fill in minutes at a soak's rate, and a run that outlasted them
/// measured refusals.
async fn stream(w: Workload, channels: &[Channel], plan: &Plan, caller: &Caller) -> Run {
    if w != Workload::SlotConfirm {
        return workloads::run(w, channels, plan, caller).await;
    }
    let c = caller.clone();
    let now = chrono::Utc::now().timestamp();
    drive(channels, plan, move |ch, n| {
        let c = c.clone();
        let hour = (n % DAY_OF_WINDOWS) as i64;
        let at = prost_types::Timestamp {
            seconds: now + hour * 3_600,
            nanos: 0,
        };
        async move { workloads::slot_then_confirm(ch, n, &c, Some(at)).await }
    })
    .await
}

/// The windows slot-confirm spreads over: the venue's next 24 hours.
const DAY_OF_WINDOWS: u64 = 24;

/// Holds of [`ABANDONED`] that nobody finishes: the carts a shop's
/// visitors leave, which expire [`ABANDONED_TTL_MS`] later.
async fn abandon(channels: &[Channel], plan: &Plan, caller: &Caller) -> Run {
    let c = caller.clone();
    drive(channels, plan, move |ch, n| {
        let c = c.clone();
        async move {
            let req = reserve_req(
                format!("x{}n{n}", c.tag),
                &[ABANDONED.into()],
                ABANDONED_TTL_MS,
            );
            let r = pb::reservation_service_client::ReservationServiceClient::new(ch)
                .reserve(c.req(req))
                .await?
                .into_inner();
            Ok(match r.outcome() {
                pb::ReserveOutcome::Reserved => Done::ok("abandoned", 1),
                _ => Done::ok("short", 0),
            })
        }
    })
    .await
}

/// One interval's calls, every stream's together.
struct Interval {
    ops: u64,
    errors: u64,
    /// Operations the daemon refused (sold out, short, full, conflict).
    refused: u64,
    p99_ms: f64,
    max_ms: f64,
    elapsed: Duration,
}

impl Interval {
    fn of(runs: &[Run]) -> Self {
        let mut latency = Histogram::<u64>::new(3).expect("three significant figures");
        for r in runs {
            // Both histograms auto-resize, so adding cannot fail.
            let _ = latency.add(&r.latency);
        }
        Self {
            ops: runs.iter().map(|r| r.calls).sum(),
            errors: runs.iter().map(Run::errors).sum(),
            refused: runs
                .iter()
                .flat_map(|r| &r.outcomes)
                .filter(|(outcome, _)| REFUSALS.contains(&outcome.as_str()))
                .map(|(_, n)| n)
                .sum(),
            p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
            max_ms: latency.max() as f64 / 1000.0,
            elapsed: runs.iter().map(|r| r.elapsed).max().unwrap_or(SHORTEST),
        }
    }
}

/// The outcomes of an operation the daemon refused: a long run can
/// outlast what its setup made (a slot window of 100,000 fills in a
/// minute and a half at 1,200 a second), and then measures refusals.
const REFUSALS: [&str; 5] = ["sold_out", "short", "full", "conflict", "other"];

/// The connections the state is read over.
struct Stores {
    redis: redis::aio::MultiplexedConnection,
    pg: sqlx::PgConnection,
}

impl Stores {
    /// Redis's per-command counters and the keys it has expired so far.
    async fn redis_counters(&mut self) -> Option<(Snapshot, i64)> {
        let commands = Snapshot::read(&mut self.redis).await?;
        let expired = info_number(&mut self.redis, "stats", "expired_keys").await?;
        Some((commands, expired))
    }

    async fn state(&mut self, setup: &Setup<'_>) -> anyhow::Result<State> {
        let redis_bytes = used_memory(&mut self.redis).await?;
        let redis_keys = redis::cmd("DBSIZE").query_async(&mut self.redis).await?;
        let stream_len = match &setup.stream {
            Some(s) => Some(
                redis::cmd("XLEN")
                    .arg(s)
                    .query_async(&mut self.redis)
                    .await?,
            ),
            None => None,
        };
        let pg_bytes = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&mut self.pg)
            .await?;
        let metrics_bytes = match setup.metrics {
            Some(m) => Some(scrape(m).await.len() as i64),
            None => None,
        };
        let daemon = setup.daemon;
        Ok(State {
            rss_kib: daemon.and_then(|pid| Some(status_kib(pid, "VmRSS:")? as i64)),
            fds: daemon.and_then(|pid| {
                Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as i64)
            }),
            metrics_bytes,
            redis_bytes,
            redis_keys,
            stream_len,
            pg_bytes,
        })
    }
}

/// What the processes and stores hold at one moment; a figure the bench
/// cannot read (a daemon it did not start) is `None`.
struct State {
    rss_kib: Option<i64>,
    fds: Option<i64>,
    metrics_bytes: Option<i64>,
    redis_bytes: i64,
    redis_keys: i64,
    stream_len: Option<i64>,
    pg_bytes: i64,
}

impl State {
    /// Each figure by name, `None`s left out; the summary's growth is per
    /// these.
    fn each(&self) -> Vec<(&'static str, i64)> {
        [
            ("daemon_rss_kib", self.rss_kib),
            ("daemon_fds", self.fds),
            ("metrics_bytes", self.metrics_bytes),
            ("redis_bytes", Some(self.redis_bytes)),
            ("redis_keys", Some(self.redis_keys)),
            ("stream_len", self.stream_len),
            ("pg_bytes", Some(self.pg_bytes)),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v?)))
        .collect()
    }

    fn fields(&self) -> String {
        let each: Vec<String> = self
            .each()
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        each.join(" ")
    }
}

/// The state after `ops` operations, `at` into the run.
struct Point {
    at: Duration,
    ops: u64,
    state: State,
}

/// The summary line: each figure's growth per 1,000 operations over the
/// second half of the run (from the middle point to the last), beside its
/// growth over the first half, and the first and last intervals' p99.
fn summary(points: &[Point], p99s: &[f64], errors: u64) -> String {
    let (first, last) = (&points[0], &points[points.len() - 1]);
    let middle = &points[points.len() / 2];
    let per_kop = |a: &Point, b: &Point, name: &str| {
        let value = |p: &Point| {
            p.state
                .each()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v)
        };
        let grown = value(b)? - value(a)?;
        Some(grown as f64 * 1000.0 / b.ops.saturating_sub(a.ops).max(1) as f64)
    };
    let growth: Vec<String> = last
        .state
        .each()
        .iter()
        .filter_map(|(name, _)| {
            let early = per_kop(first, middle, name)?;
            let late = per_kop(middle, last, name)?;
            Some(format!("{name}_per_kop={early:.1},{late:.1}"))
        })
        .collect();
    format!(
        "probe: soak-summary duration_s={:.0} ops={} errors={errors} p99_first_ms={:.2} p99_last_ms={:.2} {}",
        last.at.as_secs_f64(),
        last.ops,
        p99s.first().copied().unwrap_or(0.0),
        p99s.last().copied().unwrap_or(0.0),
        growth.join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(secs: u64, ops: u64, rss_kib: i64, redis_keys: i64) -> Point {
        Point {
            at: Duration::from_secs(secs),
            ops,
            state: State {
                rss_kib: Some(rss_kib),
                fds: None,
                metrics_bytes: None,
                redis_bytes: 0,
                redis_keys,
                stream_len: None,
                pg_bytes: 0,
            },
        }
    }

    #[test]
    fn growth_is_per_thousand_operations_of_each_half() {
        // RSS fills a cache in the first half and then stays; Redis's
        // keys grow by one an operation throughout.
        let points = [
            point(0, 0, 1_000, 0),
            point(10, 2_000, 1_500, 2_000),
            point(20, 4_000, 1_500, 4_000),
            point(30, 6_000, 1_500, 6_000),
            point(40, 8_000, 1_500, 8_000),
        ];
        let line = summary(&points, &[9.0, 4.0], 3);
        assert!(line.starts_with("probe: soak-summary duration_s=40 ops=8000 errors=3 p99_first_ms=9.00 p99_last_ms=4.00 "), "{line}");
        assert!(line.contains(" daemon_rss_kib_per_kop=125.0,0.0"), "{line}");
        assert!(line.contains(" redis_keys_per_kop=1000.0,1000.0"), "{line}");
        assert!(line.contains(" redis_bytes_per_kop=0.0,0.0"), "{line}");
        assert!(
            !line.contains("daemon_fds"),
            "an unread figure is left out: {line}"
        );
    }
}

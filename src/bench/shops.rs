//! Many shops selling at once: the question of a platform that runs one
//! holdfast for many tenants. The engine batches the calls that wait for
//! Redis, but only within one tenant (a batch is one script on one
//! tenant's hash tag, DESIGN.md), and the drainer writes each tenant's
//! events in a transaction of its own: the same claims spread over more
//! tenants make smaller batches, and more of both. The probe measures how
//! much that costs.
//!
//! It starts a daemon of its own with an API key for each of the most
//! shops asked for (`bench-shop-1` ...), since a `--dev` daemon serves one
//! tenant, then runs each `--workload` (claim-hot when none is named;
//! not lock-complete, which would engage 100,000 cards a shop) against
//! each shop count of `--shops` in turn: every shop has its own sales,
//! stock and venue, and operation `n` is shop `n % shops`'s (operations in
//! flight have consecutive numbers, so the clients' calls are spread
//! evenly). Each count's line sets its rate beside the workload's first
//! count's (`vs_first`), with the CPU, the Redis time and the Postgres
//! write transactions (`txid_current`) an operation costs.
//! Then whether one shop's stampede slows another's checkout: a quiet
//! shop's claims at 200 a second alone, and beside the first shop's
//! claim-hot (`shops-neighbour`). The shops' tenants stay in the database
//! (their sales are the run's own, under a fresh tag), so a probe of a
//! user's Postgres adds at most the most shops asked for (two at least).
//! With `--probe opening` too, each shop count's shops open a sale each
//! at once and each crowd of `--crowds` buys them out
//! (`shops-opening`). With `--probe fallback` too, claim-hot goes over
//! each shop count once more with Redis frozen, through the Postgres
//! fallback (`shops-fallback`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::Connection;
use tonic::transport::Channel;

use super::load::Plan;
use super::workloads::{self, Caller, Workload};
use super::{
    BenchArgs, Daemon, DaemonAuth, Probe, connect, connections, cpu, drained, fallback, opening,
    redis_time,
};
use crate::domain::TenantId;
use crate::store::redis::Keys;

/// Runs the probe and prints one line per workload and shop count, then
/// the neighbour line.
pub async fn run(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    check(args)?;
    let driven = match args.workload.as_slice() {
        [] => vec![Workload::ClaimHot],
        named => named.to_vec(),
    };
    // Two at least: the neighbour measurement needs a hot shop and a quiet one.
    let most = args.shops.iter().copied().max().unwrap_or(1).max(2);
    let shops: Vec<Shop> = (1..=most).map(Shop::new).collect::<anyhow::Result<_>>()?;
    let keys: Vec<String> = shops.iter().map(|s| s.config.clone()).collect();
    let daemon = Daemon::start(args, dir, DaemonAuth::Keys(&keys), None)?;
    let addr = daemon.addr();
    let channels = connections(&addr, None, args.connections).await?;
    let tag = Caller::new(None).tag;
    let callers: Vec<Caller> = shops
        .iter()
        .map(|s| Caller {
            tag: Arc::clone(&tag),
            ..Caller::new(Some(Arc::clone(&s.key)))
        })
        .collect();
    // Every workload's setup also makes the hot sale the neighbour
    // measurement and the fallback claim from.
    for &w in &driven {
        for c in &callers {
            workloads::setup(w, &channels[0], c)
                .await
                .with_context(|| format!("setting up {} for a shop", w.name()))?;
        }
    }
    let mut run = Measuring {
        args,
        stats: redis::Client::open(args.redis_url.as_str())?
            .get_multiplexed_async_connection()
            .await
            .context("the shops probe reads Redis's counters and the drainer's progress")?,
        pg: sqlx::PgConnection::connect(&args.database_url)
            .await
            .context("the shops probe counts Postgres's transactions")?,
        watched: cpu::Watched::find(Some(daemon.pid()), &args.redis_url, &args.database_url).await,
        streams: shops.iter().map(|s| s.stream.clone()).collect(),
        plan: Plan {
            clients: args.clients,
            duration: Duration::from_secs(args.duration),
            rate: args.rate,
            max_calls: None,
        },
    };
    for &w in &driven {
        let mut first: Option<f64> = None;
        for &count in &args.shops {
            let count = count.max(1) as usize;
            run.measure(w, &channels, &callers[..count], &mut first)
                .await?;
        }
    }
    // The quiet shop calls over a connection of its own, as another
    // shop's backend would.
    let own = connect(&addr, None).await?;
    let streams = run.streams[..2].to_vec();
    neighbours(
        &channels,
        &own,
        &run.plan,
        &callers[..2],
        &mut run.stats,
        &streams,
    )
    .await;
    if args.probe.contains(&Probe::Opening) {
        openings(args, &channels, &callers).await?;
    }
    if args.probe.contains(&Probe::Fallback) {
        through_fallback(args, &channels, &run.plan, &callers).await?;
    }
    Ok(())
}

/// With the fallback probe also asked for: claim-hot over each shop count
/// again, with Redis frozen, so every claim goes through the Postgres
/// fallback, whose queue also batches one tenant's takes at a time. The
/// shops' sales were granted to Redis only in part (`--grant-chunk`), so
/// the fallback has units to sell.
async fn through_fallback(
    args: &BenchArgs,
    channels: &[Channel],
    plan: &Plan,
    callers: &[Caller],
) -> anyhow::Result<()> {
    let pid = fallback::loopback_redis_pid(&args.redis_url).await?;
    let _frozen = fallback::Frozen::stop(vec![pid])?;
    // The first calls wait out --redis-timeout-ms and open the circuit.
    let warm = Plan {
        duration: Duration::from_secs(3),
        ..plan.clone()
    };
    workloads::spread(Workload::ClaimHot, channels, &warm, &callers[..1]).await;
    let mut first: Option<f64> = None;
    for &count in &args.shops {
        let shops = &callers[..count.max(1) as usize];
        let warm = Plan {
            duration: Duration::from_secs(1),
            ..plan.clone()
        };
        workloads::spread(Workload::ClaimHot, channels, &warm, shops).await;
        let run = workloads::spread(Workload::ClaimHot, channels, plan, shops).await;
        let rps = run.answered_rate();
        let vs_first = rps / *first.get_or_insert(rps);
        println!(
            "probe: shops-fallback workload=claim-hot shops={} rps={rps:.0} vs_first={vs_first:.2} p50_ms={:.2} p99_ms={:.2} errors={}",
            shops.len(),
            run.ms(0.5),
            run.ms(0.99),
            run.errors(),
        );
    }
    Ok(())
}

/// With the opening probe also asked for: every shop of each count opens
/// a sale of its own at once, and each crowd of `--crowds` buys them all
/// out (`shops-opening`): a platform whose shops start their drops at the
/// same minute. Each sale runs dry in Redis a dozen times on its way, and
/// every shop's takes wait for their grants.
async fn openings(
    args: &BenchArgs,
    channels: &[Channel],
    callers: &[Caller],
) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.duration);
    for &count in &args.shops {
        for &crowd in &args.crowds {
            let shops: Vec<Caller> = callers[..count.max(1) as usize]
                .iter()
                .map(Caller::retagged)
                .collect();
            let opening = opening::open(channels, &shops, crowd, duration).await?;
            println!(
                "probe: shops-opening shops={} crowd={crowd} {}",
                shops.len(),
                opening.fields()
            );
            opening.checked()?;
        }
    }
    Ok(())
}

/// Whether the probe can run with `args`: asked before anything else
/// runs, so a bench does not fail at its end.
pub fn check(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.addr.is_none(),
        "the shops probe starts a daemon of its own, with a key per shop; it cannot drive --addr"
    );
    anyhow::ensure!(
        !args.workload.contains(&Workload::LockComplete),
        "the shops probe cannot drive lock-complete: it would engage 100,000 cards for every shop"
    );
    Ok(())
}

/// What each measured run of the probe reads and shares.
struct Measuring<'a> {
    args: &'a BenchArgs,
    /// Redis's counters and the drainer's progress.
    stats: redis::aio::MultiplexedConnection,
    /// Postgres's transaction ids.
    pg: sqlx::PgConnection,
    watched: cpu::Watched,
    /// Each shop's event stream.
    streams: Vec<String>,
    plan: Plan,
}

impl Measuring<'_> {
    /// Warms `w` up over `shops` for a second, then measures it and
    /// prints its line; `first` is the rate the first shop count of `w`
    /// measured (set by it).
    async fn measure(
        &mut self,
        w: Workload,
        channels: &[Channel],
        shops: &[Caller],
        first: &mut Option<f64>,
    ) -> anyhow::Result<()> {
        let streams = &self.streams[..shops.len()];
        let warm = Plan {
            duration: Duration::from_secs(1),
            ..self.plan.clone()
        };
        workloads::spread(w, channels, &warm, shops).await;
        settle(&mut self.stats, streams).await;
        if let Err(e) = drained::vacuum(&self.args.database_url).await {
            eprintln!("bench: could not vacuum Postgres ({e}); measuring anyway");
        }
        let cpu_before = self.watched.sample();
        let redis_before = redis_time::Snapshot::read(&mut self.stats).await;
        let xid_before = xid(&mut self.pg).await?;
        let run = workloads::spread(w, channels, &self.plan, shops).await;
        let drained = settle(&mut self.stats, streams).await;
        let cpu = cpu_before.per_op(&self.watched.sample(), run.calls);
        // Less the reading's own.
        let xacts = (xid(&mut self.pg).await? - xid_before - 1) as f64 / run.calls.max(1) as f64;
        let redis = match (
            redis_before,
            redis_time::Snapshot::read(&mut self.stats).await,
        ) {
            (Some(b), Some(a)) => b.per_op(&a, run.calls),
            _ => "unread".into(),
        };
        let rps = run.rate();
        let vs_first = rps / *first.get_or_insert(rps);
        println!(
            "probe: shops workload={} shops={} rps={rps:.0} vs_first={vs_first:.2} p50_ms={:.2} p99_ms={:.2} errors={} drained_after_s={} pg_xacts_per_op={xacts:.3} cpu_us_per_op={cpu} redis_us_per_op={redis}",
            w.name(),
            shops.len(),
            run.ms(0.5),
            run.ms(0.99),
            run.errors(),
            drained.map_or("late".into(), |d| format!("{:.1}", d.as_secs_f64())),
        );
        Ok(())
    }
}

/// The quiet shop's claims a second beside another shop's stampede.
const QUIET_RATE: f64 = 200.0;
/// The quiet shop's clients.
const QUIET_CLIENTS: usize = 4;

/// Whether one shop's stampede slows another shop's checkout: the quiet
/// shop's claims at [`QUIET_RATE`] over a connection of its own (`own`),
/// alone, then beside the hot shop's claim-hot at `plan`'s clients over
/// `channels`, each for `plan`'s duration. Prints the quiet shop's
/// latency both ways and the stampede's rate.
async fn neighbours(
    channels: &[Channel],
    own: &Channel,
    plan: &Plan,
    shops: &[Caller],
    stats: &mut redis::aio::MultiplexedConnection,
    streams: &[String],
) {
    let [hot, quiet] = shops else {
        unreachable!("two shops")
    };
    let quiet_plan = Plan {
        clients: QUIET_CLIENTS,
        rate: Some(QUIET_RATE),
        ..plan.clone()
    };
    let stampede = Plan {
        rate: None,
        ..plan.clone()
    };
    settle(stats, streams).await;
    let quiet_channels = std::slice::from_ref(own);
    let alone = workloads::run(Workload::ClaimHot, quiet_channels, &quiet_plan, quiet).await;
    settle(stats, streams).await;
    let (beside, hot_run) = tokio::join!(
        workloads::run(Workload::ClaimHot, quiet_channels, &quiet_plan, quiet),
        workloads::run(Workload::ClaimHot, channels, &stampede, hot),
    );
    settle(stats, streams).await;
    println!(
        "probe: shops-neighbour quiet_rate={QUIET_RATE:.0} alone_p50_ms={:.2} alone_p99_ms={:.2} beside_p50_ms={:.2} beside_p99_ms={:.2} stampede_rps={:.0} stampede_p99_ms={:.2}",
        alone.ms(0.5),
        alone.ms(0.99),
        beside.ms(0.5),
        beside.ms(0.99),
        hot_run.rate(),
        hot_run.ms(0.99),
    );
}

/// One shop: its tenant's key, as configured and as sent, and its event
/// stream (the drainer's progress is read there).
struct Shop {
    config: String,
    key: Arc<str>,
    stream: String,
}

impl Shop {
    /// Shop `i`, tenant `bench-shop-<i>`, with a fresh admin key.
    fn new(i: u32) -> anyhow::Result<Self> {
        let tenant = TenantId::parse(&format!("bench-shop-{i}"))?;
        let (_, key, _) = crate::grpc::auth::new_key();
        Ok(Self {
            config: format!("{tenant}:admin:{key}"),
            key: Arc::from(key.as_str()),
            // The started daemon's key prefix (`serve`'s default).
            stream: Keys::new("hf").events(&tenant),
        })
    }
}

/// Waits until the drainer has written back every shop's events, a
/// minute at most: how long that took, `None` if it did not catch up.
async fn settle(
    con: &mut redis::aio::MultiplexedConnection,
    streams: &[String],
) -> Option<Duration> {
    let started = std::time::Instant::now();
    for stream in streams {
        let left = Duration::from_secs(60).saturating_sub(started.elapsed());
        drained::settle(con, stream, left).await?;
    }
    Some(started.elapsed())
}

/// Postgres's next transaction id, taking one: the write transactions
/// since another reading are the difference less one.
async fn xid(pg: &mut sqlx::PgConnection) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT txid_current()")
        .fetch_one(pg)
        .await?)
}

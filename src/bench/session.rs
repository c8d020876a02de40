//! One bench run: what every workload and probe shares (the connections,
//! the caller, the watched processes), each workload measured beside its
//! limits, and each probe run with the settings it needs.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::{Channel, ClientTlsConfig};

use super::load::Plan;
use super::report::{Line, ServerStats};
use super::{
    BenchArgs, Daemon, PgRun, Probe, Workload, baselines, connect, connections, conns, cpu,
    dev_tenant, drained, expiry, failover, fallback, host_port, idle, opening, pg_alternative,
    pg_growth, pgbench_path, probes, reads, redis_limit, redis_time, soak, stampede, watch,
    watch_replay, workloads,
};
use crate::store::redis::RedisStore;

/// What the workloads and probes of one run share.
pub(super) struct Session<'a> {
    args: &'a BenchArgs,
    dir: &'a Path,
    /// The daemon the bench started, if it did (its CPU and memory are
    /// then reported).
    daemon: Option<&'a Daemon>,
    /// The daemon's address, for a probe that wants a connection of its own.
    addr: String,
    /// The client's TLS for `addr`, when it is `https://`.
    tls: Option<ClientTlsConfig>,
    channels: Vec<Channel>,
    caller: workloads::Caller,
    /// The engine's scripts, for the Redis baseline (none when Redis is
    /// out of reach: that baseline is skipped).
    redis: Option<RedisStore>,
    plan: Plan,
    watched: cpu::Watched,
    /// Redis's per-command counters (src/bench/redis_time.rs), on a
    /// connection of the bench's own so that reading them is not measured.
    stats_con: Option<redis::aio::MultiplexedConnection>,
}

impl<'a> Session<'a> {
    /// Connects to the daemon at `addr` and finds the processes to watch.
    pub async fn open(
        args: &'a BenchArgs,
        dir: &'a Path,
        daemon: Option<&'a Daemon>,
        addr: &str,
        tls: Option<ClientTlsConfig>,
    ) -> anyhow::Result<Self> {
        let channels = connections(addr, tls.as_ref(), args.connections).await?;
        let caller = workloads::Caller::new(args.api_key.as_deref().map(Arc::from))
            .with_customer_limit(args.customer_limit)
            .with_listings(args.listings);
        let redis = RedisStore::connect(
            &args.redis_url,
            "hf",
            // The daemon's default retention, so the baseline's arguments
            // are the daemon's.
            Duration::from_secs(86_400),
            Default::default(),
        )
        .await
        .ok();
        let plan = Plan {
            clients: args.clients,
            duration: Duration::from_secs(args.duration),
            rate: args.rate,
            max_calls: None,
        };
        let watched =
            cpu::Watched::find(daemon.map(Daemon::pid), &args.redis_url, &args.database_url).await;
        let stats_con = match redis::Client::open(args.redis_url.as_str()) {
            Ok(client) => client.get_multiplexed_async_connection().await.ok(),
            Err(_) => None,
        };
        Ok(Self {
            args,
            dir,
            daemon,
            addr: addr.to_string(),
            tls,
            channels,
            caller,
            redis,
            plan,
            watched,
            stats_con,
        })
    }

    /// The run's first line: its settings and the machine.
    pub async fn print_header(&mut self, addr: &str) {
        let args = self.args;
        println!(
            "bench: clients={} connections={} duration={}s cores={} target={addr} redis_persistence={}",
            args.clients,
            args.connections,
            args.duration,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            redis_time::persistence(self.stats_con.as_mut()).await
        );
    }

    /// The workloads to measure: those named, else every one unless only
    /// probes were asked for.
    pub fn workloads(&self) -> Vec<Workload> {
        match (&self.args.workload[..], &self.args.probe[..]) {
            ([], [_, ..]) => Vec::new(),
            ([], []) => Workload::ALL.to_vec(),
            (named, _) => named.to_vec(),
        }
    }

    /// Sets up `w`, warms it up for a second, measures it for the run's
    /// duration and, unless `--no-baselines`, its limits beside it.
    pub async fn measure(&mut self, w: Workload) -> anyhow::Result<Line> {
        let (channels, caller) = (&self.channels, &self.caller);
        workloads::setup(w, &channels[0], caller)
            .await
            .with_context(|| format!("setting up {}", w.name()))?;
        // A short warm-up: connections, script cache, pool grants.
        let warm = Plan {
            duration: Duration::from_secs(1),
            ..self.plan.clone()
        };
        workloads::run(w, channels, &warm, caller).await;
        self.settle().await;
        self.vacuum().await;
        if let Some(d) = self.daemon {
            ServerStats::reset_peak(d.pid());
        }
        let before = self.daemon.map(|d| ServerStats::read(d.pid()));
        let redis_before = redis_snapshot(self.stats_con.as_mut()).await;
        let cpu_before = self.watched.sample();
        let measured = workloads::run(w, channels, &self.plan, caller).await;
        warn_if_refused(w, "measured", &measured);
        // The write-back of the run's events is the run's work too: the
        // counters are read once the drainer caught up.
        let drained = self.settle().await;
        let cpu = cpu_before.per_op(&self.watched.sample(), measured.calls);
        let redis_after = redis_snapshot(self.stats_con.as_mut()).await;
        let server = match (self.daemon, before) {
            (Some(d), Some(Ok(b))) => ServerStats::read(d.pid()).ok().map(|a| a.since(&b)),
            _ => None,
        };
        let mut line = Line::new(w, &measured, server);
        line.drained_secs = drained.map(|d| d.as_secs_f64());
        line.cpu_us_per_op = cpu;
        if let (Some(b), Some(a)) = (redis_before, redis_after) {
            line.redis_us_per_op = b.per_op(&a, measured.calls);
        }
        if !self.args.no_baselines {
            self.measure_baselines(w, &mut line).await;
        }
        Ok(line)
    }

    /// The limits `w` is set beside, into `line`: the no-op RPC's rate,
    /// the engine's script through redis-benchmark, the Postgres
    /// alternative through pgbench, and the p99 at half of `w`'s peak
    /// beside the no-op's at the same rate. A baseline that cannot run
    /// is skipped with a note.
    async fn measure_baselines(&self, w: Workload, line: &mut Line) {
        let (args, channels, caller) = (self.args, &self.channels, &self.caller);
        let rpcs = f64::from(w.rpcs());
        // A limit is a peak, whatever --rate the workload ran at.
        let flat_out = Plan {
            rate: None,
            ..self.plan.clone()
        };
        line.grpc_limit = Some(baselines::noop(channels, &flat_out, 1).await.rate() / rpcs);
        match self.redis_limit(w).await {
            Ok(r) => line.redis_limit = Some(r),
            Err(e) => eprintln!("bench: redis baseline skipped: {e:#}"),
        }
        // The limit's own events are written back before Postgres is
        // measured.
        self.settle().await;
        let run = PgRun::Seconds(args.duration.min(10));
        match pg_alternative(w, &args.database_url, self.dir, args.clients, run).await {
            Ok(r) => line.pg_alt = Some(r),
            Err(e) => eprintln!("bench: pgbench baseline skipped: {e:#}"),
        }
        // Latency at half of the measured peak, beside the no-op's at the
        // same rate of operations, each made of as many calls as the
        // workload's.
        let half = Plan {
            rate: Some(line.rps / 2.0),
            duration: Duration::from_secs((args.duration / 2).max(2)),
            ..self.plan.clone()
        };
        self.settle().await;
        let at_half = workloads::run(w, channels, &half, caller).await;
        warn_if_refused(w, "half-load", &at_half);
        let noop_half = baselines::noop(channels, &half, w.rpcs()).await;
        line.half_load_p99 = Some((at_half.ms(0.99), noop_half.ms(0.99)));
    }

    /// `w`'s Redis limit, per operation (src/bench/redis_limit.rs): a
    /// claim through redis-benchmark, beside the driver's figure for the
    /// same call (how the driver compares); a two-step operation through
    /// the driver.
    async fn redis_limit(&self, w: Workload) -> anyhow::Result<f64> {
        let redis = self
            .redis
            .as_ref()
            .context("Redis is out of the bench's reach")?;
        let (args, caller) = (self.args, &self.caller);
        let numbers = redis_limit::fresh_numbers(DRIVEN_OPS);
        if w == Workload::LockComplete {
            let cards = numbers.clone();
            workloads::engage_baseline_cards(&self.channels[0], caller, cards).await?;
            self.settle().await;
        }
        // Made now, after the cards: a command line carries the time it
        // was made (lib.lua's `now`), and holds made with a stale one
        // expire early (the engage above takes half a minute).
        let steps = redis_limit::steps(redis, &dev_tenant(), w, caller).await?;
        let name = w.name();
        if let [call] = &steps[..] {
            let rate = self.redis_benchmark(w, call).await?;
            let driven =
                redis_limit::drive_steps(&args.redis_url, args.clients, numbers, &steps).await?;
            println!(
                "bench-redis-limit: workload={name} redis_benchmark={rate:.0} driver={:.0} driver_vs_redis_benchmark={:.2} driver_refused={:?}",
                driven.rate(),
                driven.rate() / rate,
                driven.refused
            );
            return Ok(rate);
        }
        let driven =
            redis_limit::drive_steps(&args.redis_url, args.clients, numbers, &steps).await?;
        driven.check()?;
        println!(
            "bench-redis-limit: workload={name} driver={:.0} ops={} refused={:?} failed={}",
            driven.rate(),
            driven.done,
            driven.refused,
            driven.failed
        );
        Ok(driven.rate())
    }

    /// `call` through redis-benchmark at the run's concurrency, checked
    /// by Redis's own counters: each call of a selling workload must have
    /// taken (its event is an XADD), not answered a retry or a refusal,
    /// which cost Redis far less; claim-sellout's must have been refused,
    /// as its workload's calls are.
    async fn redis_benchmark(&self, w: Workload, call: &[String]) -> anyhow::Result<f64> {
        const CALLS: u64 = 100_000;
        let (host, port) = host_port(&self.args.redis_url);
        let mut stats = self.stats_con.clone();
        let before = redis_snapshot(stats.as_mut()).await;
        let rate = baselines::redis_script(&host, port, self.args.clients, CALLS, call).await?;
        let after = redis_snapshot(stats.as_mut()).await;
        let Some((b, a)) = before.zip(after) else {
            return Ok(rate);
        };
        let took = b.calls_between(&a, "xadd");
        let sells = w != Workload::ClaimSellout;
        if sells && took < CALLS * 9 / 10 {
            anyhow::bail!(
                "only {took} of {CALLS} calls took (XADDs); the rate {rate:.0}/s is not the script's work"
            );
        }
        if !sells && took > CALLS / 10 {
            anyhow::bail!(
                "{took} of {CALLS} calls took (XADDs), where the workload's are refused: the pool has not sold out"
            );
        }
        Ok(rate)
    }

    /// Waits for the daemon's drainer to write back what Redis logged
    /// (src/bench/drained.rs), at most a minute: how long that took.
    ///
    /// Only for the daemon the bench started, whose tenant (`dev`) it
    /// knows: a daemon given by `--addr` serves its key's tenant, whose
    /// stream the bench cannot name, and is measured without the wait.
    async fn settle(&self) -> Option<Duration> {
        self.daemon?;
        drained::settle_dev(&mut self.stats_con.clone()?).await
    }

    /// Vacuums the bench's own Postgres before a measured run
    /// (src/bench/drained.rs, `vacuum`). Like [`Self::settle`], only when
    /// the bench started the daemon: a Postgres given with `--addr` is the
    /// user's, and its upkeep is theirs.
    async fn vacuum(&self) {
        if self.daemon.is_none() {
            return;
        }
        match drained::vacuum(&self.args.database_url).await {
            Ok(took) => eprintln!("bench: vacuumed Postgres in {:.1} s", took.as_secs_f64()),
            Err(e) => eprintln!("bench: could not vacuum Postgres ({e}); measuring anyway"),
        }
    }

    /// Runs one probe (each prints its own lines).
    pub async fn probe(&self, probe: Probe) -> anyhow::Result<()> {
        let (args, channels, caller) = (self.args, &self.channels, &self.caller);
        workloads::setup(Workload::ClaimHot, &channels[0], caller).await?;
        let metrics = self.daemon.map(Daemon::metrics_addr);
        let metrics = metrics.as_deref();
        match probe {
            Probe::Failover | Probe::PgOutage => {
                let store = match probe {
                    Probe::Failover => failover::Store::Redis,
                    _ => failover::Store::Postgres,
                };
                let setup = failover::Setup {
                    store,
                    redis_url: &args.redis_url,
                    database_url: &args.database_url,
                    metrics,
                    clients: args.clients,
                    rate: args.rate.unwrap_or(failover::DEFAULT_RATE),
                    outage: Duration::from_secs(args.duration),
                };
                failover::run(channels, caller, &setup).await
            }
            Probe::Expiry => {
                let setup = expiry::Setup {
                    redis_url: &args.redis_url,
                    metrics,
                    watched: &self.watched,
                    clients: args.clients,
                    holds: args.holds,
                };
                expiry::run(channels, caller, &setup).await
            }
            Probe::Reads => {
                let own = connect(&self.addr, self.tls.as_ref()).await?;
                reads::run(
                    channels,
                    own,
                    caller,
                    &self.watched,
                    &self.plan,
                    &args.database_url,
                )
                .await
            }
            Probe::Soak => {
                let driven = match args.workload.as_slice() {
                    [] => &soak::DEFAULT[..],
                    named => named,
                };
                let setup = soak::Setup {
                    redis_url: &args.redis_url,
                    database_url: &args.database_url,
                    metrics,
                    daemon: self.daemon.map(Daemon::pid),
                    stream: self.redis.as_ref().map(|r| r.keys().events(&dev_tenant())),
                    watched: &self.watched,
                    workloads: driven,
                    clients: args.clients,
                    rate: args.rate.unwrap_or(soak::DEFAULT_RATE),
                    duration: Duration::from_secs(args.duration),
                };
                soak::run(channels, caller, &setup).await
            }
            Probe::Stampede => {
                let deadline = args.deadline_ms.unwrap_or(stampede::DEFAULT_DEADLINE_MS);
                let fallback = if args.probe.contains(&Probe::Fallback) {
                    Some(fallback::loopback_redis_pid(&args.redis_url).await?)
                } else {
                    None
                };
                let setup = stampede::Setup {
                    watched: &self.watched,
                    daemon: self.daemon.map(Daemon::pid),
                    crowds: &args.crowds,
                    deadline: Duration::from_millis(deadline),
                    duration: Duration::from_secs(args.duration),
                    fallback,
                };
                stampede::run(channels, caller, &setup).await
            }
            Probe::Opening => {
                let duration = Duration::from_secs(args.duration);
                opening::run(channels, caller, &args.crowds, duration)
                    .await
                    .map(drop)
            }
            Probe::Connections => {
                let Some(daemon) = self.daemon else {
                    anyhow::bail!(
                        "connections needs the daemon the bench starts (its memory and descriptors)"
                    );
                };
                let setup = conns::Setup {
                    addr: &self.addr,
                    tls: self.tls.as_ref(),
                    daemon: daemon.pid(),
                    watched: &self.watched,
                    plan: &self.plan,
                    idle: args.idle_connections,
                };
                conns::run(channels, caller, &setup).await
            }
            Probe::Watch => {
                let own = connect(&self.addr, self.tls.as_ref()).await?;
                let counts = &args.watchers;
                watch::run(channels, own, caller, &self.watched, &self.plan, counts).await
            }
            Probe::Idle => {
                let idle_for = Duration::from_secs(args.duration);
                idle::run(&self.watched, &args.database_url, args.tenants, idle_for).await
            }
            Probe::Fallback => self.fallback_probe().await,
            Probe::WatchReplay => {
                let Some(redis) = &self.redis else {
                    anyhow::bail!(
                        "watch-replay needs the daemon the bench starts (its tenant's stream)"
                    );
                };
                let stream = redis.keys().events(&dev_tenant());
                let (pg, url) = (&args.database_url, &args.redis_url);
                let (clients, n) = (args.clients, args.holds);
                let replay =
                    watch_replay::run(channels, caller, pg, url, &stream, clients, n).await?;
                println!("{}", replay.line());
                Ok(())
            }
            Probe::PgGrowth => {
                let driven = match args.workload.as_slice() {
                    [] => &pg_growth::DEFAULT[..],
                    named => named,
                };
                let url = &args.database_url;
                let (clients, n) = (args.clients, args.holds);
                for g in pg_growth::run(driven, channels, caller, url, clients, n).await? {
                    println!("{}", g.line());
                }
                Ok(())
            }
            _ => {
                let url = &args.redis_url;
                probes::run(probe, channels, caller, url, args.clients, args.holds).await
            }
        }
    }

    /// The fallback probe, over the named workloads (claim-hot if none).
    async fn fallback_probe(&self) -> anyhow::Result<()> {
        let args = self.args;
        let driven = if args.workload.is_empty() {
            vec![Workload::ClaimHot]
        } else {
            args.workload.clone()
        };
        // Sales, stock and cards of its own: the fallback sells only what
        // was never granted to Redis, and the workloads above sold
        // claim-sellout's cap and the cards out (an engaged card's unit
        // is Redis's anyway: README, "Sale locks").
        let fresh = workloads::Caller::new(self.caller.key.clone())
            .with_customer_limit(self.caller.customer_limit)
            .with_listings(self.caller.listings);
        for &w in &driven {
            workloads::setup(w, &self.channels[0], &fresh).await?;
        }
        let setup = fallback::Setup {
            redis_url: &args.redis_url,
            database_url: &args.database_url,
            pgbench: &pgbench_path(),
            dir: self.dir,
            clients: args.clients,
            duration: Duration::from_secs(args.duration),
            workloads: &driven,
        };
        fallback::run(&self.channels, &fresh, &setup).await
    }
}

/// Operations the Redis driver runs for a limit (src/bench/redis_limit.rs),
/// and cards engaged for lock-complete's.
const DRIVEN_OPS: u64 = 50_000;

/// Says so when more than 1% of a run's operations were refused in a way
/// its workload never means to be (a card already sold, stock or slots
/// run out): such a run measured the cheaper refusal, not the operation.
/// claim-sellout's sold-out answers are its operation.
fn warn_if_refused(w: Workload, run_name: &str, run: &super::load::Run) {
    let refused: u64 = ["conflict", "short", "full", "other"]
        .iter()
        .filter_map(|k| run.outcomes.get(*k))
        .sum();
    if refused * 100 > run.calls {
        eprintln!(
            "bench: {refused} of {} operations of {}'s {run_name} run were refused ({:?}): it measured refusals, not the operation",
            run.calls,
            w.name(),
            run.outcomes
        );
    }
}

/// Redis's command counters, when the bench has a connection to read them.
async fn redis_snapshot(
    con: Option<&mut redis::aio::MultiplexedConnection>,
) -> Option<redis_time::Snapshot> {
    redis_time::Snapshot::read(con?).await
}

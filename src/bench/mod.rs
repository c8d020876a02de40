//! `holdfast bench`: the load generator (it stands in for ghz, which no
//! registry here ships). It drives a daemon over real gRPC with N clients
//! for each named workload, and measures in the same run the limits that
//! bound it — the engine's own Lua script through `redis-benchmark`, a
//! no-op RPC through the same tonic stack — and the Postgres alternative
//! through `pgbench`, so its figures are ratios that survive a noisy,
//! shared machine. deploy/bench.sh runs it with its own Redis and Postgres;
//! deploy/BENCHMARKS.md records the figures.

mod baselines;
mod conns;
mod cpu;
mod drained;
mod expiry;
mod failover;
mod fallback;
mod idle;
mod load;
mod opening;
mod pg_growth;
mod probes;
mod reads;
mod redis_limit;
mod redis_time;
mod report;
mod restart;
mod session;
mod shops;
mod soak;
mod stampede;
mod tls;
mod watch;
mod watch_replay;
mod watch_tenants;
mod webhooks;
mod workloads;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tonic::transport::{Channel, ClientTlsConfig};

pub use baselines::{PgRun, redis_script};
pub use drained::vacuum;
pub use opening::{Opened, run as opening};
pub use pg_growth::{Growth, run as pg_growth};
pub use probes::Probe;
pub use redis_limit::{Driven, N as OP_NUMBER, drive_steps, steps as redis_steps};
use session::Session;
pub use tls::{Certs, client_tls};
pub use watch_replay::{Replay, run as watch_replay};
pub use workloads::{Caller, Workload};

/// `holdfast bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Workloads to run (comma-separated); all of them when absent.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub workload: Vec<Workload>,

    /// Seconds each measured run lasts.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,

    /// Concurrent clients (in-flight calls).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub clients: usize,

    /// Operations per second, in all, spread evenly over the clients;
    /// absent: as fast as they go. At a set rate the latencies are those
    /// of a steady load below the peak (ghz's `-r`).
    #[arg(long, value_parser = positive_rate)]
    pub rate: Option<f64>,

    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub connections: usize,

    /// A running daemon to drive (http://host:port). Without it the bench
    /// starts `holdfast serve --dev` itself on --redis-url and
    /// --database-url, and reports its CPU time and peak memory.
    #[arg(long, env = "HOLDFAST_BENCH_ADDR")]
    pub addr: Option<String>,

    /// API key for --addr (sent as `authorization: Bearer`).
    #[arg(long, env = "HOLDFAST_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// For an --addr of https://: the CA (PEM) that signed the daemon's
    /// certificate, which must name the host in --addr (ghz's --cacert).
    #[arg(long, env = "HOLDFAST_BENCH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The bench's client certificate (PEM), for a daemon that requires
    /// one (`serve --tls-client-ca`); with --tls-key and --tls-ca.
    #[arg(long, env = "HOLDFAST_BENCH_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "HOLDFAST_BENCH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Redis the daemon uses (for the started daemon and the
    /// redis-benchmark baseline).
    #[arg(
        long,
        env = "HOLDFAST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Postgres the daemon uses (for the started daemon and the pgbench
    /// baseline, which makes its own bench_* tables).
    #[arg(
        long,
        env = "HOLDFAST_DATABASE_URL",
        default_value = "postgres://holdfast@127.0.0.1:5432/holdfast"
    )]
    pub database_url: String,

    /// Probes to run after the workloads (comma-separated): memory,
    /// batch, expiry, failover and pg-outage (claims at --rate, 1,000/s
    /// when absent, through a freeze of --duration seconds of Redis or of
    /// Postgres, and its thaw), fallback (drives the --workload workloads
    /// through the Postgres fallback, claim-hot when none is named), idle
    /// (each process's CPU over --duration seconds of no traffic, then
    /// again with --tenants idle tenants more), pg-growth (what --holds
    /// operations of each --workload, claim-hot and reserve-commit when
    /// none is named, leave in the Postgres of --database-url: table,
    /// audit-log and WAL bytes each), watch-replay (--holds claims
    /// trimmed from the Redis stream, then a Watch resuming before them:
    /// how fast their history comes from Postgres), reads (a storefront's
    /// reads, flat out and beside claims), soak (a steady mix at --rate,
    /// 2,000/s when absent, for --duration seconds: what grows), stampede
    /// (claim-hot by each of --crowds clients, every call given up after
    /// --deadline-ms and pressed again: what is answered in time past the
    /// peak, and sold to calls that gave up; with fallback too, every crowd
    /// again through the Postgres fallback, Redis frozen), opening (a sale of 1,000
    /// claimed by each of --crowds clients: how long it takes to sell out,
    /// and what its buyers are answered meanwhile), shops (the --workload
    /// workloads, claim-hot when none is named, spread over each count of
    /// --shops tenants in turn, on a daemon of its own with a key per
    /// shop; with opening too, every shop's sale opening at once), tls
    /// (the --workload workloads, claim-hot when none is named, and the
    /// no-op RPC on a daemon started plaintext and then with TLS, by
    /// turns: what TLS costs a call; with connections too, that probe
    /// again over TLS), restart (claims at --rate, 1,000/s
    /// when absent, through a SIGTERM of a daemon of its own and its start
    /// again, for --duration seconds after the SIGTERM: what a deploy costs
    /// the shoppers), connections (claim-hot alone, then --idle-connections
    /// connections opened and left idle: the daemon's memory and
    /// descriptors per connection, its CPU with them, and claim-hot beside
    /// them), watch (claim-hot beside each count of --watchers Watch
    /// subscribers: what they cost the claims, how late events reach
    /// them), watch-tenants (--tenants quiet shops with a Watch subscriber
    /// each, on a daemon of its own: each process's CPU without and with
    /// them, the Redis connections they hold, and an event reaching each).
    /// Failover, pg-outage and fallback freeze a store, so they run
    /// after the others; shops, tls, restart and watch-tenants run last,
    /// on daemons of their own,
    /// once the bench's daemon has stopped. With probes and no --workload,
    /// only the probes run.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub probe: Vec<Probe>,

    /// Holds the memory and expiry probes make (and pg-growth's
    /// operations of each workload).
    #[arg(long, default_value_t = 100_000)]
    pub holds: u64,

    /// Tenants the idle probe adds (and removes after), which exist and
    /// do nothing; the shops the watch-tenants probe watches.
    #[arg(long, default_value_t = 1_000)]
    pub tenants: u32,

    /// Connections the connections probe opens and leaves idle; the
    /// bench and the daemon it starts need an open-files limit
    /// (`ulimit -n`) a few hundred above it.
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one)]
    pub idle_connections: usize,

    /// Counts of Watch subscribers the watch probe runs claim-hot beside,
    /// in turn (comma-separated; 0 is claim-hot alone).
    #[arg(long, value_delimiter = ',', default_value = "0,1,8,32")]
    pub watchers: Vec<usize>,

    /// Shop counts the shops probe spreads its workloads over, in turn
    /// (comma-separated); each count's rate is set beside the first's.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub shops: Vec<u32>,

    /// Crowds the stampede and opening probes claim with, in turn (comma-separated):
    /// clients, each with one call in flight.
    #[arg(long, value_delimiter = ',', default_value = "64,1024,4096",
          value_parser = at_least_one)]
    pub crowds: Vec<usize>,

    /// The stampede probe's deadline for each call, in milliseconds (sent
    /// as `grpc-timeout` and kept by the client, like ghz's `--timeout`);
    /// 100 when absent.
    #[arg(long)]
    pub deadline_ms: Option<u64>,

    /// For the claim workloads: each sale limits a customer to this many
    /// units, and each claim names a customer (the same one for K claims
    /// in a row, so none is refused for it): what the per-customer limit
    /// costs. 0, the default: no limit, no customer. The baselines do not
    /// model it.
    #[arg(long, default_value_t = 0)]
    pub customer_limit: u32,

    /// For lock-complete: each card is listed on this many channels (1-4),
    /// the storefront its locks are taken on and ebay, thisorthat and
    /// whatnot, whose listings a completed lock pulls: what a card listed
    /// everywhere costs a sale. The bench turns the workspace's dual
    /// listing on, and refuses a workspace with a satellite on one of
    /// those channels (it would be sent a webhook for every sale); without
    /// one no webhook is written, but each is looked for. 1, the default:
    /// the storefront alone. The baselines do not model it. The webhooks
    /// probe lists its cards on this many channels too (at least 2), and
    /// gives the others satellites of its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
    pub listings: u32,

    /// For the webhooks probe: ebay's satellite answers 503 until the
    /// sales end, then 200, while the others (at least one: the probe
    /// lists its cards on 3 channels then) answer at once. What a
    /// satellite down through a sale costs the sales and the satellites
    /// beside it, and how soon it hears of every sale once back (it calls
    /// RetryDeliveries then).
    #[arg(long)]
    pub satellite_down: bool,

    /// For the webhooks probe: the satellites answer each webhook this
    /// many milliseconds late, as one that far away would (a round trip
    /// over the internet rather than loopback). A satellite is told of
    /// one request's webhooks a round trip, so this bounds how many a
    /// second it hears of.
    #[arg(long, default_value_t = 0)]
    pub satellite_delay_ms: u64,

    /// For the webhooks probe: the satellites take up to this many
    /// webhooks a request (PutSatellite's batch_size; 0 or 1: each
    /// alone).
    #[arg(long, default_value_t = 0)]
    pub satellite_batch: u32,

    /// Skip the three baselines (only drive holdfast).
    #[arg(long)]
    pub no_baselines: bool,

    /// An argument for the daemon the bench starts (repeatable), e.g.
    /// `--serve-arg=--grant-chunk=1000` to run with the daemon's default
    /// grants, or `--serve-arg=--redis-timeout-ms=250`. A --grant-chunk
    /// given here replaces the bench's own (10,000,000).
    #[arg(long, allow_hyphen_values = true)]
    pub serve_arg: Vec<String>,
}

/// `--rate`: a finite number above zero (0 or a negative rate would
/// otherwise be quietly taken as one call a second).
fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate: give operations per second above 0"
        )),
    }
}

/// A count of clients, connections or a crowd: a run of none would print
/// rates over nothing.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a count: give a whole number above 0")),
    }
}

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = Scratch::create()?;
    run_in(&args, &dir.0).await
}

/// The bench's temporary folder, removed when the run ends or is dropped
/// (interrupted).
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("holdfast-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn run_in(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    if args.probe.contains(&Probe::Shops) {
        shops::check(args)?;
    }
    if args.probe.contains(&Probe::Tls) {
        tls::check(args)?;
    }
    if args.probe.contains(&Probe::Restart) {
        restart::check(args)?;
    }
    if args.probe.contains(&Probe::Connections) {
        conns::check(args)?;
    }
    if args.probe.contains(&Probe::WatchTenants) {
        watch_tenants::check(args).await?;
    }
    if args.probe.contains(&Probe::Webhooks) {
        webhooks::check(args)?;
    }
    let client_tls = tls::from_args(args)?;
    let mut daemon = match &args.addr {
        Some(_) => None,
        None => Some(Daemon::start(args, dir, DaemonAuth::Dev, None)?),
    };
    let addr = match (&args.addr, &daemon) {
        (Some(a), _) => a.clone(),
        (None, Some(d)) => d.addr(),
        (None, None) => unreachable!("a daemon was started"),
    };
    let mut session = Session::open(args, dir, daemon.as_ref(), &addr, client_tls).await?;
    session.print_header(&addr).await;
    for w in session.workloads() {
        session.measure(w).await?.print();
    }
    // The fallback, failover and pg-outage probes freeze a store, and the
    // daemon then has an outage to recover from: they go last.
    let mut order: Vec<Probe> = args
        .probe
        .iter()
        .copied()
        .filter(|p| {
            !matches!(
                p,
                Probe::Shops | Probe::Tls | Probe::Restart | Probe::WatchTenants | Probe::Webhooks
            )
        })
        .collect();
    order.sort_by_key(|p| matches!(p, Probe::Failover | Probe::PgOutage | Probe::Fallback));
    for probe in order {
        session
            .probe(probe)
            .await
            .with_context(|| format!("probe {probe:?}"))?;
    }
    drop(session);
    if let Some(d) = daemon.as_mut() {
        d.stop();
    }
    // With a daemon of its own, alone on the machine: the bench's would
    // also drain the shops' streams (its jobs visit every tenant).
    if args.probe.contains(&Probe::Shops) {
        shops::run(args, dir).await.context("probe Shops")?;
    }
    if args.probe.contains(&Probe::Tls) {
        tls::run(args, dir).await.context("probe Tls")?;
    }
    if args.probe.contains(&Probe::Restart) {
        restart::run(args, dir).await.context("probe Restart")?;
    }
    if args.probe.contains(&Probe::WatchTenants) {
        watch_tenants::run(args, dir)
            .await
            .context("probe WatchTenants")?;
    }
    if args.probe.contains(&Probe::Webhooks) {
        webhooks::run(args, dir).await.context("probe Webhooks")?;
    }
    Ok(())
}

/// What a shop without holdfast would run instead of `w`
/// (`Workload::pg_alternative`), through `pgbench` at `clients` connections
/// for `run`, in `bench_*` tables of `database_url`: operations per
/// second. The bench's `pg_alt`.
pub async fn pg_alternative(
    w: Workload,
    database_url: &str,
    dir: &std::path::Path,
    clients: usize,
    run: PgRun,
) -> anyhow::Result<f64> {
    let alt = w.pg_alternative();
    baselines::pgbench(&pgbench_path(), database_url, dir, &alt, clients, run).await
}

/// Host and port of a `redis://[user:pass@]host[:port][/db]` URL.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    match rest.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(6379)),
        None => (rest.to_string(), 6379),
    }
}

/// pgbench from PATH, else from the newest Postgres bin folder.
fn pgbench_path() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin/pgbench")).collect())
        .unwrap_or_default();
    found.retain(|p| p.exists());
    found.sort();
    found.pop().unwrap_or_else(|| PathBuf::from("pgbench"))
}

/// Cancelled calls one connection remembers, for as long: an answer that
/// arrives for a call the client has forgotten counts as the server's
/// error, and after 1,024 of those (hyper's default) the client closes the
/// connection, failing every call on it. hyper remembers 10, which a
/// crowd whose calls give up at a deadline passes at once (the stampede
/// probe's 2,048 lost a connection every few hundred milliseconds).
const REMEMBERED_RESETS: usize = 65_536;
const REMEMBERED_FOR: Duration = Duration::from_secs(5);

/// `n` connections to the daemon at `addr` (`--connections`), as
/// [`connect`] makes each.
async fn connections(
    addr: &str,
    tls: Option<&ClientTlsConfig>,
    n: usize,
) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        channels.push(connect(addr, tls).await?);
    }
    Ok(channels)
}

/// A connection to the daemon at `addr`, over TLS with `tls` (for an
/// `https://` address), tried again for half a minute while the daemon
/// may still be starting.
async fn connect(addr: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Channel> {
    let mut endpoint = Channel::from_shared(addr.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_max_concurrent_reset_streams(REMEMBERED_RESETS)
        .http2_reset_stream_duration(REMEMBERED_FOR);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .with_context(|| format!("TLS for {addr}"))?;
    }
    let mut tries = 1;
    loop {
        match endpoint.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) if tries < 150 && !refused_by_tls(&e) => tries += 1,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("cannot connect to {addr}")));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a connect failed in the TLS handshake (a CA that did not sign
/// the daemon's certificate, a host the certificate does not name): no
/// second try mends that, so the bench says so at once rather than after
/// half a minute. rustls's errors come up as I/O errors of kind
/// `InvalidData`; a daemon not listening yet is `ConnectionRefused`.
fn refused_by_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::InvalidData;
        }
        source = s.source();
    }
    false
}

/// How the daemon the bench starts knows its callers.
enum DaemonAuth<'a> {
    /// `--dev`: no keys, every call the tenant "dev"'s.
    Dev,
    /// The given `TENANT:ROLE:KEY` keys, each an `--api-key` (the shops
    /// probe's tenants).
    Keys(&'a [String]),
}

/// The daemon the bench starts: this binary's `serve` (`--dev`, or with
/// the shops probe's keys; with TLS for the tls probe), as a child process
/// so its CPU time and memory are its own.
struct Daemon {
    child: std::process::Child,
    port: u16,
    metrics: u16,
    /// Whether it serves gRPC over TLS.
    tls: bool,
}

impl Daemon {
    fn start(
        args: &BenchArgs,
        dir: &std::path::Path,
        auth: DaemonAuth,
        tls: Option<&Certs>,
    ) -> anyhow::Result<Self> {
        Self::spawn(args, dir, auth, tls, free_port()?, free_port()?)
    }

    /// Starts `serve` on the given gRPC and metrics ports.
    fn spawn(
        args: &BenchArgs,
        dir: &std::path::Path,
        auth: DaemonAuth,
        tls: Option<&Certs>,
        port: u16,
        metrics: u16,
    ) -> anyhow::Result<Self> {
        let mut serve = std::process::Command::new(std::env::current_exe()?);
        serve.arg("serve");
        let log = match auth {
            DaemonAuth::Dev => {
                serve.arg("--dev");
                "holdfast.log"
            }
            DaemonAuth::Keys(keys) => {
                serve.args(keys.iter().flat_map(|k| ["--api-key", k.as_str()]));
                "holdfast-keys.log"
            }
        };
        // Appended to: a restarted daemon's log follows the first one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(log))?;
        serve
            .args(["--log-format", "text"])
            .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args(["--redis-url", &args.redis_url])
            .args(["--database-url", &args.database_url]);
        if let Some(certs) = tls {
            serve
                .arg("--tls-cert")
                .arg(certs.path("server.pem"))
                .arg("--tls-key")
                .arg(certs.path("server.key"));
        }
        let chunk_given = args
            .serve_arg
            .iter()
            .any(|a| a == "--grant-chunk" || a.starts_with("--grant-chunk="));
        if !chunk_given {
            // Grants big enough that neither holdfast nor the raw script
            // baseline waits on Postgres mid-run (the default chunk of
            // 1,000 adds one grant per 1,000 units, off the hot path).
            serve.args(["--grant-chunk", "10000000"]);
        }
        let child = serve
            .args(&args.serve_arg)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start holdfast serve")?;
        Ok(Self {
            child,
            port,
            metrics,
            tls: tls.is_some(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its /metrics address (host:port).
    fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics)
    }

    /// Its gRPC address: `https://` when it was started with TLS.
    fn addr(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it as an orchestrator does, with SIGTERM, and waits for it to
    /// exit: how long that took.
    async fn terminate(&mut self) -> anyhow::Result<std::time::Duration> {
        let sent = std::time::Instant::now();
        fallback::signal(self.pid(), "TERM")?;
        while self.child.try_wait()?.is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(sent.elapsed())
    }

    /// Starts it again (`--dev`, plaintext) on the same ports, as a new
    /// process: the restart probe's second daemon.
    fn respawn(&mut self, args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
        *self = Self::spawn(args, dir, DaemonAuth::Dev, None, self.port, self.metrics)?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The tenant the bench's started daemon serves (`serve --dev`).
fn dev_tenant() -> crate::domain::TenantId {
    crate::domain::TenantId::parse(crate::grpc::auth::DEV_TENANT).expect("dev tenant")
}

/// The lowest port [`free_port`] hands out: above the well-known and most
/// registered services' ports.
const PORT_FLOOR: u16 = 10_000;

/// A loopback port nothing listens on, for a server about to start.
///
/// Chosen below the kernel's ephemeral range (`ip_local_port_range`,
/// 32768 by default), never by binding port 0. The kernel also hands ports
/// from that range to outgoing connections, so a port taken from it can be
/// taken again before the server binds it, or while a server is down for a
/// restart; worse, a connect to a port in the range that nothing listens on
/// can pick that same port as its source and connect to itself (a TCP
/// self-connect), and then holds the port. A retrying client waiting for a
/// restarted Redis (the fault suite kills and restarts one on its port)
/// makes that likely enough to matter. Below the range only an explicit
/// bind takes a port, and a random pick makes two of those unlikely to meet.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > PORT_FLOOR {
        for _ in 0..100 {
            let port = rand::random_range(PORT_FLOOR..ephemeral_low);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    // A machine whose ephemeral range starts low: let the kernel choose.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::{at_least_one, positive_rate, refused_by_tls};

    #[test]
    fn a_rate_must_be_a_finite_number_above_zero() {
        assert_eq!(positive_rate("250"), Ok(250.0));
        assert_eq!(positive_rate("0.5"), Ok(0.5));
        for bad in ["0", "-5", "nan", "inf", "abc", ""] {
            assert!(positive_rate(bad).is_err(), "{bad} was taken");
        }
    }

    /// A failed handshake ends the bench's tries at once; a daemon not
    /// listening yet (or anything else) is tried again.
    #[test]
    fn only_a_refused_handshake_is_not_tried_again() {
        use std::io::{Error, ErrorKind};
        /// An error whose cause is `inner`, as tonic wraps hyper's.
        #[derive(Debug)]
        struct Wrapped(Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let tls = Error::new(
            ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        assert!(refused_by_tls(&Wrapped(tls)));
        let refused = Error::from(ErrorKind::ConnectionRefused);
        assert!(!refused_by_tls(&Wrapped(refused)));
        assert!(!refused_by_tls(&std::fmt::Error));
    }

    #[test]
    fn a_count_must_be_a_whole_number_above_zero() {
        assert_eq!(at_least_one("64"), Ok(64));
        for bad in ["0", "-1", "1.5", "abc", ""] {
            assert!(at_least_one(bad).is_err(), "{bad} was taken");
        }
    }
}

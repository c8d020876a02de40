//! The fault-injection suite: real Redis, Postgres and holdfast processes on
//! loopback, sustained load from concurrent clients that retry with the same
//! id, and one fault at a time. After each scenario it checks, from Postgres
//! and from the clients' own records, that no pool sold more than its
//! capacity, that Redis sold no more of an epoch than it was granted, that
//! every acknowledged sale is present (or counted in doubt), that no hold
//! outlived its TTL plus the sweep bound, and that retries sold
//! nothing twice. Run alone with `./deploy/test.sh --test faults`.

mod clock;
mod cluster;
mod delist;
mod in_flight;
mod load;
mod restore;
mod stampede;
mod sweep;
mod twins;

use std::time::{Duration, Instant};

use cluster::{Daemon, Net, Postgres, Proxy, Redis};
use load::{Load, Report};

/// How long load runs around each fault.
const LOAD_FOR: Duration = Duration::from_secs(7);
/// When the fault strikes, after load starts.
const FAULT_AT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
enum Fault {
    RedisKill,
    RedisEmpty,
    RedisFreeze,
    PostgresRestart,
    HoldfastKill,
    SlowNetwork,
}

struct Cluster {
    redis: Redis,
    pg: Postgres,
    proxy: Proxy,
    daemon: Daemon,
    _dir: TempDir,
}

/// A sale `id` that opened a minute ago and runs for hours, of `products`
/// (id, unit cap), no customer limit: what every fault test sells from.
fn live_sale(id: &str, products: &[(&str, i64)]) -> holdfast::grpc::pb::CreateSaleRequest {
    use holdfast::grpc::pb;
    let now = chrono::Utc::now().timestamp();
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    pb::CreateSaleRequest {
        sale_id: id.into(),
        name: id.into(),
        starts_at: at(now - 60),
        ends_at: at(now + 3 * 3600),
        products: products
            .iter()
            .map(|&(p, cap)| pb::SaleProduct {
                product_id: p.into(),
                unit_cap: Some(cap),
            })
            .collect(),
        per_customer_limit: 0,
    }
}

/// A temporary folder, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    /// `holdfast-<name>-<pid>` under the system's temporary folder, open
    /// to every user (Postgres runs as its own).
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("holdfast-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::process::Command::new("chmod")
            .arg("777")
            .arg(&dir)
            .output();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Requests the fallback served so far (0 when the daemon just restarted).
async fn fallback_served(daemon: &Daemon) -> f64 {
    let page = daemon.scrape().await;
    page.lines()
        .filter(|l| {
            l.starts_with("holdfast_requests_served_total") && l.contains("path=\"postgres\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn circuit_open(daemon: &Daemon) -> Option<bool> {
    let page = daemon.scrape().await;
    page.lines()
        .find(|l| l.starts_with("holdfast_redis_circuit_open "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v > 0.5)
}

impl Cluster {
    async fn inject(&mut self, fault: Fault) -> Instant {
        match fault {
            Fault::RedisKill => self.redis.kill_and_restart(),
            Fault::RedisEmpty => self.redis.kill_and_restart_empty(),
            Fault::RedisFreeze => {
                self.redis.freeze();
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.redis.thaw();
            }
            Fault::PostgresRestart => {
                self.pg.stop();
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.pg.start_again();
            }
            Fault::HoldfastKill => self.daemon.kill_and_restart(),
            Fault::SlowNetwork => {
                self.proxy.set(Net::Bad {
                    delay_ms: 150,
                    reset_one_in: 40,
                });
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.proxy.set(Net::Clean);
            }
        }
        Instant::now()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults() {
    let tmp = TempDir::new("faults");
    let dir = tmp.0.clone();
    let redis = Redis::start(&dir);
    let pg = Postgres::start(&dir);
    let proxy = Proxy::start(redis.port).await;
    let daemon = Daemon::start(&dir, proxy.port, &pg.url());
    let mut cluster = Cluster {
        redis,
        pg,
        proxy,
        daemon,
        _dir: tmp,
    };

    let scenarios = [
        Fault::RedisKill,
        Fault::RedisEmpty,
        Fault::RedisFreeze,
        Fault::PostgresRestart,
        Fault::HoldfastKill,
        Fault::SlowNetwork,
    ];
    let mut total = Report::default();
    let mut failures = Vec::new();
    for (i, fault) in scenarios.into_iter().enumerate() {
        let name = format!("{fault:?}").to_lowercase();
        let sale = format!("s{i}");
        let load = Load::start(
            cluster.daemon.grpc,
            cluster.redis.port,
            &sale,
            &cluster.pg.url(),
        )
        .await;
        let served_before = fallback_served(&cluster.daemon).await;
        tokio::time::sleep(FAULT_AT).await;
        let struck = Instant::now();
        let healed = cluster.inject(fault).await;
        // Time to fail over: the first success after the fault struck.
        let failover = load
            .first_success_after(struck)
            .await
            .map(|t| t.duration_since(struck));
        // Time back: until the circuit is closed again.
        let back_start = Instant::now();
        let mut back = None;
        while back_start.elapsed() < Duration::from_secs(20) {
            if circuit_open(&cluster.daemon).await == Some(false) {
                back = Some(healed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(LOAD_FOR.saturating_sub(FAULT_AT + struck.elapsed())).await;
        let served = (fallback_served(&cluster.daemon).await - served_before).max(0.0);
        let report = load.finish().await;
        println!(
            "fault: scenario={name} requests={} successes={} errors={} failover_ms={} back_ms={} oversold={} missing_acked={} lost_acked={} in_doubt={} late_holds={} duplicates={} beyond_grant={} fallback_served={served}",
            report.requests,
            report.successes,
            report.errors,
            failover.map_or(-1, |d| d.as_millis() as i64),
            back.map_or(-1, |d| d.as_millis() as i64),
            report.oversold,
            report.missing_acked,
            report.lost_acked,
            report.in_doubt,
            report.late_holds,
            report.duplicates,
            report.beyond_grant,
        );
        failures.extend(
            problems(fault, &report, failover, back)
                .into_iter()
                .map(|p| format!("{name}: {p}")),
        );
        total.add(&report);
    }
    println!(
        "faults: scenarios={} oversold={} lost_acked={} in_doubt={}",
        scenarios.len(),
        total.oversold,
        total.lost_acked,
        total.in_doubt
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What went wrong in one scenario, each promise checked on its own (a
/// total over the scenarios would let one scenario's slack hide another's
/// fault). Only an emptied Redis may lose acknowledged sales into the
/// units in doubt: every other fault keeps Redis's data (`appendfsync
/// always`), so there an acknowledged sale missing is lost outright. Those
/// faults may still leave units in doubt, but only unsold ones: a grant
/// Postgres recorded and a stalled or killed Redis never applied
/// (`Escrow::sync_pass`).
fn problems(
    fault: Fault,
    r: &Report,
    failover: Option<Duration>,
    back: Option<Duration>,
) -> Vec<&'static str> {
    let checks = [
        (r.oversold == 0, "a pool sold more than its capacity"),
        (r.lost_acked == 0, "an acknowledged sale was lost"),
        (
            r.missing_acked == 0 || matches!(fault, Fault::RedisEmpty),
            "an acknowledged sale went missing though Redis kept its data",
        ),
        (
            r.late_holds == 0,
            "a hold outlived its TTL plus the sweep bound",
        ),
        (r.duplicates == 0, "a retried id was sold twice"),
        (
            r.beyond_grant == 0,
            "Redis sold more of an epoch than Postgres granted it",
        ),
        (r.successes > 0, "the load made no progress"),
        (
            failover.is_some(),
            "no sale succeeded after the fault struck",
        ),
        // (Faults that leave Redis alone never open the circuit: for them
        // this holds at once.)
        (
            back.is_some(),
            "the Redis circuit did not close within 20 s",
        ),
    ];
    checks
        .into_iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| what)
        .collect()
}

//! The limits holdfast is measured against, in the same run on the same
//! machine: the engine's own Lua script through `redis-benchmark`, a no-op
//! RPC (health check) through the same tonic stack and load driver, and
//! the Postgres alternative through `pgbench`.

use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use tokio::process::Command;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::load::{Done, Plan, Run, drive};

/// The no-op RPC: `grpc.health.v1.Health/Check`, answered from memory,
/// `steps` times in a row per operation. A two-step workload's operation
/// is two calls in a row (reserve, then commit), so its latency is set
/// beside two no-ops in a row, not one: the same shape, at the same rate
/// of operations and of calls.
pub async fn noop(channels: &[Channel], plan: &Plan, steps: u32) -> Run {
    drive(channels, plan, move |ch, _| async move {
        let mut health = HealthClient::new(ch);
        for _ in 0..steps {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
        }
        Ok(Done::ok("served", 0))
    })
    .await
}

/// `argv` (an `EVALSHA` command line) through `redis-benchmark` at
/// `clients` connections, no pipelining: requests per second.
pub async fn redis_script(
    host: &str,
    port: u16,
    clients: usize,
    requests: u64,
    argv: &[String],
) -> anyhow::Result<f64> {
    let out = Command::new("redis-benchmark")
        .args(["-h", host, "-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-n", &requests.to_string()])
        // A random id per call. redis-benchmark reads -r with atoi into
        // an int: a larger range overflowed to a negative one, read as 0,
        // and every call after the first used one id, a retry answered
        // from the hold (until 2026-12-05: deploy/BENCHMARKS.md).
        .args(["-r", "2147483647", "--csv"])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .await
        .context("redis-benchmark (Debian's redis-tools) runs")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // --csv: a header, then "test","rps",...; the test's name is the
    // command line, which may hold commas (JSON), so count from the end:
    // rps is followed by six latency columns.
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.trim().trim_matches('"').split("\",\"").collect();
            fields
                .len()
                .checked_sub(7)
                .and_then(|i| fields[i].parse::<f64>().ok())
        })
        .next_back()
        .with_context(|| format!("no rate in redis-benchmark's output: {text}"))
}

/// The Postgres alternative a user would write instead of holdfast, shaped
/// like the workload it stands beside: the same steps, over as many rows
/// as the workload spreads over, with the same cap.
///
/// The shape matters as much as the statement: one hot row is bound by
/// its row lock (each UPDATE waits for the last to commit), rows spread
/// over thousands run side by side and share their commits' flushes, and
/// a conditional UPDATE that finds the row sold out writes nothing, so its
/// commit waits for no flush. Until 2026-12-04 every claim workload was
/// set beside one hot row with no cap, which flattered holdfast on
/// `claim-10k` and `claim-sellout` (deploy/BENCHMARKS.md, "2026-12-04,
/// the Postgres alternative in the workload's shape").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgAlternative {
    /// What one operation does.
    pub steps: PgSteps,
    /// Rows the operations pick from at random (1: one hot row).
    pub rows: u32,
    /// Each row's cap; never reached unless the workload sells out.
    pub cap: i64,
}

/// The statements of one operation of the Postgres alternative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSteps {
    /// A conditional UPDATE (a claim).
    Claim,
    /// A hold (conditional UPDATE + INSERT) then its commit, two
    /// transactions, as a reservation table does.
    ReserveThenCommit,
    /// The same hold, then its release.
    ReserveThenRelease,
}

/// A cap no run reaches.
pub const UNCAPPED: i64 = 1_000_000_000_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bench_stock (id int PRIMARY KEY, cap bigint NOT NULL, sold bigint NOT NULL DEFAULT 0, held bigint NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bench_holds (hold_id text PRIMARY KEY, product int NOT NULL, qty int NOT NULL, state char NOT NULL DEFAULT 'A', expires_at timestamptz NOT NULL);
TRUNCATE bench_holds, bench_stock;
";

/// The hold of the two-step alternatives: its first transaction, then the
/// start of its second. The hold's row is written before the stock row is
/// locked, so the lock is held for the UPDATE and the commit only, as a
/// careful user would order them (until 2026-12-05 the UPDATE came first
/// and the hot row stayed locked through the INSERT too).
const HOLD_SQL: &str = "\\set h random(1, 1000000000000)
BEGIN;
INSERT INTO bench_holds (hold_id, product, qty, expires_at) VALUES (:client_id::text || '-' || :h::text, :id, 1, now() + interval '60 seconds');
UPDATE bench_stock SET held = held + 1 WHERE id = :id AND sold + held + 1 <= cap;
COMMIT;
BEGIN;
";

impl PgAlternative {
    /// The statements that make `rows` rows with their cap.
    fn schema(&self) -> String {
        format!(
            "{SCHEMA}INSERT INTO bench_stock (id, cap) SELECT g, {} FROM generate_series(1, {}) g;",
            self.cap, self.rows
        )
    }

    /// The pgbench script of one operation.
    fn script(&self) -> String {
        let pick = format!("\\set id random(1, {})\n", self.rows);
        let steps = match self.steps {
            PgSteps::Claim => {
                "UPDATE bench_stock SET sold = sold + 1 WHERE id = :id AND sold + 1 <= cap;\n".into()
            }
            PgSteps::ReserveThenCommit => format!(
                "{HOLD_SQL}UPDATE bench_holds SET state = 'C' WHERE hold_id = :client_id::text || '-' || :h::text AND state = 'A' AND expires_at > now();
UPDATE bench_stock SET held = held - 1, sold = sold + 1 WHERE id = :id;
COMMIT;
"
            ),
            PgSteps::ReserveThenRelease => format!(
                "{HOLD_SQL}UPDATE bench_holds SET state = 'R' WHERE hold_id = :client_id::text || '-' || :h::text AND state = 'A';
UPDATE bench_stock SET held = held - 1 WHERE id = :id;
COMMIT;
"
            ),
        };
        pick + &steps
    }
}

/// How long a pgbench run lasts.
#[derive(Debug, Clone, Copy)]
pub enum PgRun {
    /// This many seconds (`-T`): the bench measures a rate.
    Seconds(u64),
    /// This many script runs per client (`-t`): a test needs a fixed
    /// amount of work done, however fast the machine is.
    PerClient(u64),
}

/// `alt` through `pgbench` at `clients` connections for `run`: operations
/// (script runs) per second.
pub async fn pgbench(
    pgbench: &Path,
    database_url: &str,
    dir: &Path,
    alt: &PgAlternative,
    clients: usize,
    run: PgRun,
) -> anyhow::Result<f64> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    sqlx::raw_sql(&alt.schema()).execute(&pool).await?;
    pool.close().await;
    let script = dir.join("pg_alternative.sql");
    std::fs::write(&script, alt.script())?;
    let (bound, n) = match run {
        PgRun::Seconds(s) => ("-T", s),
        PgRun::PerClient(n) => ("-t", n),
    };
    let out = Command::new(pgbench)
        // Prepared statements, as an application's driver would use them
        // (until 2026-12-05 pgbench parsed and planned each statement on
        // every run, a handicap holdfast's own statements do not carry).
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
        ])
        .args([bound, &n.to_string(), "-f"])
        .arg(&script)
        .arg(database_url)
        .stdin(Stdio::null())
        .output()
        .await
        .context("pgbench (Postgres's bin folder) runs")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| {
            format!(
                "no tps in pgbench's output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

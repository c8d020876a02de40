//! What a daemon costs with nothing to do, by how many tenants it serves:
//! the question of a platform that runs one holdfast for many shops. The
//! background jobs (sweeper, refiller, drainer) look after every tenant,
//! so their cost can grow with the tenants even when none of them sells
//! anything (it did: deploy/BENCHMARKS.md, "idle tenants"). The probe
//! measures each process's CPU over `--duration`
//! seconds of no traffic with the tenants there are, then again with
//! `--tenants` more that exist and do nothing, and removes those again
//! so the rest of the run is not measured with them.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::Connection;

use super::cpu::Watched;

/// Longer than the daemon's tenant list takes to be read again (1 s), the
/// drainer to make the new tenants' consumer groups, and its first tending
/// of their streams (5 s): the probe measures the daemon settled.
const SETTLE: Duration = Duration::from_secs(8);
/// The idle tenants' ids start with this.
const PREFIX: &str = "bench-idle-";

/// Runs the probe and prints its line.
pub async fn run(
    watched: &Watched,
    database_url: &str,
    tenants: u32,
    quiet: Duration,
) -> anyhow::Result<()> {
    let mut con = sqlx::PgConnection::connect(database_url)
        .await
        .context("the idle probe adds tenants to the daemon's Postgres")?;
    tokio::time::sleep(SETTLE).await;
    let alone = busy(watched, quiet).await;
    sqlx::query(
        "INSERT INTO tenants (id) SELECT $1 || g FROM generate_series(1, $2) g
         ON CONFLICT DO NOTHING",
    )
    .bind(PREFIX)
    .bind(i64::from(tenants))
    .execute(&mut con)
    .await?;
    tokio::time::sleep(SETTLE).await;
    let crowded = busy(watched, quiet).await;
    sqlx::query("DELETE FROM tenants WHERE id LIKE $1 || '%'")
        .bind(PREFIX)
        .execute(&mut con)
        .await?;
    println!("probe: idle added_tenants=0 cpu_pct={alone}");
    println!("probe: idle added_tenants={tenants} cpu_pct={crowded}");
    Ok(())
}

/// Each process's share of one core over `quiet`, with no traffic.
pub(super) async fn busy(watched: &Watched, quiet: Duration) -> String {
    let before = watched.sample();
    let started = Instant::now();
    tokio::time::sleep(quiet).await;
    before.share(&watched.sample(), started.elapsed())
}

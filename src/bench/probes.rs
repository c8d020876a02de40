//! Measurements beside the workloads: Redis memory per active hold, and
//! what a 100-line reserve costs against ten single-line ones. The probes
//! with more to them have modules of their own (expiry, fallback, failover
//! and pg-outage, idle); the helpers here that make stock and holds serve
//! them too.

use std::time::{Duration, Instant};

use clap::ValueEnum;
use redis::AsyncCommands;
use tonic::transport::Channel;

use super::load::{Plan, drive};
use super::workloads::{Caller, Workload};
use crate::grpc::pb;

/// A probe's name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Probe {
    /// Redis bytes per active single-line hold (INFO memory over N
    /// holds), then per finished claim (N claims, kept for retries).
    Memory,
    /// One 100-line reserve against ten single-line reserves.
    Batch,
    /// N holds expiring within the same second: sweeper lag, claim rate.
    Expiry,
    /// Claims served by the Postgres fallback while Redis is frozen,
    /// against pgbench's hot-row UPDATE (needs Redis on loopback; runs in
    /// `fallback.rs`).
    Fallback,
    /// Claims at a steady rate (`--rate`, 1,000/s when absent) through a
    /// Redis freeze of `--duration` seconds and its thaw: calls failed,
    /// time until answered again, time until Redis serves again (needs
    /// Redis on loopback; runs in `failover.rs`).
    Failover,
    /// The same through a Postgres freeze: calls failed, and the time
    /// until the drainer has caught up after the thaw (needs Postgres on
    /// this machine; runs in `failover.rs`).
    PgOutage,
    /// Each process's CPU with no traffic, alone and with `--tenants`
    /// more tenants that do nothing (runs in `idle.rs`).
    Idle,
    /// What N operations of each --workload (claim-hot and
    /// reserve-commit when none is named) leave in Postgres: table and
    /// index bytes, audit-log bytes and WAL per operation (needs the
    /// daemon's Postgres as --database-url; runs in `pg_growth.rs`).
    PgGrowth,
    /// How fast a Watch subscriber resuming before N claims that the
    /// Redis stream no longer keeps gets them from Postgres (the bench's
    /// own daemon only; runs in `watch_replay.rs`).
    WatchReplay,
    /// A storefront's reads (`GetSale`, `GetStockLevels`, a day of
    /// `GetAvailability`) each flat out, beside the no-op RPC; then
    /// claim-hot alone and beside 2,000 `GetSale`s a second, a busy
    /// storefront's page views (runs in `reads.rs`).
    Reads,
    /// A steady mix (`--rate`, 2,000/s when absent) of the --workload
    /// workloads (claim-hot, reserve-commit, reserve-release and
    /// slot-confirm when none is named) and abandoned carts for
    /// `--duration` seconds: what grows with the operations served, and
    /// whether they cost more as the daemon runs (runs in `soak.rs`).
    Soak,
    /// Claim-hot by each crowd of `--crowds` clients, every call with a
    /// deadline (`--deadline-ms`) after which its client gives it up and
    /// presses again: what a stampede past the machine's peak gets
    /// answered in time, and what it sells to calls that gave up (runs in
    /// `stampede.rs`).
    Stampede,
    /// A sale of 1,000 claimed by each crowd of `--crowds` clients until
    /// `--duration` ends: how long it takes to sell out, and whether every
    /// buyer is answered while Redis asks for grant after grant (runs in
    /// `opening.rs`).
    Opening,
    /// The --workload workloads (claim-hot when none is named) spread
    /// over each count of `--shops` tenants in turn, on a daemon of its
    /// own with a key per shop: what many shops selling at once cost, and
    /// what a quiet shop waits beside another's stampede (runs in
    /// `shops.rs`, after every other probe).
    Shops,
    /// The --workload workloads (claim-hot when none is named) and the
    /// no-op RPC on a daemon started plaintext, then with TLS (a
    /// certificate made by `openssl`), by turns: what TLS costs a call;
    /// with `Connections` too, that probe again on a daemon serving TLS
    /// (runs in `tls.rs`, after every other probe).
    Tls,
    /// Claims at a steady rate (`--rate`, 1,000/s when absent) through a
    /// SIGTERM of a daemon of its own and its start again on the same
    /// ports: how long a deploy leaves the shoppers without answers, and
    /// whether a call caught by it is lost (runs in `restart.rs`, after
    /// every other probe).
    Restart,
    /// Claim-hot alone, then `--idle-connections` connections opened
    /// (each after one no-op call) and left idle: how fast they open, the
    /// daemon's memory and descriptors per connection, each process's CPU
    /// with them idle, and claim-hot beside them (the bench's own daemon
    /// only; runs in `conns.rs`).
    Connections,
    /// Each count of `--watchers` `Watch` subscribers on a connection of
    /// their own while claim-hot runs: what they cost the claims, and how
    /// long an event takes to reach them (runs in `watch.rs`).
    Watch,
    /// `--tenants` quiet shops with a `Watch` subscriber each, on a daemon
    /// of its own with a key per shop: each process's CPU without and
    /// with them, the Redis connections their readers hold, and an event
    /// reaching each (runs in `watch_tenants.rs`, after every other
    /// probe).
    WatchTenants,
    /// lock-complete at `--rate` (200/s when absent) on cards listed on
    /// `--listings` channels (at least 2), each other channel with a
    /// satellite (an HTTP sink in the bench), on a daemon of its own: how
    /// soon and how fast the outbox tells the satellites of each sale
    /// (runs in `webhooks.rs`, after every other probe).
    Webhooks,
}

pub(super) fn reserve_req(id: String, products: &[String], ttl_ms: u64) -> pb::ReserveRequest {
    pb::ReserveRequest {
        reservation_id: id,
        reference: String::new(),
        lines: products
            .iter()
            .map(|p| pb::ReservationLine {
                key: Some(pb::StockKey {
                    product_id: p.clone(),
                    variant_id: String::new(),
                }),
                quantity: 1,
            })
            .collect(),
        ttl: Some(prost_types::Duration {
            seconds: (ttl_ms / 1000) as i64,
            nanos: ((ttl_ms % 1000) * 1_000_000) as i32,
        }),
    }
}

pub(super) async fn stock(
    ch: &Channel,
    c: &Caller,
    product: &str,
    on_hand: i64,
) -> anyhow::Result<()> {
    pb::reservation_service_client::ReservationServiceClient::new(ch.clone())
        .set_stock(c.req(pb::SetStockRequest {
            key: Some(pb::StockKey {
                product_id: product.into(),
                variant_id: String::new(),
            }),
            on_hand,
            adjustment_id: format!("a{}{product}", c.tag),
            reason: "bench".into(),
        }))
        .await?;
    Ok(())
}

/// Makes `n` single-line holds of `product` from `clients` tasks, each
/// with `ttl_ms(i)`; returns how many were made.
pub(super) async fn make_holds(
    channels: &[Channel],
    c: &Caller,
    product: &str,
    prefix: &str,
    n: u64,
    clients: usize,
    ttl_ms: impl Fn() -> u64 + Send + Sync + 'static,
) -> u64 {
    let plan = Plan {
        clients,
        duration: Duration::from_secs(120),
        rate: None,
        max_calls: Some(n),
    };
    let (c2, product, prefix) = (c.clone(), vec![product.to_string()], prefix.to_string());
    let ttl_ms = std::sync::Arc::new(ttl_ms);
    let run = drive(channels, &plan, move |ch, i| {
        let (c, product, prefix, ttl_ms) =
            (c2.clone(), product.clone(), prefix.clone(), ttl_ms.clone());
        async move {
            let req = reserve_req(format!("{prefix}{i}"), &product, ttl_ms());
            pb::reservation_service_client::ReservationServiceClient::new(ch)
                .reserve(c.req(req))
                .await?;
            Ok(super::load::Done::ok("held", 1))
        }
    })
    .await;
    run.units
}

/// What a finished claim costs Redis: each is remembered for
/// `--retention-secs` (a day by default) so that a retry answers as the
/// first call did, and a flash sale makes them by the hundred thousand.
/// Measured as the memory probe measures holds: right after, and once
/// their events are past the keep. The bench's claim ids are 13-16
/// characters; a UUID adds about 24 bytes.
async fn claims_memory(
    channels: &[Channel],
    c: &Caller,
    con: &mut redis::aio::MultiplexedConnection,
    clients: usize,
    n: u64,
) -> anyhow::Result<()> {
    let before = used_memory(con).await?;
    let stream_before = stream_memory(con).await?;
    let plan = Plan {
        clients,
        duration: Duration::from_secs(120),
        rate: None,
        max_calls: Some(n),
    };
    let made = super::workloads::run(Workload::ClaimHot, channels, &plan, c)
        .await
        .units;
    let after = used_memory(con).await?;
    let stream = stream_memory(con).await? - stream_before;
    let per = |bytes: i64| bytes as f64 / made.max(1) as f64;
    let steady = if events_trimmed(con, stream_before, stream).await? {
        format!("{:.0}", per(used_memory(con).await? - before))
    } else {
        "unknown".to_string()
    };
    println!(
        "bench-probe: memory claims={made} bytes_per_claim={:.0} of_which_event_log={:.0} bytes_per_claim_events_trimmed={steady}",
        per(after - before),
        per(stream)
    );
    Ok(())
}

/// The daemon's /metrics page at `metrics` (host:port); empty if it does
/// not answer within a second.
pub(super) async fn scrape(metrics: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        let mut s = tokio::net::TcpStream::connect(metrics).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The value of the gauge `name` on a /metrics `page`, if it has one.
pub(super) fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

/// Redis's `used_memory` (INFO memory), bytes.
pub(super) async fn used_memory(
    con: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<i64> {
    super::redis_time::info_number(con, "memory", "used_memory")
        .await
        .ok_or_else(|| anyhow::anyhow!("no used_memory in Redis's INFO"))
}

/// What the tenant's event stream takes (every entry counted: SAMPLES 0).
/// The stream keeps each event for `--event-keep-secs` after it is
/// drained, so part of what a burst of holds costs for that long is its
/// log, not the holds.
async fn stream_memory(con: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<i64> {
    let bytes: Option<i64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg("hf:{dev}:events")
        .arg("SAMPLES")
        .arg(0)
        .query_async(con)
        .await?;
    Ok(bytes.unwrap_or(0))
}

/// Waits (at most two minutes) until the drainer has trimmed all but 5% of
/// the `grown` bytes the stream gained over `before`; false if it did not.
async fn events_trimmed(
    con: &mut redis::aio::MultiplexedConnection,
    before: i64,
    grown: i64,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if stream_memory(con).await? <= before + grown / 20 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(false)
}

/// Runs `probe` and prints its `bench-probe:` line.
pub async fn run(
    probe: Probe,
    channels: &[Channel],
    c: &Caller,
    redis_url: &str,
    clients: usize,
    holds: u64,
) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let ch = &channels[0];
    match probe {
        Probe::Fallback
        | Probe::Failover
        | Probe::PgOutage
        | Probe::Idle
        | Probe::Expiry
        | Probe::PgGrowth
        | Probe::WatchReplay
        | Probe::Reads
        | Probe::Soak
        | Probe::Stampede
        | Probe::Opening
        | Probe::Shops
        | Probe::Tls
        | Probe::Restart
        | Probe::Connections
        | Probe::Watch
        | Probe::WatchTenants
        | Probe::Webhooks => {
            unreachable!("bench::run sends these probes to their own modules")
        }
        Probe::Memory => {
            let product = format!("mem{}", c.tag);
            stock(ch, c, &product, holds as i64 * 2).await?;
            // One hold first, so the pool and scripts exist before counting.
            make_holds(channels, c, &product, &format!("m{}w", c.tag), 1, 1, || {
                600_000
            })
            .await;
            let before = used_memory(&mut con).await?;
            let stream_before = stream_memory(&mut con).await?;
            let made = make_holds(
                channels,
                c,
                &product,
                &format!("m{}n", c.tag),
                holds,
                clients,
                || 600_000,
            )
            .await;
            let after = used_memory(&mut con).await?;
            let stream = stream_memory(&mut con).await? - stream_before;
            let active: Option<u64> = con.get("hf:{dev}:active").await?;
            let active = active.unwrap_or(0);
            let per = |bytes: i64| bytes as f64 / made.max(1) as f64;
            // Then what the holds cost once their events are in Postgres
            // and past the keep (60 s by default): the steady state of holds
            // that live longer than that.
            let trimmed = events_trimmed(&mut con, stream_before, stream).await?;
            let steady = if trimmed {
                format!("{:.0}", per(used_memory(&mut con).await? - before))
            } else {
                "unknown".to_string()
            };
            println!(
                "bench-probe: memory holds={made} active_holds={active} bytes_per_hold={:.0} of_which_event_log={:.0} hold_state={:.0} bytes_per_hold_events_trimmed={steady}",
                per(after - before),
                per(stream),
                per(after - before - stream)
            );
            claims_memory(channels, c, &mut con, clients, holds).await?;
        }
        Probe::Batch => {
            let products: Vec<String> = (0..100).map(|i| format!("bt{}p{i}", c.tag)).collect();
            for p in &products {
                stock(ch, c, p, 1_000_000).await?;
            }
            let mut client =
                pb::reservation_service_client::ReservationServiceClient::new(ch.clone());
            let rounds = 200u32;
            // Warm both paths, then time them one call at a time.
            for (i, n) in [(0u32, 100usize), (1, 1)] {
                client
                    .reserve(c.req(reserve_req(
                        format!("bw{}{i}", c.tag),
                        &products[..n],
                        60_000,
                    )))
                    .await?;
            }
            let started = Instant::now();
            for r in 0..rounds {
                client
                    .reserve(c.req(reserve_req(format!("bb{}{r}", c.tag), &products, 60_000)))
                    .await?;
            }
            let batch = started.elapsed() / rounds;
            let started = Instant::now();
            for r in 0..rounds * 10 {
                let p = &products[(r % 100) as usize..(r % 100) as usize + 1];
                client
                    .reserve(c.req(reserve_req(format!("bs{}{r}", c.tag), p, 60_000)))
                    .await?;
            }
            let single = started.elapsed() / rounds;
            println!(
                "bench-probe: batch lines=100 batch_us={} ten_single_us={} ratio={:.2}",
                batch.as_micros(),
                single.as_micros(),
                batch.as_secs_f64() / single.as_secs_f64()
            );
        }
    }
    Ok(())
}

//! How soon the other channels hear of a card's sale. A card listed on
//! several channels is sold on one, and each other channel's satellite is
//! sent a `bulk-disengage` webhook from the outbox (README, "Webhooks,
//! for satellite implementers"); until it arrives that channel still
//! lists a sold card. A shop planning a drop of rare cards asks how many
//! sales a second its satellites can be told of, and how late.
//!
//! The probe starts a daemon of its own (`serve --dev`, as the bench's),
//! lists lock-complete's cards on the storefront and `--listings` - 1
//! other channels (2 when absent or 1: the storefront and ebay), gives
//! each other channel a satellite, a loopback HTTP sink in this process
//! that answers every webhook 200 at once without checking its signature
//! (and counts the connections they came on),
//! and drives lock-complete at `--rate` (200 a second when absent) for
//! `--duration` seconds. Then it waits, up to [`WAIT`], for every
//! webhook of the run to be queued and delivered, and reads from the
//! outbox how long each waited there (`created_at` to `delivered_at`),
//! how many were delivered a second, and what they added to the outbox.
//!
//! With `--satellite-down`, ebay's satellite answers 503 until the sales
//! end and 200 after: a shop asks what a channel's outage through a drop
//! costs the sales and the other satellites, and how soon that channel
//! hears of every sale once it is back. Back, it calls `RetryDeliveries`,
//! as a satellite may when it starts. The line then gives the down
//! satellite's backlog at the end of the sales and how long after them it
//! had every webhook (`down_caught_up_s`), and the waits are the
//! satellites' that stayed up.
//! With `--satellite-delay-ms`, every satellite answers each webhook that
//! much later, as one that far away would: a satellite is told of one
//! change a round trip, and a shop whose satellites run far from the
//! daemon asks how far behind a drop leaves them; with
//! `--satellite-batch`, of that many a round trip.
//! Every run gives each process's CPU a sale (`cpu_us_per_sale`), where
//! an outbox whose rounds grow with a backlog shows.
//!
//! It runs after every other probe, and removes the satellites it
//! registered when it ends (no RPC removes one, so it does in Postgres):
//! left, they would point the workspace's channels at a port nothing
//! answers, and a later `--listings` run or this probe again would refuse
//! the workspace.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::load::Plan;
use super::workloads::{self, Caller, OTHER_CHANNELS, Workload};
use super::{BenchArgs, Daemon, DaemonAuth, connections, cpu};
use crate::grpc::pb;

/// Card sales a second when `--rate` is absent: a busy drop, far past
/// what one webhook a round (five a second) could tell a satellite of.
pub const DEFAULT_RATE: f64 = 200.0;
/// How long the probe waits, after the run, for its webhooks to be
/// delivered before it reports what it has.
const WAIT: Duration = Duration::from_secs(120);
/// The outbox's newest row id, and its table's and indexes' bytes: a
/// delivered row is kept (`ListDeliveries` shows it), so what the run
/// added stays.
const OUTBOX_NOW: &str =
    "SELECT coalesce(max(id), 0), pg_total_relation_size('outbox') FROM outbox";
/// The satellites' signing secret (16-256 characters).
const SECRET: &str = "bench-satellite-secret";
/// The path under the sink's address of the satellite that is down
/// (`--satellite-down`): the sink answers 503 there while it is.
const DOWN_PATH: &str = "/down";

/// The probe registers satellites, so it needs a workspace of its own.
pub fn check(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.addr.is_none(),
        "the webhooks probe gives channels satellites on a daemon of its own; it cannot run against --addr"
    );
    Ok(())
}

/// Runs the probe and prints its `bench-probe: webhooks` line.
pub async fn run(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    check(args)?;
    let mut daemon = Daemon::start(args, dir, DaemonAuth::Dev, None)?;
    let channels = connections(&daemon.addr(), None, args.connections).await?;
    // With one satellite down, at least one stays up beside it.
    let listings = args.listings.max(if args.satellite_down { 3 } else { 2 });
    let caller = Caller::new(None).with_listings(listings);
    workloads::setup(Workload::LockComplete, &channels[0], &caller).await?;
    let sink = Sink::start(Duration::from_millis(args.satellite_delay_ms)).await?;
    let others = &OTHER_CHANNELS[..listings as usize - 1];
    let down = args.satellite_down.then_some(others[0]);
    sink.down.store(down.is_some(), Ordering::Relaxed);
    let mut registry = pb::channel_service_client::ChannelServiceClient::new(channels[0].clone());
    for channel in others {
        let path = if Some(*channel) == down {
            DOWN_PATH
        } else {
            ""
        };
        registry
            .put_satellite(caller.req(pb::PutSatelliteRequest {
                channel: (*channel).into(),
                base_url: format!("{}{path}", sink.base_url),
                secret: SECRET.into(),
                batch_size: args.satellite_batch,
            }))
            .await?;
    }
    let watched = cpu::Watched::find(Some(daemon.pid()), &args.redis_url, &args.database_url).await;
    let mut pg = PgConnection::connect(&args.database_url).await?;
    let (before, bytes_before): (i64, i64) = sqlx::query_as(OUTBOX_NOW).fetch_one(&mut pg).await?;

    let rate = args.rate.unwrap_or(DEFAULT_RATE);
    let plan = Plan {
        clients: args.clients,
        duration: Duration::from_secs(args.duration),
        rate: Some(rate),
        max_calls: None,
    };
    let cpu_before = watched.sample();
    let run = workloads::run(Workload::LockComplete, &channels, &plan, &caller).await;
    let cpu = cpu_before.per_op(&watched.sample(), run.units);
    let ended = Instant::now();
    // The down satellite's backlog as the sales end, and when that was by
    // Postgres's clock, which stamps the deliveries.
    let (down_backlog, sales_ended): (i64, f64) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM clock_timestamp())::float8 FROM outbox
         WHERE id > $1 AND channel = $2 AND state = 'pending'",
    )
    .bind(before)
    .bind(down.unwrap_or(""))
    .fetch_one(&mut pg)
    .await?;
    sink.down.store(false, Ordering::Relaxed);
    if let Some(channel) = down {
        // Back, it says so, as a satellite does when it starts: its
        // backlog goes now, not at its next attempt (up to
        // `--webhook-backoff-max-secs` away).
        registry
            .retry_deliveries(caller.req(pb::RetryDeliveriesRequest {
                channel: channel.into(),
            }))
            .await?;
    }
    let expected = run.units * others.len() as u64;
    let (queued, pending) = loop {
        let (queued, pending): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE state = 'pending') FROM outbox WHERE id > $1",
        )
        .bind(before)
        .fetch_one(&mut pg)
        .await?;
        if (queued as u64 >= expected && pending == 0) || ended.elapsed() > WAIT {
            break (queued, pending);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let delivered_after = ended.elapsed();
    // The satellites that stayed up: the waits, and the rate they were
    // told at.
    let waits: (i64, Option<f64>, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY w), percentile_cont(0.99) WITHIN GROUP (ORDER BY w),
                max(w), extract(epoch FROM max(delivered_at) - min(created_at))::float8
         FROM (SELECT extract(epoch FROM delivered_at - created_at)::float8 * 1000 AS w, delivered_at, created_at
               FROM outbox WHERE id > $1 AND state = 'delivered' AND channel <> $2) d",
    )
    .bind(before)
    .bind(down.unwrap_or(""))
    .fetch_one(&mut pg)
    .await?;
    let down_caught_up: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(delivered_at))::float8 FROM outbox
         WHERE id > $1 AND channel = $2 AND NOT EXISTS
             (SELECT 1 FROM outbox WHERE id > $1 AND channel = $2 AND state = 'pending')",
    )
    .bind(before)
    .bind(down.unwrap_or(""))
    .fetch_one(&mut pg)
    .await?;

    let (_, bytes_after): (i64, i64) = sqlx::query_as(OUTBOX_NOW).fetch_one(&mut pg).await?;
    sqlx::query("DELETE FROM satellites WHERE workspace = $1 AND channel = ANY($2)")
        .bind(crate::grpc::auth::DEV_TENANT)
        .bind(others)
        .execute(&mut pg)
        .await?;
    pg.close().await?;
    daemon.stop();

    let (delivered_up, p50, p99, max, span) = waits;
    let delivered = queued - pending;
    let up = others.len() - usize::from(down.is_some());
    let per_satellite = match span {
        Some(s) if s > 0.0 => delivered_up as f64 / up as f64 / s,
        _ => 0.0,
    };
    let down_line = match down {
        None => String::new(),
        Some(channel) => format!(
            " down={channel} down_backlog_at_sales_end={down_backlog} down_caught_up_s={}",
            down_caught_up.map_or_else(|| "-".to_owned(), |t| format!("{:.2}", t - sales_ended)),
        ),
    };
    let bytes_per_webhook = (bytes_after - bytes_before) as f64 / queued.max(1) as f64;
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    println!(
        "bench-probe: webhooks listings={listings} satellites={} rate={rate} sales={} sales_per_s={:.0} batch={} webhooks={expected} queued={queued} delivered={delivered} sink_got={} sink_connections={} pending_after_wait={pending} delivered_after_s={:.2} wait_p50_ms={} wait_p99_ms={} wait_max_ms={} delivered_per_satellite_per_s={per_satellite:.0} outbox_bytes_per_webhook={bytes_per_webhook:.0} cpu_us_per_sale={cpu}{down_line}",
        others.len(),
        run.units,
        run.units as f64 / run.elapsed.as_secs_f64(),
        args.satellite_batch.max(1),
        sink.got.load(Ordering::Relaxed),
        sink.connections.load(Ordering::Relaxed),
        delivered_after.as_secs_f64(),
        ms(p50),
        ms(p99),
        ms(max),
    );
    Ok(())
}

/// The satellites' end: an HTTP/1.1 server on a loopback port that answers
/// each webhook `200 {"ok":true}` over a kept-alive connection, as a web
/// framework would, counting them and the connections they came on, and
/// anything else (a reconcile's list pull) 503, which leaves the channel's
/// rows as they are. While `down`, a webhook under [`DOWN_PATH`] is
/// answered 503 too, as a satellite behind a load balancer with no
/// healthy backend is. With `--satellite-delay-ms`, each webhook's
/// answer waits that long first. A batch of webhooks is one request, and
/// counts as one in `got` (the line's `sink_got`).
struct Sink {
    base_url: String,
    down: Arc<AtomicBool>,
    got: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start(delay: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let down = Arc::new(AtomicBool::new(false));
        let got = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (is_down, counter, opened) = (down.clone(), got.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                opened.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(answer(socket, is_down.clone(), counter.clone(), delay));
            }
        });
        Ok(Self {
            base_url,
            down,
            got,
            connections,
            task,
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers one connection's requests in turn until the client closes it.
async fn answer(
    mut socket: TcpStream,
    down: Arc<AtomicBool>,
    got: Arc<AtomicU64>,
    delay: Duration,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = socket.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = socket.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..head_end + length);
        let refused =
            head.starts_with(&format!("post {DOWN_PATH}/")) && down.load(Ordering::Relaxed);
        // One webhook (`/webhooks/<event>`) or a batch (`/webhooks`).
        let webhook = head.starts_with("post /webhooks")
            || head.starts_with(&format!("post {DOWN_PATH}/webhooks"));
        if webhook && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let reply: &[u8] = if webhook && !refused {
            got.fetch_add(1, Ordering::Relaxed);
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"
        } else {
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
        };
        socket.write_all(reply).await?;
    }
}

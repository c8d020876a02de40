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
//! It runs after every other probe, and removes the satellites it
//! registered when it ends (no RPC removes one, so it does in Postgres):
//! left, they would point the workspace's channels at a port nothing
//! answers, and a later `--listings` run or this probe again would refuse
//! the workspace.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::load::Plan;
use super::workloads::{self, Caller, OTHER_CHANNELS, Workload};
use super::{BenchArgs, Daemon, DaemonAuth, connections};
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
    let listings = args.listings.max(2);
    let caller = Caller::new(None).with_listings(listings);
    workloads::setup(Workload::LockComplete, &channels[0], &caller).await?;
    let sink = Sink::start().await?;
    let others = &OTHER_CHANNELS[..listings as usize - 1];
    let mut registry = pb::channel_service_client::ChannelServiceClient::new(channels[0].clone());
    for channel in others {
        registry
            .put_satellite(caller.req(pb::PutSatelliteRequest {
                channel: (*channel).into(),
                base_url: sink.base_url.clone(),
                secret: SECRET.into(),
            }))
            .await?;
    }
    let mut pg = PgConnection::connect(&args.database_url).await?;
    let (before, bytes_before): (i64, i64) = sqlx::query_as(OUTBOX_NOW).fetch_one(&mut pg).await?;

    let rate = args.rate.unwrap_or(DEFAULT_RATE);
    let plan = Plan {
        clients: args.clients,
        duration: Duration::from_secs(args.duration),
        rate: Some(rate),
        max_calls: None,
    };
    let run = workloads::run(Workload::LockComplete, &channels, &plan, &caller).await;
    let ended = Instant::now();
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
    let waits: (Option<f64>, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY w), percentile_cont(0.99) WITHIN GROUP (ORDER BY w),
                max(w), extract(epoch FROM max(delivered_at) - min(created_at))::float8
         FROM (SELECT extract(epoch FROM delivered_at - created_at)::float8 * 1000 AS w, delivered_at, created_at
               FROM outbox WHERE id > $1 AND state = 'delivered') d",
    )
    .bind(before)
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

    let (p50, p99, max, span) = waits;
    let delivered = queued - pending;
    let per_satellite = match span {
        Some(s) if s > 0.0 => delivered as f64 / others.len() as f64 / s,
        _ => 0.0,
    };
    let bytes_per_webhook = (bytes_after - bytes_before) as f64 / queued.max(1) as f64;
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    println!(
        "bench-probe: webhooks listings={listings} satellites={} rate={rate} sales={} sales_per_s={:.0} webhooks={expected} queued={queued} delivered={delivered} sink_got={} sink_connections={} pending_after_wait={pending} delivered_after_s={:.2} wait_p50_ms={} wait_p99_ms={} wait_max_ms={} delivered_per_satellite_per_s={per_satellite:.0} outbox_bytes_per_webhook={bytes_per_webhook:.0}",
        others.len(),
        run.units,
        run.units as f64 / run.elapsed.as_secs_f64(),
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
/// rows as they are.
struct Sink {
    base_url: String,
    got: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let got = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (counter, opened) = (got.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                opened.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(answer(socket, counter.clone()));
            }
        });
        Ok(Self {
            base_url,
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
async fn answer(mut socket: TcpStream, got: Arc<AtomicU64>) -> std::io::Result<()> {
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
        let reply: &[u8] = if head.starts_with("post /webhooks/") {
            got.fetch_add(1, Ordering::Relaxed);
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"
        } else {
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
        };
        socket.write_all(reply).await?;
    }
}

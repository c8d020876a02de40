//! How fast a `Watch` subscriber that was away catches up
//! (`--probe watch-replay`): `--holds` claims, their events drained to
//! Postgres and trimmed from the Redis stream (as the keep would after a
//! minute), then a subscriber resuming from before the first of them,
//! timed until it has the last. Every event comes from Postgres, 500 a
//! page (`PgStore::events_between`), so this is what a storefront's
//! listener sees after a restart or a network cut longer than
//! `--event-keep-secs`.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::pg_growth::run_written;
use super::workloads::{self, Caller, Workload};
use crate::domain::parse_event_id;
use crate::grpc::pb;

/// What one replay took.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// Events of the run the subscriber received.
    pub events: u64,
    /// From the resume call until the run's last event arrived.
    pub elapsed: Duration,
    /// Whether they came in stream order, each once.
    pub in_order: bool,
}

impl Replay {
    /// The probe's report line.
    pub fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        format!(
            "bench-probe: watch-replay events={} seconds={secs:.2} events_per_sec={:.0} in_order={}",
            self.events,
            self.events as f64 / secs.max(1e-9),
            self.in_order
        )
    }
}

/// Runs the probe against the daemon at `channels`, whose Postgres is
/// `database_url` and whose tenant's event stream is `stream` in the Redis
/// at `redis_url`.
pub async fn run(
    channels: &[Channel],
    caller: &Caller,
    database_url: &str,
    redis_url: &str,
    stream: &str,
    clients: usize,
    n: u64,
) -> anyhow::Result<Replay> {
    let caller = &caller.retagged();
    workloads::setup(Workload::ClaimHot, &channels[0], caller).await?;
    let mut pg = PgConnection::connect(database_url).await?;
    let (made, _) = run_written(Workload::ClaimHot, channels, caller, clients, n, &mut pg).await?;
    let pattern = format!("c{}n%", caller.tag);
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM audit_log WHERE hold_id LIKE $1")
            .bind(&pattern)
            .fetch_all(&mut pg)
            .await?;
    pg.close().await?;
    let mut ids: Vec<(u64, u64)> = ids.iter().filter_map(|i| parse_event_id(i)).collect();
    ids.sort_unstable();
    let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
        anyhow::bail!("the run made no claim");
    };

    // The stream forgets the run, as its keep would: every event of it is
    // in Postgres now.
    let mut con = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let _: i64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg(format!("{}-{}", last.0, last.1 + 1))
        .query_async(&mut con)
        .await?;

    // Resume from just before the run's first event.
    let after = match first {
        (ms, 0) => format!("{}-{}", ms - 1, u64::MAX),
        (ms, seq) => format!("{ms}-{}", seq - 1),
    };
    let mut client = pb::event_service_client::EventServiceClient::new(channels[0].clone());
    let started = Instant::now();
    let mut stream = client
        .watch(caller.req(pb::WatchRequest {
            after_event_id: after,
        }))
        .await?
        .into_inner();
    let prefix = format!("c{}n", caller.tag);
    let (mut events, mut previous, mut in_order) = (0u64, None, true);
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), stream.next()).await? {
        let event = event?;
        let Some(id) = parse_event_id(&event.event_id) else {
            anyhow::bail!(
                "Watch sent an event id that is not a stream id: {}",
                event.event_id
            );
        };
        in_order &= previous.is_none_or(|p| p < id);
        previous = Some(id);
        if event.hold_id.starts_with(&prefix) {
            events += 1;
        }
        if id >= last {
            break;
        }
    }
    Ok(Replay {
        events,
        elapsed: started.elapsed(),
        in_order: in_order && events == made,
    })
}

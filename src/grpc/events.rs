//! `holdfast.v1.EventService`: the tenant's events as a server stream.
//!
//! Each subscriber gets a reader task of its own on a Redis connection of
//! its own (`XREAD BLOCK` from its cursor), so subscribers never touch the
//! hot path's connection. Events older than the stream's retention come
//! from Postgres's audit log first, so resuming from any id has no gap.
//! The buffer towards the client is bounded: a subscriber that does not
//! keep up is ended with ABORTED naming the last event it was sent.

use std::time::Duration;

use redis::streams::{StreamRangeReply, StreamReadOptions, StreamReadReply};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::{Auth, Role};
use super::convert::to_timestamp;
use super::pb;
use super::pb::event_service_server::EventService;
use super::{meter, observe};
use crate::domain::{Event, TenantId, parse_event_id};
use crate::error::Error;
use crate::store::postgres::PgStore;
use crate::store::redis::{RedisStore, decode_event};

const SERVICE: &str = "EventService";
/// Events buffered towards one subscriber before it counts as fallen behind.
const BUFFER: usize = 1024;
/// How long one blocking read waits (also how soon a shutdown is noticed).
const BLOCK: Duration = Duration::from_millis(500);
/// Events per read.
const BATCH: usize = 200;

/// The adapter for `Watch`.
pub struct EventApi {
    redis: RedisStore,
    pg: PgStore,
    auth: std::sync::Arc<Auth>,
    stopping: watch::Receiver<bool>,
}

impl EventApi {
    /// An adapter reading the tenants' streams; `stopping` ends every
    /// subscription when the daemon shuts down.
    pub fn new(
        redis: RedisStore,
        pg: PgStore,
        auth: std::sync::Arc<Auth>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            redis,
            pg,
            auth,
            stopping,
        }
    }
}

type Item = Result<pb::WatchResponse, Status>;

#[tonic::async_trait]
impl EventService for EventApi {
    type WatchStream = ReceiverStream<Item>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tenant, after) = observe(meter!(SERVICE, "Watch"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().after_event_id)
                .await?;
            let after = &request.get_ref().after_event_id;
            let after = if after.is_empty() {
                None
            } else {
                Some(parse_event_id(after).ok_or_else(|| {
                    Error::invalid("after_event_id", "must be an event id like 1700000000000-0")
                })?)
            };
            Ok((caller.tenant, after))
        })
        .await?
        .into_inner();
        // "From now" is fixed here, before the subscriber gets its stream:
        // an event of a call it makes right after subscribing is after it.
        let start = match after {
            Some(after) => Start::After(after),
            None => Start::At(
                latest(&self.redis, &tenant)
                    .await
                    .map_err(|e| Status::from(Error::from(e)))?,
            ),
        };
        let (tx, rx) = mpsc::channel(BUFFER + 1);
        let pump = Pump {
            redis: self.redis.clone(),
            pg: self.pg.clone(),
            tenant,
            tx,
            stopping: self.stopping.clone(),
            last_sent: None,
        };
        tokio::spawn(pump.run(start));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Where a subscription starts.
#[derive(Clone, Copy)]
enum Start {
    /// After this event id (the client's cursor): replayed from Postgres
    /// where Redis no longer keeps it.
    After(EventPos),
    /// After the stream's newest entry when the subscription was accepted
    /// (`(0, 0)` for an empty stream).
    At(EventPos),
}

/// The id of the tenant's newest event in Redis, `(0, 0)` when none.
async fn latest(redis: &RedisStore, tenant: &TenantId) -> Result<EventPos, redis::RedisError> {
    let last: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(redis.keys().events(tenant))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut redis.multiplexed())
        .await?;
    Ok(last
        .ids
        .first()
        .and_then(|e| parse_event_id(&e.id))
        .unwrap_or((0, 0)))
}

/// One subscriber's reader.
struct Pump {
    redis: RedisStore,
    pg: PgStore,
    tenant: TenantId,
    tx: mpsc::Sender<Item>,
    stopping: watch::Receiver<bool>,
    last_sent: Option<String>,
}

/// Why a pump stopped sending.
enum Stop {
    /// The client went away.
    Gone,
    /// Tell the client this, then stop.
    Status(Status),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Status(e.into())
    }
}

impl From<redis::RedisError> for Stop {
    fn from(e: redis::RedisError) -> Self {
        Stop::Status(Error::from(e).into())
    }
}

impl Pump {
    async fn run(mut self, start: Start) {
        if let Err(Stop::Status(status)) = self.stream(start).await {
            let _ = self.tx.send(Err(status)).await;
        }
    }

    fn resume_hint(&self) -> String {
        match &self.last_sent {
            Some(id) => format!("resume with after_event_id={id}"),
            None => "resume with the after_event_id you started from".into(),
        }
    }

    async fn send(&mut self, event: Event) -> Result<(), Stop> {
        if self.tx.is_closed() {
            return Err(Stop::Gone);
        }
        // One slot is kept for the final status.
        if self.tx.capacity() <= 1 {
            return Err(Stop::Status(Status::aborted(format!(
                "subscriber fell behind; {}",
                self.resume_hint()
            ))));
        }
        let id = event.event_id.clone();
        self.tx
            .send(Ok(event_pb(event)))
            .await
            .map_err(|_| Stop::Gone)?;
        self.last_sent = Some(id);
        Ok(())
    }

    async fn stream(&mut self, start: Start) -> Result<(), Stop> {
        let mut con = self.redis.dedicated(BLOCK + Duration::from_secs(2)).await?;
        let key = self.redis.keys().events(&self.tenant);
        let mut cursor = match start {
            Start::After(after) => {
                let first = oldest_in_stream(&mut con, &key).await?;
                self.replay(after, first).await?
            }
            Start::At(now) => now,
        };
        loop {
            if *self.stopping.borrow() {
                return Err(Stop::Status(Status::unavailable(format!(
                    "server shutting down; {}",
                    self.resume_hint()
                ))));
            }
            if self.tx.is_closed() {
                return Err(Stop::Gone);
            }
            let opts = StreamReadOptions::default()
                .count(BATCH)
                .block(BLOCK.as_millis() as usize);
            let reply: Option<StreamReadReply> = redis::AsyncCommands::xread_options(
                &mut con,
                &[&key],
                &[format!("{}-{}", cursor.0, cursor.1)],
                &opts,
            )
            .await?;
            let entries: Vec<_> = reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            // If the stream no longer starts at or before the cursor, it was
            // trimmed since (while we replayed history, or were slow), and
            // the entries between may be gone from it. The trim drops only
            // entries written to Postgres: they are sent from there first.
            if !entries.is_empty()
                && let Some(oldest) = oldest_in_stream(&mut con, &key).await?
                && oldest > cursor
            {
                cursor = self.replay(cursor, Some(oldest)).await?;
            }
            for entry in &entries {
                // Past what the replay sent (a trim between the two reads
                // can put some of these before `oldest`).
                if parse_event_id(&entry.id).is_some_and(|id| id <= cursor) {
                    continue;
                }
                let event = decode_event(entry)?;
                cursor = parse_event_id(&event.event_id).unwrap_or(cursor);
                self.send(event).await?;
            }
        }
    }

    /// Sends from Postgres the events after `after` that are older than the
    /// stream's oldest entry (`first`; none when the stream is empty), and
    /// returns where reading the stream picks up.
    async fn replay(&mut self, after: EventPos, first: Option<EventPos>) -> Result<EventPos, Stop> {
        if first.is_some_and(|f| f <= after) {
            return Ok(after);
        }
        let mut from = after;
        loop {
            let page = self
                .pg
                .events_between(&self.tenant, from, first, 500)
                .await?;
            let Some(last) = page.last() else { break };
            from = parse_event_id(&last.event_id).unwrap_or(from);
            for e in page {
                self.send(e).await?;
            }
        }
        Ok(from)
    }
}

/// An event id as (milliseconds, sequence), ordered as the stream orders.
type EventPos = (u64, u64);

/// The id of the oldest entry the stream still keeps, if any.
async fn oldest_in_stream(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Result<Option<EventPos>, Stop> {
    let oldest: StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(con)
        .await?;
    Ok(oldest.ids.first().and_then(|e| parse_event_id(&e.id)))
}

fn event_pb(e: Event) -> pb::WatchResponse {
    pb::WatchResponse {
        event_id: e.event_id,
        kind: e.kind,
        job: e.job,
        hold_id: e.hold_id,
        lines: e
            .lines
            .into_iter()
            .map(|l| pb::EventLine {
                pool_id: l.pool,
                quantity: l.qty,
            })
            .collect(),
        reference: e.reference,
        order_id: e.order_id,
        at: Some(to_timestamp(e.at)),
    }
}

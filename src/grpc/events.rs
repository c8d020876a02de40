//! `holdfast.v1.EventService`: the tenant's events as a server stream.
//!
//! A tenant's live subscribers share one reader of its stream, a tap
//! (`event_tap.rs`: `XREAD BLOCK` on a connection of its own, so readers
//! never touch the hot path's connection), and each subscriber's pump takes
//! the tap's batches from its own cursor on. What a pump's cursor is
//! behind the tap (a resume from an older id, batches lost while it was
//! busy) it reads itself, and events older than the stream's retention
//! come from Postgres's audit log first, so resuming from any id has no
//! gap. The buffer towards the client is bounded: a subscriber that does
//! not keep up is ended with ABORTED naming the last event it was sent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::streams::StreamRangeReply;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::{Auth, Role};
use super::convert::to_timestamp;
use super::event_tap::{Subscription, Taps};
use super::event_wire::encode;
use super::pb;
use super::{meter, observe};
use crate::domain::{Event, TenantId, parse_event_id};
use crate::error::Error;
use crate::store::postgres::PgStore;
use crate::store::redis::{RedisStore, decode_event};
use crate::telemetry::metric;

const SERVICE: &str = "EventService";
/// Events buffered towards one subscriber before it counts as fallen behind.
const BUFFER: usize = 1024;
/// Events per read.
pub(super) const BATCH: usize = 200;

/// The adapter for `Watch`.
pub struct EventApi {
    redis: RedisStore,
    pg: PgStore,
    auth: std::sync::Arc<Auth>,
    stopping: watch::Receiver<bool>,
    taps: Arc<Taps>,
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
            taps: Taps::new(redis.clone(), stopping.clone()),
            redis,
            pg,
            auth,
            stopping,
        }
    }
}

/// What a subscriber's stream carries: events encoded (once for all of a
/// tap's subscribers: `event_wire.rs`), or the status it ends with.
type Item = Result<Bytes, Status>;

/// A subscriber's stream.
pub type WatchStream = ReceiverStream<Item>;

impl EventApi {
    /// `Watch`: the caller's tenant's events from `after_event_id` on.
    pub async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
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
        let now = latest(&self.redis, &tenant)
            .await
            .map_err(|e| Status::from(Error::from(e)))?;
        let start = match after {
            Some(after) => Start::After(after),
            None => Start::At(now),
        };
        let (tx, rx) = mpsc::channel(BUFFER + 1);
        // A tap this starts reads from the stream as it is now, so that
        // everything past what the pump reads first (the stream as it is
        // once subscribed) comes in the tap's batches.
        let batches = self.taps.subscribe(&tenant, now);
        let pump = Pump {
            redis: self.redis.clone(),
            pg: self.pg.clone(),
            tenant,
            tx,
            stopping: self.stopping.clone(),
            last_sent: None,
        };
        tokio::spawn(pump.run(start, batches));
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
    /// ([`latest`]).
    At(EventPos),
}

/// Where "from now" is in the tenant's stream: its newest entry, or, when
/// it has none (a quiet tenant's stream is trimmed empty; a Redis that lost
/// its data has none at all), just before Redis's clock, which the next
/// entry's id will not be below. Not `(0, 0)`: a subscriber's cursor there
/// would have every event in Postgres's history replayed to it as missing
/// from the stream.
pub(super) async fn latest(
    redis: &RedisStore,
    tenant: &TenantId,
) -> Result<EventPos, redis::RedisError> {
    if let Some(pos) = newest_entry(redis, tenant).await? {
        return Ok(pos);
    }
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut redis.multiplexed())
        .await?;
    Ok(before((secs * 1_000 + micros / 1_000, 0)))
}

/// The id of the newest entry in the tenant's stream, if it has any.
async fn newest_entry(
    redis: &RedisStore,
    tenant: &TenantId,
) -> Result<Option<EventPos>, redis::RedisError> {
    let last: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(redis.keys().events(tenant))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut redis.multiplexed())
        .await?;
    Ok(last.ids.first().and_then(|e| parse_event_id(&e.id)))
}

/// The stream position just before `pos`.
pub(super) fn before(pos: EventPos) -> EventPos {
    match pos {
        (ms, 0) => (ms.saturating_sub(1), u64::MAX),
        (ms, seq) => (ms, seq - 1),
    }
}

/// One subscriber's reader.
struct Pump {
    redis: RedisStore,
    pg: PgStore,
    tenant: TenantId,
    tx: mpsc::Sender<Item>,
    stopping: watch::Receiver<bool>,
    last_sent: Option<EventPos>,
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
    async fn run(mut self, start: Start, batches: Subscription) {
        let live = metrics::gauge!(metric::WATCH_SUBSCRIBERS);
        live.increment(1.0);
        let reason = match self.stream(start, batches).await {
            Err(Stop::Status(status)) => {
                let reason = match status.code() {
                    tonic::Code::Aborted => "fell_behind",
                    _ if *self.stopping.borrow() => "shutdown",
                    _ => "error",
                };
                let _ = self.tx.send(Err(status)).await;
                reason
            }
            Err(Stop::Gone) | Ok(()) => "client_left",
        };
        metrics::counter!(metric::WATCH_ENDED, "reason" => reason).increment(1);
        live.decrement(1.0);
    }

    fn resume_hint(&self) -> String {
        match &self.last_sent {
            Some((ms, seq)) => format!("resume with after_event_id={ms}-{seq}"),
            None => "resume with the after_event_id you started from".into(),
        }
    }

    fn shutting_down(&self) -> Stop {
        Stop::Status(Status::unavailable(format!(
            "server shutting down; {}",
            self.resume_hint()
        )))
    }

    /// Sends the event at `pos`, encoded.
    async fn send(&mut self, pos: EventPos, event: Bytes) -> Result<(), Stop> {
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
        self.tx.send(Ok(event)).await.map_err(|_| Stop::Gone)?;
        self.last_sent = Some(pos);
        Ok(())
    }

    /// What the stream holds past the start first (from Postgres where it
    /// was trimmed), then the tap's batches.
    async fn stream(&mut self, start: Start, mut batches: Subscription) -> Result<(), Stop> {
        let mut cursor = match (newest_entry(&self.redis, &self.tenant).await?, start) {
            (Some(newest), Start::After(from) | Start::At(from)) => self.fill(from, newest).await?,
            // Nothing in the stream: what followed a resume point is in
            // Postgres if anywhere, and nothing has followed "now" yet.
            (None, Start::After(after)) => self.replay(after, None).await?,
            (None, Start::At(now)) => now,
        };
        loop {
            let stopping = &mut self.stopping;
            let next = tokio::select! {
                _ = stopping.wait_for(|s| *s) => None,
                _ = self.tx.closed() => return Err(Stop::Gone),
                batch = batches.recv() => Some(batch),
            };
            let Some(batch) = next else {
                return Err(self.shutting_down());
            };
            let batch = match batch {
                Ok(batch) => batch,
                // What was lost shows as a gap before the next batch.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) if *self.stopping.borrow() => {
                    return Err(self.shutting_down());
                }
                Err(RecvError::Closed) => {
                    return Err(Stop::Status(Status::unavailable(format!(
                        "the event stream could not be read; {}",
                        self.resume_hint()
                    ))));
                }
            };
            if batch.after > cursor {
                cursor = self.fill(cursor, batch.after).await?;
            }
            for (pos, event) in &batch.events {
                if *pos > cursor {
                    self.send(*pos, event.clone()).await?;
                    cursor = *pos;
                }
            }
        }
    }

    /// Sends every event after `cursor` up to `upto`: from Postgres those
    /// the stream no longer keeps, the rest from the stream. Returns the
    /// new cursor, `upto` or past it.
    async fn fill(&mut self, mut cursor: EventPos, upto: EventPos) -> Result<EventPos, Stop> {
        let key = self.redis.keys().events(&self.tenant);
        // Made only for a gap the stream has pages of: most gaps are none
        // (the first entry of a quiet tenant's stream, trimmed empty, is
        // past every cursor), or only in Postgres.
        let mut own = None;
        while cursor < upto {
            // If the stream no longer starts at or before the cursor, it
            // was trimmed, and the entries between may be gone from it. The
            // trim drops only entries written to Postgres: they are sent
            // from there first. One small reply: the shared connection.
            let oldest = oldest_in_stream(&mut self.redis.multiplexed(), &key).await?;
            if oldest.is_none_or(|o| o > cursor) {
                cursor = self.replay(cursor, oldest).await?;
            }
            if cursor >= upto {
                return Ok(cursor);
            }
            let con = match &mut own {
                Some(con) => con,
                None => own.insert(self.gap_connection(&key).await?),
            };
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&key)
                .arg(format!("({}-{}", cursor.0, cursor.1))
                .arg(format!("{}-{}", upto.0, upto.1))
                .arg("COUNT")
                .arg(BATCH)
                .query_async(con)
                .await?;
            let last_page = page.ids.len() < BATCH;
            for entry in &page.ids {
                let event = decode_event(entry)?;
                cursor = parse_event_id(&event.event_id).unwrap_or(cursor);
                self.send(cursor, encode(&event_pb(event))).await?;
            }
            if last_page {
                return Ok(cursor.max(upto));
            }
        }
        Ok(cursor)
    }

    /// A connection of a gap's own: a long gap is many large replies,
    /// which would hold up every call behind them on a shared one. Not kept
    /// past the gap: after a deploy every subscriber resumes, and each would
    /// hold a Redis connection for as long as it watches.
    async fn gap_connection(&self, key: &str) -> Result<redis::aio::MultiplexedConnection, Stop> {
        let mut con = self.redis.dedicated(Duration::from_secs(5)).await?;
        // Named so an operator sees what it is in CLIENT LIST.
        let () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!("watch-gap:{key}"))
            .query_async(&mut con)
            .await?;
        Ok(con)
    }

    /// Sends from Postgres the events after `after` that are older than the
    /// stream's oldest entry (`first`; none when the stream is empty), and
    /// returns where reading the stream picks up: just before `first`,
    /// since every event older than what the stream keeps is in Postgres.
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
            if page.is_empty() {
                break;
            }
            for e in page {
                from = parse_event_id(&e.event_id).unwrap_or(from);
                self.send(from, encode(&event_pb(e))).await?;
            }
        }
        Ok(first.map_or(from, |first| from.max(before(first))))
    }
}

/// An event id as (milliseconds, sequence), ordered as the stream orders.
pub(super) type EventPos = (u64, u64);

/// The id of the oldest entry the stream still keeps, if any.
pub(super) async fn oldest_in_stream(
    con: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> Result<Option<EventPos>, redis::RedisError> {
    let oldest: StreamRangeReply = oldest_entry(key).query_async(con).await?;
    Ok(first_id(&oldest))
}

/// The command that reads the stream's oldest entry (a reader sends one
/// for each stream it read, in one pipeline).
pub(super) fn oldest_entry(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key).arg("-").arg("+").arg("COUNT").arg(1);
    cmd
}

/// The id of a range's first entry, if it has any.
pub(super) fn first_id(range: &StreamRangeReply) -> Option<EventPos> {
    range.ids.first().and_then(|e| parse_event_id(&e.id))
}

pub(super) fn event_pb(e: Event) -> pb::WatchResponse {
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

#[cfg(test)]
mod tests {
    use super::before;

    #[test]
    fn the_position_before_an_id_is_the_last_one_that_sorts_below_it() {
        assert_eq!(before((1_700, 5)), (1_700, 4));
        assert_eq!(before((1_700, 0)), (1_699, u64::MAX));
    }
}

//! One reader of a tenant's event stream, shared by its live `Watch`
//! subscribers.
//!
//! Each subscriber used to read the stream on a Redis connection of its
//! own, so N subscribers cost Redis N reads of every event and the daemon
//! N decodes of it; the reply parser was most of the daemon's time, and
//! with 32 subscribers a flash sale ran at a quarter of its rate
//! (deploy/BENCHMARKS.md, "live Watch subscribers"). A tap reads each
//! event once, decodes it and encodes it for the wire once
//! (`event_wire.rs`), and hands each batch to every subscriber through a
//! broadcast channel.
//!
//! A batch says where its read started (`after`). A subscriber whose
//! cursor is behind that (it resumed from an older id, or fell behind the
//! channel and lost batches) reads the gap itself before it takes the
//! batch, so the tap makes the common case cheap and never decides what a
//! subscriber sees.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, broadcast, watch};

use super::event_wire::encode;
use super::events::{BATCH, EventPos, before, event_pb, oldest_in_stream};
use crate::domain::{TenantId, parse_event_id};
use crate::error::Error;
use crate::store::redis::{RedisStore, decode_event};

/// How long one blocking read waits. A tap that has nothing to read costs
/// Redis and the daemon one read per `BLOCK` (a platform's ten thousand
/// shops, each with a subscriber, ten thousand taps), so it is long: the
/// daemon's stopping and the last subscriber's leaving end a read at once
/// rather than being looked for between reads. What it still bounds is
/// how long a tap waits on a connection that went dead without a word
/// (`BLOCK` and the reply's two seconds) before its subscribers are told
/// to resume.
const BLOCK: Duration = Duration::from_secs(10);
/// Batches a tap keeps for a subscriber that is busy (sending, or reading
/// a gap); one that falls further behind reads what it lost itself.
const KEPT: usize = 64;

/// Events a tap read in one go: every event of the stream after `after`,
/// up to the last one here, but those trimmed from the stream before the
/// read (a subscriber reads those from Postgres when it fills its gap).
pub struct Batch {
    pub after: EventPos,
    /// Each event's position and its `WatchResponse`, encoded once for
    /// every subscriber.
    pub events: Vec<(EventPos, bytes::Bytes)>,
}

/// The daemon's taps, one per tenant with live subscribers.
pub struct Taps {
    redis: RedisStore,
    stopping: watch::Receiver<bool>,
    live: Mutex<HashMap<TenantId, Tap>>,
}

/// A running tap as subscribers find it.
struct Tap {
    tx: broadcast::Sender<Arc<Batch>>,
    /// Told by each subscriber that leaves.
    left: Arc<Notify>,
}

/// A subscriber's end of its tenant's tap: the batches, and word to the
/// tap when it is dropped, so that the last subscriber's leaving ends the
/// tap's blocking read (and frees its connection) at once.
pub struct Subscription {
    /// Taken only when dropped, so the tap counts it gone when told.
    batches: Option<broadcast::Receiver<Arc<Batch>>>,
    left: Arc<Notify>,
}

impl Subscription {
    /// The tap's next batch (see [`broadcast::Receiver::recv`]).
    pub async fn recv(&mut self) -> Result<Arc<Batch>, RecvError> {
        match &mut self.batches {
            Some(batches) => batches.recv().await,
            None => Err(RecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.batches.take());
        self.left.notify_one();
    }
}

impl Taps {
    /// No taps yet; each ends when the daemon is `stopping`.
    pub fn new(redis: RedisStore, stopping: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            redis,
            stopping,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// The batches of `tenant`'s tap from now on, starting the tap, after
    /// `from`, if it has none. The channel closes when the tap stops: at
    /// shutdown, or when it cannot read the stream.
    ///
    /// A subscriber reads the stream as it is once subscribed itself, and
    /// takes the batches for what comes after: so a tap must not start
    /// past the stream as it was before the subscription (`from`, the
    /// newest entry then), and a running tap, which has only sent what the
    /// stream held, never is.
    pub fn subscribe(self: &Arc<Self>, tenant: &TenantId, from: EventPos) -> Subscription {
        let mut live = self.live.lock().expect("the taps' lock is never poisoned");
        if let Some(tap) = live.get(tenant) {
            return Subscription {
                batches: Some(tap.tx.subscribe()),
                left: tap.left.clone(),
            };
        }
        let (tx, rx) = broadcast::channel(KEPT);
        let left = Arc::new(Notify::new());
        live.insert(
            tenant.clone(),
            Tap {
                tx: tx.clone(),
                left: left.clone(),
            },
        );
        tokio::spawn(self.clone().run(tenant.clone(), tx, left.clone(), from));
        Subscription {
            batches: Some(rx),
            left,
        }
    }

    async fn run(
        self: Arc<Self>,
        tenant: TenantId,
        tx: broadcast::Sender<Arc<Batch>>,
        left: Arc<Notify>,
        from: EventPos,
    ) {
        if let Err(e) = self.read(&tenant, &tx, &left, from).await {
            tracing::warn!(%tenant, error = %e, "a Watch tap stopped; its subscribers are told to resume");
        }
        self.forget(&tenant, &tx, true);
    }

    /// Reads the stream and sends what it read until no subscriber is
    /// left or the daemon stops; either ends a read that is waiting.
    async fn read(
        &self,
        tenant: &TenantId,
        tx: &broadcast::Sender<Arc<Batch>>,
        left: &Notify,
        mut cursor: EventPos,
    ) -> Result<(), Error> {
        let key = self.redis.keys().events(tenant);
        let mut con = self.redis.dedicated(BLOCK + Duration::from_secs(2)).await?;
        // Named so an operator sees which connection is which tenant's tap.
        let () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!("watch:{key}"))
            .query_async(&mut con)
            .await?;
        let mut stopping = self.stopping.clone();
        while !*stopping.borrow() && !self.forget(tenant, tx, false) {
            let opts = StreamReadOptions::default()
                .count(BATCH)
                .block(BLOCK.as_millis() as usize);
            let (keys, from) = ([&key], [format!("{}-{}", cursor.0, cursor.1)]);
            let reply = {
                let read = redis::AsyncCommands::xread_options::<_, _, Option<StreamReadReply>>(
                    &mut con, &keys, &from, &opts,
                );
                tokio::pin!(read);
                // Ending a read drops it with its connection: nothing else
                // is sent on that connection, whose reply would queue
                // behind it.
                loop {
                    tokio::select! {
                        reply = &mut read => break reply?,
                        _ = stopping.wait_for(|s| *s) => return Ok(()),
                        () = left.notified() => {
                            if self.forget(tenant, tx, false) {
                                return Ok(());
                            }
                        }
                    }
                }
            };
            let entries: Vec<_> = reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            if entries.is_empty() {
                continue;
            }
            // Entries trimmed since the last read are not in this one: the
            // batch starts just before the oldest entry the stream keeps.
            let mut after = cursor;
            if let Some(oldest) = oldest_in_stream(&mut con, &key).await?
                && oldest > cursor
            {
                after = before(oldest);
            }
            let mut events = Vec::with_capacity(entries.len());
            for entry in &entries {
                let event = decode_event(entry)?;
                let pos = parse_event_id(&event.event_id).unwrap_or(cursor);
                cursor = cursor.max(pos);
                events.push((pos, encode(&event_pb(event))));
            }
            // None listening is fine: the next look forgets the tap.
            let _ = tx.send(Arc::new(Batch { after, events }));
        }
        Ok(())
    }

    /// Forgets `tenant`'s tap if it is `tx` and (unless `always`) no one
    /// listens; whether it did. Under the lock, as `subscribe` is, so a
    /// subscriber never joins a tap that is leaving.
    fn forget(&self, tenant: &TenantId, tx: &broadcast::Sender<Arc<Batch>>, always: bool) -> bool {
        let mut live = self.live.lock().expect("the taps' lock is never poisoned");
        if !always && tx.receiver_count() > 0 {
            return false;
        }
        if live.get(tenant).is_some_and(|t| t.tx.same_channel(tx)) {
            live.remove(tenant);
        }
        true
    }
}

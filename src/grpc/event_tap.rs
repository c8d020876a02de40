//! One reader of a tenant's event stream, shared by its live `Watch`
//! subscribers.
//!
//! Each subscriber used to read the stream on a Redis connection of its
//! own, so N subscribers cost Redis N reads of every event and the daemon
//! N decodes of it; the reply parser was most of the daemon's time, and
//! with 32 subscribers a flash sale ran at a quarter of its rate
//! (deploy/BENCHMARKS.md, "live Watch subscribers"). A tap reads each
//! event once, decodes it once, and hands each batch to every subscriber
//! through a broadcast channel.
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
use tokio::sync::{broadcast, watch};

use super::events::{BATCH, EventPos, before, event_pb, oldest_in_stream};
use super::pb;
use crate::domain::{TenantId, parse_event_id};
use crate::error::Error;
use crate::store::redis::{RedisStore, decode_event};

/// How long one blocking read waits (also how soon a tap notices that it
/// has no subscriber left, or that the daemon stops).
const BLOCK: Duration = Duration::from_millis(500);
/// Batches a tap keeps for a subscriber that is busy (sending, or reading
/// a gap); one that falls further behind reads what it lost itself.
const KEPT: usize = 64;

/// Events a tap read in one go: every event of the stream after `after`,
/// up to the last one here, but those trimmed from the stream before the
/// read (a subscriber reads those from Postgres when it fills its gap).
pub struct Batch {
    pub after: EventPos,
    pub events: Vec<(EventPos, pb::WatchResponse)>,
}

/// The daemon's taps, one per tenant with live subscribers.
pub struct Taps {
    redis: RedisStore,
    stopping: watch::Receiver<bool>,
    live: Mutex<HashMap<TenantId, broadcast::Sender<Arc<Batch>>>>,
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
    pub fn subscribe(
        self: &Arc<Self>,
        tenant: &TenantId,
        from: EventPos,
    ) -> broadcast::Receiver<Arc<Batch>> {
        let mut live = self.live.lock().expect("the taps' lock is never poisoned");
        if let Some(tx) = live.get(tenant) {
            return tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(KEPT);
        live.insert(tenant.clone(), tx.clone());
        tokio::spawn(self.clone().run(tenant.clone(), tx, from));
        rx
    }

    async fn run(
        self: Arc<Self>,
        tenant: TenantId,
        tx: broadcast::Sender<Arc<Batch>>,
        from: EventPos,
    ) {
        if let Err(e) = self.read(&tenant, &tx, from).await {
            tracing::warn!(%tenant, error = %e, "a Watch tap stopped; its subscribers are told to resume");
        }
        self.forget(&tenant, &tx, true);
    }

    /// Reads the stream and sends what it read until no subscriber is
    /// left or the daemon stops.
    async fn read(
        &self,
        tenant: &TenantId,
        tx: &broadcast::Sender<Arc<Batch>>,
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
        while !*self.stopping.borrow() && !self.forget(tenant, tx, false) {
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
                events.push((pos, event_pb(event)));
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
        if live.get(tenant).is_some_and(|t| t.same_channel(tx)) {
            live.remove(tenant);
        }
        true
    }
}

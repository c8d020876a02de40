//! One reader of a tenant's event stream, shared by its live `Watch`
//! subscribers, and one Redis connection shared by the readers of up to
//! [`SHARED`] tenants.
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
//! Each tap then had a Redis connection of its own, so the shops a daemon
//! could watch at once were bounded by Redis's `maxclients` (10,000 by
//! default) and the daemon's open files. Now a reader reads the streams
//! of up to [`SHARED`] taps in one blocking `XREAD`: a platform's ten
//! thousand watched shops are ~625 connections (deploy/BENCHMARKS.md,
//! "taps sharing a connection"). A tap joining, or a tap's last
//! subscriber leaving, ends the reader's blocking read at once (`CLIENT
//! UNBLOCK`, from the store's shared connection), so neither waits for
//! the read's time to run out.
//!
//! A batch says where its read started (`after`). A subscriber whose
//! cursor is behind that (it resumed from an older id, or fell behind the
//! channel and lost batches) reads the gap itself before it takes the
//! batch, so the tap makes the common case cheap and never decides what a
//! subscriber sees.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::streams::{StreamKey, StreamRangeReply, StreamReadOptions, StreamReadReply};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, broadcast, mpsc, watch};

use super::event_wire::encode;
use super::events::{BATCH, EventPos, before, event_pb, first_id, oldest_entry};
use crate::domain::{TenantId, parse_event_id};
use crate::error::Error;
use crate::store::redis::{RedisStore, decode_event};
use crate::telemetry::metric;

/// How long one blocking read waits. A reader that has nothing to read
/// costs Redis and the daemon one read per `BLOCK`, so it is long: a tap
/// joining, the last subscriber of one leaving and the daemon's stopping
/// end a read at once rather than being looked for between reads. What it
/// still bounds is how long a reader waits on a connection that went dead
/// without a word (`BLOCK` and the reply's two seconds) before its
/// subscribers are told to resume.
const BLOCK: Duration = Duration::from_secs(10);
/// Taps one reader reads, in one `XREAD` of all their streams. Each
/// stream named costs Redis ~0.5 µs a read (deploy/BENCHMARKS.md, "taps
/// sharing a connection"), which a busy shop's tap pays on every wake for
/// the quiet shops beside it: 16 keep that to a few µs a wake while ten
/// thousand watched shops need ~625 connections.
pub const SHARED: usize = 16;
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

/// The daemon's taps, one per tenant with live subscribers, and the
/// readers that read their streams.
pub struct Taps {
    redis: RedisStore,
    stopping: watch::Receiver<bool>,
    live: Mutex<Live>,
}

/// The taps and readers running, under one lock: a subscriber never joins
/// a tap that is leaving, nor a tap a reader that is.
#[derive(Default)]
struct Live {
    taps: HashMap<TenantId, Tap>,
    /// Each running reader and how many taps it reads or is about to.
    readers: Vec<(Arc<Reader>, usize)>,
}

/// A running tap as subscribers find it.
struct Tap {
    tx: broadcast::Sender<Arc<Batch>>,
    reader: Arc<Reader>,
}

/// What a reader is reached by: the taps that join it, and word that its
/// blocking read should end (a tap joined, or a subscriber left).
struct Reader {
    joins: mpsc::UnboundedSender<Member>,
    wake: Notify,
}

/// A tap as its reader reads for it.
struct Member {
    tenant: TenantId,
    /// The tenant's stream.
    key: String,
    tx: broadcast::Sender<Arc<Batch>>,
    /// The last entry handed on (or the tap's start).
    cursor: EventPos,
}

/// A subscriber's end of its tenant's tap: the batches, and word to the
/// tap's reader when it is dropped, so that the last subscriber's leaving
/// ends the tap at once.
pub struct Subscription {
    /// Taken only when dropped, so the reader counts it gone when told.
    batches: Option<broadcast::Receiver<Arc<Batch>>>,
    reader: Arc<Reader>,
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
        self.reader.wake.notify_one();
    }
}

impl Taps {
    /// No taps yet; each ends when the daemon is `stopping`.
    pub fn new(redis: RedisStore, stopping: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            redis,
            stopping,
            live: Mutex::new(Live::default()),
        })
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().expect("the taps' lock is never poisoned")
    }

    /// The batches of `tenant`'s tap from now on, starting the tap, after
    /// `from`, if it has none. The channel closes when the tap stops: at
    /// shutdown, or when its reader cannot read.
    ///
    /// A subscriber reads the stream as it is once subscribed itself, and
    /// takes the batches for what comes after: so a tap must not start
    /// past the stream as it was before the subscription (`from`, the
    /// newest entry then), and a running tap, which has only sent what the
    /// stream held, never is.
    pub fn subscribe(self: &Arc<Self>, tenant: &TenantId, from: EventPos) -> Subscription {
        let mut live = self.live();
        if let Some(tap) = live.taps.get(tenant) {
            return Subscription {
                batches: Some(tap.tx.subscribe()),
                reader: tap.reader.clone(),
            };
        }
        let (tx, rx) = broadcast::channel(KEPT);
        let reader = self.place(&mut live);
        let member = Member {
            tenant: tenant.clone(),
            key: self.redis.keys().events(tenant),
            tx: tx.clone(),
            cursor: from,
        };
        // A reader leaves `live.readers` before it stops taking joins.
        let _ = reader.joins.send(member);
        reader.wake.notify_one();
        live.taps.insert(
            tenant.clone(),
            Tap {
                tx,
                reader: reader.clone(),
            },
        );
        live.meter();
        Subscription {
            batches: Some(rx),
            reader,
        }
    }

    /// A reader with room for one more tap, counted in: the first that has
    /// it, or a new one.
    fn place(self: &Arc<Self>, live: &mut Live) -> Arc<Reader> {
        if let Some((reader, taps)) = live.readers.iter_mut().find(|(_, n)| *n < SHARED) {
            *taps += 1;
            return reader.clone();
        }
        let (joins, joining) = mpsc::unbounded_channel();
        let reader = Arc::new(Reader {
            joins,
            wake: Notify::new(),
        });
        live.readers.push((reader.clone(), 1));
        tokio::spawn(self.clone().run(reader.clone(), joining));
        reader
    }

    async fn run(
        self: Arc<Self>,
        reader: Arc<Reader>,
        mut joining: mpsc::UnboundedReceiver<Member>,
    ) {
        let mut members = Vec::new();
        if let Err(e) = self.read(&reader, &mut joining, &mut members).await {
            tracing::warn!(taps = members.len(), error = %e, "a Watch reader stopped; its subscribers are told to resume");
        }
        // Out of the readers first, so that no tap joins it any more; then
        // every tap it read, or that was joining, is forgotten, which
        // closes its subscribers' channels.
        let mut live = self.live();
        live.readers.retain(|(r, _)| !Arc::ptr_eq(r, &reader));
        joining.close();
        while let Ok(member) = joining.try_recv() {
            members.push(member);
        }
        for member in &members {
            live.forget(member, &reader, true);
        }
        live.meter();
    }

    /// Reads the members' streams and hands on what it read until no tap
    /// is left or the daemon stops.
    async fn read(
        &self,
        reader: &Arc<Reader>,
        joining: &mut mpsc::UnboundedReceiver<Member>,
        members: &mut Vec<Member>,
    ) -> Result<(), Error> {
        let mut con = self.redis.dedicated(BLOCK + Duration::from_secs(2)).await?;
        // Named so an operator sees which daemon's readers these are.
        let () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!("watch:{}", self.redis.keys().prefix()))
            .query_async(&mut con)
            .await?;
        let id: u64 = redis::cmd("CLIENT").arg("ID").query_async(&mut con).await?;
        let mut stopping = self.stopping.clone();
        while !*stopping.borrow() && !self.tend(reader, joining, members) {
            let reply = tokio::select! {
                reply = self.read_once(&mut con, id, members, &reader.wake) => reply?,
                _ = stopping.wait_for(|s| *s) => return Ok(()),
            };
            let mut streams = reply.map(|r| r.keys).unwrap_or_default();
            streams.retain(|s| !s.ids.is_empty());
            if streams.is_empty() {
                continue;
            }
            // Entries trimmed since the last read are not in this one: a
            // batch starts just before the oldest entry its stream keeps.
            let mut oldest = redis::pipe();
            for stream in &streams {
                oldest.add_command(oldest_entry(&stream.key));
            }
            let oldest: Vec<StreamRangeReply> = oldest.query_async(&mut con).await?;
            for (stream, oldest) in streams.into_iter().zip(oldest) {
                if let Some(at) = members.iter().position(|m| m.key == stream.key)
                    && let Err(e) = hand_on(&mut members[at], stream, first_id(&oldest))
                {
                    let member = members.swap_remove(at);
                    tracing::warn!(tenant = %member.tenant, error = %e, "a Watch tap stopped; its subscribers are told to resume");
                    self.live().forget(&member, reader, true);
                }
            }
        }
        Ok(())
    }

    /// Takes the taps that joined in, and lets go of those with no
    /// subscriber left; whether the reader is done, having none to read
    /// (it is then out of the readers). Under the lock, as `subscribe` is,
    /// so the reader's count is its members.
    fn tend(
        &self,
        reader: &Arc<Reader>,
        joining: &mut mpsc::UnboundedReceiver<Member>,
        members: &mut Vec<Member>,
    ) -> bool {
        let mut live = self.live();
        let before = members.len();
        while let Ok(member) = joining.try_recv() {
            members.push(member);
        }
        let joined = members.len() > before;
        members.retain(|m| !live.forget(m, reader, false));
        let done = members.is_empty();
        if done {
            live.readers.retain(|(r, _)| !Arc::ptr_eq(r, reader));
        }
        if joined || members.len() < before || done {
            live.meter();
        }
        done
    }

    /// One blocking read of every member's stream after its cursor, ended
    /// at once when the reader is woken.
    async fn read_once(
        &self,
        con: &mut redis::aio::MultiplexedConnection,
        id: u64,
        members: &[Member],
        wake: &Notify,
    ) -> Result<Option<StreamReadReply>, Error> {
        let opts = StreamReadOptions::default()
            .count(BATCH)
            .block(BLOCK.as_millis() as usize);
        let keys: Vec<&str> = members.iter().map(|m| m.key.as_str()).collect();
        let from: Vec<String> = members
            .iter()
            .map(|m| format!("{}-{}", m.cursor.0, m.cursor.1))
            .collect();
        let read = redis::AsyncCommands::xread_options(con, &keys, &from, &opts);
        tokio::pin!(read);
        tokio::select! {
            reply = &mut read => return Ok(reply?),
            () = wake.notified() => {}
        }
        // Redis answers a blocked read at once when told to (nil, as if
        // its time ran out); until the read has reached Redis and blocked
        // there, it must be told again.
        // (Ever less often: a read stuck on a dead connection ends with
        // its response timeout.)
        let mut pause = Duration::from_millis(1);
        loop {
            let unblocked: u64 = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(id)
                .query_async(&mut self.redis.multiplexed())
                .await?;
            if unblocked == 1 {
                return Ok(read.await?);
            }
            tokio::select! {
                reply = &mut read => return Ok(reply?),
                () = tokio::time::sleep(pause) => pause = (pause * 2).min(Duration::from_millis(100)),
            }
        }
    }
}

/// Hands what a read got of one member's stream to its subscribers,
/// the stream's oldest entry being `oldest`; an event that cannot be
/// decoded is that tap's error.
fn hand_on(member: &mut Member, stream: StreamKey, oldest: Option<EventPos>) -> Result<(), Error> {
    let after = match oldest {
        Some(oldest) if oldest > member.cursor => before(oldest),
        _ => member.cursor,
    };
    let mut events = Vec::with_capacity(stream.ids.len());
    for entry in &stream.ids {
        let event = decode_event(entry)?;
        let pos = parse_event_id(&event.event_id).unwrap_or(member.cursor);
        member.cursor = member.cursor.max(pos);
        events.push((pos, encode(&event_pb(event))));
    }
    // None listening is fine: the reader's next look lets the tap go.
    let _ = member.tx.send(Arc::new(Batch { after, events }));
    Ok(())
}

impl Live {
    /// Forgets `member`'s tap, counting it out of `reader`, if (unless
    /// `always`) no one listens; whether it did.
    fn forget(&mut self, member: &Member, reader: &Arc<Reader>, always: bool) -> bool {
        if !always && member.tx.receiver_count() > 0 {
            return false;
        }
        if self
            .taps
            .get(&member.tenant)
            .is_some_and(|t| t.tx.same_channel(&member.tx))
        {
            self.taps.remove(&member.tenant);
        }
        if let Some((_, taps)) = self
            .readers
            .iter_mut()
            .find(|(r, _)| Arc::ptr_eq(r, reader))
        {
            *taps -= 1;
        }
        true
    }

    /// Sets the gauges of taps and readers.
    fn meter(&self) {
        metrics::gauge!(metric::WATCH_TAPS).set(self.taps.len() as f64);
        metrics::gauge!(metric::WATCH_READERS).set(self.readers.len() as f64);
    }
}

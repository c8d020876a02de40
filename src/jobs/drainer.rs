//! The drainer: every tenant's event stream to Postgres, exactly once.
//!
//! It reads with a consumer group, writes a batch in one Postgres
//! transaction (each event keyed by its stream id, so a re-read event is
//! skipped with its effects), and acknowledges the batch only after the
//! commit. After a failure or a restart it first re-reads what it had read
//! and not acknowledged. Postgres being down only makes it wait and retry.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use redis::AsyncCommands;
use redis::streams::StreamReadOptions;
use tokio::sync::watch;

use super::Tenants;
use crate::domain::{HoldId, HoldState, Job, TenantId, parse_event_id};
use crate::error::Error;
use crate::store::HoldReply;
use crate::store::postgres::{PgStore, Twin};
use crate::store::redis::{RedisStore, StreamEvents, Watcher, decode_read};
use crate::telemetry::metric;

/// The consumer group's name.
pub const GROUP: &str = "drainer";
/// Most events per read.
const BATCH: usize = 500;
/// How long one read blocks waiting for events.
const BLOCK: Duration = Duration::from_millis(100);
/// After a round that read less than a full batch, how long the drainer
/// lets events gather before it reads again. Each round costs the same
/// eight Postgres round trips and one XACK however many events it carries,
/// so under a steady load below the peak, reading as soon as one event
/// arrives spent most of the daemon's and Postgres's CPU on rounds of one
/// or two events (deploy/BENCHMARKS.md, 2026-12-03). The price is at most
/// this much more drain lag; a full batch reads again at once.
const GATHER: Duration = Duration::from_millis(10);
/// The longest one read-and-write round may take.
const ROUND_LIMIT: Duration = Duration::from_secs(5);
/// How often the backlog gauge is sampled, and drained entries past the
/// keep trimmed (XINFO per stream, [`tend`]).
const LAG_EVERY: Duration = Duration::from_secs(1);
/// How often the drainer reads every tenant's stream. In between it reads
/// only the streams of the tenants this daemon sent operations for since
/// its last round, and of those whose streams gave events in the last
/// `LIVELY`: the streams new events can be in. Another daemon's events
/// are its own drainer's to read each round; ones a stopped daemon left
/// wait this long at most. An XREADGROUP over every stream each round
/// was most of what ten thousand idle tenants cost (deploy/BENCHMARKS.md,
/// "idle tenants").
const EVERY_STREAM_EVERY: Duration = Duration::from_secs(1);
/// How often the drainer reads again, in every stream, what the group
/// delivered to its consumer name and no one acknowledged. Every daemon
/// shares the name, and one that stopped (or whose round was cut short)
/// mid-batch left its events pending, which reads of new entries never
/// return: without this, a sale could wait for some daemon's restart to
/// reach Postgres. An event another daemon is writing that instant may be
/// written twice over; the second finds it recorded and changes nothing.
const PENDING_EVERY: Duration = Duration::from_secs(10);
/// How long after its last events a stream is still read every round.
pub const LIVELY: Duration = Duration::from_secs(2);
/// How long after its last event a stream is still tended: long enough to
/// trim that event once it is past the keep. Streams quiet for longer have
/// nothing to trim and no backlog, and are left alone: tending every
/// tenant's stream every second was a thousand round trips a second at a
/// thousand idle shops (deploy/BENCHMARKS.md, "idle tenants").
const TEND_AFTER_QUIET: Duration = Duration::from_secs(5);

/// Runs until `stop` turns true.
pub async fn run(
    redis: RedisStore,
    pg: PgStore,
    tenants: Arc<Tenants>,
    consumer: String,
    keep: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut drainer = Drainer {
        redis,
        pg,
        con: None,
        consumer,
        keep,
        grouped: HashMap::new(),
        lively: HashMap::new(),
        untended: HashSet::new(),
        pending_first: true,
        pending_read_at: std::time::Instant::now(),
        read_all_at: None,
        lag_sampled: std::time::Instant::now() - LAG_EVERY,
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            break;
        }
        let list = drainer.streams_to_read(&tenants).await;
        // Bounded: a round stuck on a frozen Redis is abandoned (its events
        // stay pending and are read again).
        let round = tokio::select! {
            r = tokio::time::timeout(ROUND_LIMIT, drainer.round(&list)) => {
                r.unwrap_or_else(|_| Err(Error::RedisUnavailable("drainer round timed out".into())))
            }
            _ = stop.changed() => break,
        };
        match round {
            Ok(fullest) => {
                backoff = Duration::from_millis(50);
                if fullest > 0 && fullest < BATCH {
                    tokio::select! {
                        _ = tokio::time::sleep(GATHER) => {}
                        _ = stop.changed() => break,
                    }
                }
            }
            Err(e) => {
                metrics::counter!(metric::DRAINER_ERRORS).increment(1);
                tracing::warn!(error = %e, retry_in = ?backoff, "drainer round failed; events stay pending and will be retried");
                drainer.pending_first = true;
                // A Redis that lost its data lost the consumer groups too:
                // create them again (creating an existing one is harmless).
                drainer.grouped.clear();
                // And a connection that failed is not trusted again.
                drainer.con = None;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        if list.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(BLOCK) => {}
                _ = stop.changed() => break,
            }
        }
    }
    tracing::debug!("drainer stopped");
}

struct Drainer {
    redis: RedisStore,
    pg: PgStore,
    /// The drainer's own Redis connection, for its blocking reads (which
    /// must not stall the multiplexed one the calls share), opened when
    /// first needed and again after a round failed. (A pool of 16 served
    /// it until 2026-12-06; nothing else used the pool.)
    con: Option<redis::aio::MultiplexedConnection>,
    consumer: String,
    /// How long drained events stay in the stream, for subscribers that
    /// resume from an id (older ones come from Postgres).
    keep: Duration,
    /// Streams whose consumer group exists, by key, with their tenant.
    grouped: HashMap<String, TenantId>,
    /// When each stream last gave events: which streams to read every
    /// round, and which to tend.
    lively: HashMap<String, std::time::Instant>,
    /// Streams whose group this drainer made (or found) since it last
    /// tended: tended once, at the next tending, to trim what an earlier
    /// daemon left past the keep. A set: while Postgres is away every round
    /// fails before the tending and makes every group again.
    untended: HashSet<String>,
    /// Re-read our unacknowledged events before new ones.
    pending_first: bool,
    /// When the drainer last set out to re-read them (`PENDING_EVERY`).
    pending_read_at: std::time::Instant,
    /// When the drainer last read every tenant's stream.
    read_all_at: Option<std::time::Instant>,
    /// When the lag gauge was last sampled.
    lag_sampled: std::time::Instant,
}

impl Drainer {
    /// The tenants whose streams this round reads: every tenant's each
    /// `EVERY_STREAM_EVERY`, and while re-reading what was read and not
    /// acknowledged (pending entries can be in any stream); otherwise
    /// those sent for since the last round, and the lively ones.
    async fn streams_to_read(&mut self, tenants: &Tenants) -> Vec<TenantId> {
        if self.pending_read_at.elapsed() >= PENDING_EVERY {
            self.pending_read_at = std::time::Instant::now();
            self.pending_first = true;
        }
        let touched = self.redis.tenants_touched(Watcher::Drainer);
        let due = self
            .read_all_at
            .is_none_or(|at| at.elapsed() >= EVERY_STREAM_EVERY);
        if self.pending_first || due {
            self.read_all_at = Some(std::time::Instant::now());
            return tenants.list().await;
        }
        let mut list: HashSet<TenantId> = touched.into_iter().collect();
        for (key, at) in &self.lively {
            if at.elapsed() < LIVELY
                && let Some(t) = self.grouped.get(key)
            {
                list.insert(t.clone());
            }
        }
        list.into_iter().collect()
    }

    /// Makes the consumer group of each of `tenants`' streams this drainer
    /// has not yet made or found (creating an existing one is refused with
    /// BUSYGROUP, and harmless), all in one pipeline: at a start with ten
    /// thousand tenants, one round trip each was a second of the first
    /// round.
    async fn make_groups(
        &mut self,
        con: &mut redis::aio::MultiplexedConnection,
        tenants: &[TenantId],
    ) -> Result<(), Error> {
        let new: Vec<(String, &TenantId)> = tenants
            .iter()
            .map(|t| (self.redis.keys().events(t), t))
            .filter(|(key, _)| !self.grouped.contains_key(key))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, _) in &new {
            pipe.cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM");
        }
        let made: Vec<redis::RedisResult<()>> = pipe.ignore_errors().query_async(con).await?;
        for ((key, tenant), result) in new.into_iter().zip(made) {
            match result {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
            // Tended once, which trims what an earlier daemon left past
            // the keep, and not read every round. (Entries younger than
            // that go once the stream has events again.) Until 2026-12-07
            // a first-seen stream counted as lively a keep ago, and so was
            // tended every second for `TEND_AFTER_QUIET`: five passes over
            // every tenant's stream at each start (deploy/BENCHMARKS.md,
            // "a restart mid-sale").
            self.untended.insert(key.clone());
            self.grouped.insert(key, tenant.clone());
        }
        Ok(())
    }

    /// One read and write; returns the most events one stream gave (a
    /// full batch means more are waiting).
    async fn round(&mut self, tenants: &[TenantId]) -> Result<usize, Error> {
        if tenants.is_empty() {
            return Ok(0);
        }
        let mut con = match &self.con {
            Some(con) => con.clone(),
            None => self
                .con
                .insert(self.redis.dedicated(ROUND_LIMIT).await?)
                .clone(),
        };
        self.make_groups(&mut con, tenants).await?;
        let keys: Vec<String> = tenants
            .iter()
            .map(|t| self.redis.keys().events(t))
            .collect();
        let start = if self.pending_first { "0" } else { ">" };
        let ids: Vec<&str> = vec![start; keys.len()];
        let mut opts = StreamReadOptions::default()
            .group(GROUP, &self.consumer)
            .count(BATCH);
        if !self.pending_first {
            opts = opts.block(BLOCK.as_millis() as usize);
        }
        let reply: redis::Value = con.xread_options(&keys, &ids, &opts).await?;
        let mut new = 0;
        let mut read = 0;
        let mut fullest = 0;
        for StreamEvents { key, events } in decode_read(reply)? {
            let Some(tenant) = self.grouped.get(&key).cloned() else {
                continue;
            };
            if events.is_empty() {
                continue;
            }
            read += events.len();
            self.lively.insert(key.clone(), std::time::Instant::now());
            fullest = fullest.max(events.len());
            let (recorded, twins) = self.pg.record_events(&tenant, &events).await?;
            new += recorded;
            for (hold_id, job, twin) in twins {
                self.settle_twin(&tenant, &hold_id, &job, twin).await?;
            }
            let acked: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
            let _: i64 = con.xack(&key, GROUP, &acked).await?;
            if let Some(last) = events.last() {
                let age = (Utc::now() - last.at).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::gauge!(metric::DRAINER_LAG_SECONDS).set(age);
            }
        }
        metrics::counter!(metric::DRAINED_EVENTS).increment(new as u64);
        if self.lag_sampled.elapsed() >= LAG_EVERY {
            self.lag_sampled = std::time::Instant::now();
            let mut backlog = 0;
            let keep_from = Utc::now().timestamp_millis() - self.keep.as_millis() as i64;
            let quiet = self.keep + TEND_AFTER_QUIET;
            self.lively.retain(|_, at| at.elapsed() < quiet);
            let once = std::mem::take(&mut self.untended);
            let once = once.iter().filter(|k| !self.lively.contains_key(*k));
            let keys: Vec<&str> = self.lively.keys().chain(once).map(String::as_str).collect();
            backlog += tend(&mut con, &keys, keep_from).await;
            metrics::gauge!(metric::DRAINER_LAG_EVENTS).set(backlog as f64);
        }
        if self.pending_first && read == 0 {
            self.pending_first = false;
        }
        Ok(fullest)
    }
}

/// Streams whose groups one pipeline reads when tending: a daemon starting
/// with ten thousand tenants tends every stream once, and one round trip
/// each was ~0.3 s of its CPU.
const TEND_CHUNK: usize = 1_000;

/// Tends `keys`' streams, once per LAG_EVERY: returns their events not yet
/// written to Postgres (delivered but not acknowledged, plus not yet
/// delivered: Redis 7's `lag`; unknown counts as none rather than failing
/// the round), and drops the entries older than `keep_from` (ms) that are
/// written. Their groups are read [`TEND_CHUNK`] streams a pipeline; a
/// stream with entries pending or to drop takes round trips of its own.
///
/// An entry leaves Redis only once it is in Postgres: the trim stops at the
/// group's last delivered id and at the oldest one some consumer still has
/// pending, even when another daemon's drainer read it and stalled.
/// Trimming is approximate (`~`, whole nodes at a time) and best-effort: a
/// failed trim only keeps events longer.
async fn tend<C>(con: &mut C, keys: &[&str], keep_from: i64) -> usize
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    let mut backlog = 0;
    for chunk in keys.chunks(TEND_CHUNK) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("XINFO").arg("GROUPS").arg(*key);
        }
        // A stream gone (or a reply that does not parse) is left alone.
        let groups: Vec<redis::RedisResult<redis::streams::StreamInfoGroupsReply>> =
            match pipe.ignore_errors().query_async(con).await {
                Ok(groups) => groups,
                Err(_) => return backlog,
            };
        for (key, groups) in chunk.iter().zip(groups) {
            backlog += tend_one(con, key, groups.ok(), keep_from).await;
        }
    }
    backlog
}

/// Tends one stream given its groups (see [`tend`]).
async fn tend_one<C>(
    con: &mut C,
    key: &str,
    groups: Option<redis::streams::StreamInfoGroupsReply>,
    keep_from: i64,
) -> usize
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    let Some(group) = groups.and_then(|g| g.groups.into_iter().find(|g| g.name == GROUP)) else {
        return 0;
    };
    let backlog = group.pending + group.lag.unwrap_or(0);
    let oldest_pending = if group.pending > 0 {
        let pending: redis::RedisResult<redis::streams::StreamPendingReply> =
            con.xpending(key, GROUP).await;
        match pending {
            Ok(redis::streams::StreamPendingReply::Data(d)) => Some(d.start_id),
            _ => return backlog,
        }
    } else {
        None
    };
    let until = trim_point(
        keep_from,
        &group.last_delivered_id,
        oldest_pending.as_deref(),
    );
    if until > 0 {
        trim(con, key, until).await;
    }
    backlog
}

/// Entries one XTRIM drops at most. An approximate trim stops there even
/// unasked (Redis's default LIMIT: 100 nodes of 100 entries), so a stream
/// trimmed by one call a second fell behind any sale writing more than
/// 10,000 events a second, and a burst's last tens of thousands stayed
/// until new events came (deploy/BENCHMARKS.md, "a trim that fell
/// behind"). Each call stays this short; the loop goes on until one drops
/// nothing.
const TRIM_STEP: usize = 10_000;
/// The most calls one tend makes: a million entries a second.
const TRIM_STEPS: usize = 100;

/// Drops the entries of `key` below `until` (ms), whole nodes at a time,
/// in calls of at most [`TRIM_STEP`] entries.
async fn trim<C>(con: &mut C, key: &str, until: i64)
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    for _ in 0..TRIM_STEPS {
        let dropped: redis::RedisResult<usize> = redis::cmd("XTRIM")
            .arg(key)
            .arg("MINID")
            .arg("~")
            .arg(until)
            .arg("LIMIT")
            .arg(TRIM_STEP)
            .query_async(con)
            .await;
        if !matches!(dropped, Ok(n) if n > 0) {
            return;
        }
    }
}

/// Where a trim of drained entries may stop (entries with an id below this
/// many ms go): at `keep_from`, but never past the group's last delivered
/// id (later entries are not read yet) or the oldest pending one (read, not
/// yet in Postgres). 0, trim nothing, when an id does not parse.
fn trim_point(keep_from: i64, last_delivered: &str, oldest_pending: Option<&str>) -> i64 {
    let ms = |id: &str| -> i64 {
        parse_event_id(id)
            .and_then(|(ms, _)| i64::try_from(ms).ok())
            .unwrap_or(0)
    };
    let until = keep_from.min(ms(last_delivered));
    oldest_pending.map_or(until, |id| until.min(ms(id)))
}

impl Drainer {
    /// Finishes, in Redis, what a twin found by `record_events` needs: the
    /// fallback committed a hold Redis only reserved, so Redis's twin is
    /// committed (then the fallback's undone); the fallback's twin, undone,
    /// had been extended, so Redis's twin is extended to the same expiry;
    /// or the fallback ended it, so Redis's twin is released.
    ///
    /// Each can be read from the fallback's twin again: if a call here
    /// fails, the round fails, and the batch, read again, finds the twin
    /// again (`record_events`).
    async fn settle_twin(
        &self,
        tenant: &TenantId,
        hold_id: &str,
        job: &str,
        twin: Twin,
    ) -> Result<(), Error> {
        let (Some(job), id) = (Job::parse(job), HoldId::from_store(hold_id.to_owned())) else {
            return Ok(());
        };
        match twin {
            Twin::Committed(order_id) => {
                if let HoldReply::Hold(h) = self.redis.commit(tenant, &id, job, &order_id).await?
                    && h.state == HoldState::Committed
                {
                    self.pg.undo_committed_twin(tenant, hold_id).await?;
                }
            }
            Twin::Extended {
                until,
                extension_id,
            } => {
                // Never shortens, and needs no budget: the extension was
                // granted. Past `until`, nothing is owed.
                if let Ok(left) = (until - Utc::now()).to_std() {
                    self.redis
                        .extend(tenant, &id, job, left, u32::MAX, &extension_id)
                        .await?;
                }
            }
            Twin::Ended => {
                self.redis.release(tenant, &id, job).await?;
            }
            Twin::None | Twin::Undone => {}
        }
        tracing::warn!(%tenant, hold_id, "a retried call reached both Redis and the fallback; kept one");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{GROUP, TRIM_STEP, tend, trim_point};

    #[tokio::test]
    async fn a_tend_trims_a_burst_larger_than_one_xtrim_drops() {
        let mut con = crate::store::redis::test_redis().await;
        let key = format!(
            "test:drainer:{}:{}:events",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        );
        // Two and a half trims' worth of events, long past any keep, all
        // read and written by the group (nothing pending, nothing unread).
        let burst = TRIM_STEP * 5 / 2;
        let mut add = redis::pipe();
        for ms in 1..=burst {
            add.cmd("XADD")
                .arg(&key)
                .arg(format!("{ms}-0"))
                .arg("k")
                .arg("claimed")
                .ignore();
        }
        add.cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(GROUP)
            .arg("$")
            .ignore();
        let () = add.query_async(&mut con).await.unwrap();

        // Beside a stream that does not exist (its XINFO fails in the
        // same pipeline): that one is left alone, this one trimmed.
        let missing = format!("{key}:missing");
        let now = chrono::Utc::now().timestamp_millis();
        let backlog = tend(&mut con, &[&missing, &key], now).await;

        let left: usize = redis::cmd("XLEN")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(backlog, 0);
        // The last delivered entry stays, and the node it is in.
        assert!(left <= 100, "{left} of {burst} entries left after a tend");
    }

    #[test]
    fn a_trim_keeps_what_is_kept_unread_or_pending() {
        assert_eq!(trim_point(1_000, "5000-0", None), 1_000, "kept by time");
        assert_eq!(trim_point(9_000, "5000-3", None), 5_000, "not read yet");
        assert_eq!(
            trim_point(9_000, "8000-0", Some("2000-7")),
            2_000,
            "read by a drainer that has not written it to Postgres"
        );
        assert_eq!(
            trim_point(9_000, "garbage", None),
            0,
            "unknown: trim nothing"
        );
    }
}

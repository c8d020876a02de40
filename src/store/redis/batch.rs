//! The coalescer: concurrent hold operations of one tenant ride to Redis in
//! one call of the batch function (`lua/batch.lua`).
//!
//! Under a stampede every request is a small script call, and the cost of
//! each is mostly not the script: it is a system call to send it, one to
//! read the answer, and Redis parsing and dispatching a command. So at most
//! two calls of one tenant are on their way at once ([`IN_FLIGHT`]);
//! whatever arrives meanwhile queues, and goes as one call when a slot
//! frees. Nothing waits on a timer: a lone request goes at once, and the
//! busier the daemon, the bigger the batches. Each operation in a batch
//! runs exactly as its own script would (`scripts::BATCH`), and gets its
//! own reply.
//!
//! A batch holds one tenant's operations (one hash slot, so it would run on
//! a Redis Cluster too). A call is answered UNAVAILABLE without being sent
//! when it queued for longer than the response timeout, or behind a call
//! that Redis did not answer: it never ran, so the engine may serve it from
//! the fallback at once, and a retry by id is safe. Sent, it would most
//! likely wait out the timeout too: a Redis frozen mid-sale held the calls
//! that queued behind its first unanswered one for two timeouts, not one
//! (deploy/BENCHMARKS.md, "the failover probe"). A call whose caller has
//! left is dropped unsent (`coalesce::take_batch`), and one whose deadline
//! would pass before its answer came is answered DEADLINE_EXCEEDED unsent
//! (`coalesce::in_time`): sent, either would sell to a caller told the call
//! failed (deploy/BENCHMARKS.md, "a stampede past the peak").

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::Histogram;
use redis::aio::ConnectionManager;
use redis::{Cmd, ToRedisArgs, Value};
use tokio::sync::{mpsc, oneshot};

use crate::domain::TenantId;
use crate::error::Error;
use crate::store::coalesce::{self, InFlight, LastCall, Tenanted};
use crate::store::redis::scripts;
use crate::telemetry::{Handles, metric};

/// Batch calls on their way to Redis at once. Of one tenant, two: one
/// being answered while the next is sent keeps Redis busy without
/// splitting the tenant's queue into small batches. In all, more, since
/// other tenants' requests could never join those calls: with two in all,
/// 64 shops claiming at once waited for each other's round trips, at
/// 0.36-0.43 of one shop's rate; 8 in all gave 0.48-0.65, 16 0.51-0.70,
/// 32 0.62-0.83 (deploy/BENCHMARKS.md, "many shops at once"). The calls
/// share one connection, so more in flight means more of them pipelined:
/// Redis reads and answers them a handful at a time.
const IN_FLIGHT: InFlight = InFlight {
    total: 32,
    per_tenant: 2,
};
/// Operations in one call, at most: bounds how long one call holds Redis.
const MAX_OPS: usize = 128;
/// Requests that may wait for the coalescer before callers wait to queue.
const QUEUE: usize = 4096;

/// One operation's own arguments (its script's `ARGV[4..]`), built like a
/// [`Cmd`]'s.
#[derive(Debug, Default)]
pub struct OpArgs(pub(super) Vec<Vec<u8>>);

impl OpArgs {
    /// Appends an argument.
    pub fn arg<T: ToRedisArgs>(&mut self, value: T) -> &mut Self {
        value.write_redis_args(&mut self.0);
        self
    }
}

/// Makes the call of `scripts::BATCH` for a tenant, with the first
/// arguments every script takes (prefix, retention, now).
pub type Invocation = Box<dyn Fn(&TenantId) -> Cmd + Send + Sync>;

struct Queued {
    tenant: TenantId,
    op: &'static str,
    args: OpArgs,
    at: Instant,
    /// The deadline of the call it serves, if it carried one.
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Value, Error>>,
}

/// A job that asks which tenants the coalescer sent operations for (or the
/// store ran its own scripts for): each is told once about each tenant,
/// since it last asked. Only these calls make holds, flag pools for a
/// refill or append events, so these jobs look at these tenants every
/// round and at every tenant only now and then (src/jobs/refiller.rs,
/// src/jobs/sweeper.rs, src/jobs/drainer.rs).
#[derive(Debug, Clone, Copy)]
pub enum Watcher {
    /// The refiller: a take may have flagged a pool.
    Refiller,
    /// The sweeper: a take may have made a hold.
    Sweeper,
    /// The drainer: every operation but a read appends to the tenant's
    /// event stream.
    Drainer,
}

/// The tenants sent for, one set per [`Watcher`]. Marked once per batch
/// call (not per operation) and once per script call of the store's own.
#[derive(Clone, Default)]
struct Touched(Arc<[Mutex<HashSet<TenantId>>; 3]>);

impl Touched {
    fn mark(&self, tenant: &TenantId) {
        for set in self.0.iter() {
            let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
            if !set.contains(tenant) {
                set.insert(tenant.clone());
            }
        }
    }

    /// The tenants marked since `watcher` last asked.
    fn take(&self, watcher: Watcher) -> Vec<TenantId> {
        let mut set = self.0[watcher as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *set).into_iter().collect()
    }
}

/// The handle the store calls through; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Queued>,
    touched: Touched,
    /// Script calls sent so far (each carrying one or more operations):
    /// what the tests check coalescing by.
    #[cfg(test)]
    sent: Arc<AtomicU64>,
}

impl Batcher {
    /// Starts the coalescer's task on the current runtime; it ends when the
    /// last handle is dropped.
    pub fn start(con: ConnectionManager, invocation: Invocation, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let sent = Arc::new(AtomicU64::new(0));
        let touched = Touched::default();
        let sending = Sending {
            con,
            invocation: Arc::new(invocation),
            timeout,
            sent: Arc::clone(&sent),
            unanswered_at: Arc::default(),
            last_call: Arc::default(),
            touched: touched.clone(),
        };
        tokio::spawn(coalesce::serve(rx, IN_FLIGHT, MAX_OPS, move |batch| {
            sending.clone().send(batch)
        }));
        Self {
            tx,
            touched,
            #[cfg(test)]
            sent,
        }
    }

    /// The tenants sent operations for since `watcher` last asked.
    pub fn touched(&self, watcher: Watcher) -> Vec<TenantId> {
        self.touched.take(watcher)
    }

    /// Counts `tenant` as sent for, by a script call of the store's own
    /// (a sweep appends `expired` events, a grant `low_stock` ones).
    pub fn touch(&self, tenant: &TenantId) {
        self.touched.mark(tenant);
    }

    /// Runs operation `op` (a key of batch.lua's `OPS`) for `tenant` and
    /// returns its script's reply.
    pub async fn call(
        &self,
        tenant: &TenantId,
        op: &'static str,
        args: OpArgs,
    ) -> Result<Value, Error> {
        let (reply, rx) = oneshot::channel();
        let queued = Queued {
            tenant: tenant.clone(),
            op,
            args,
            at: Instant::now(),
            deadline: crate::deadline::current(),
            reply,
        };
        let gone = || Error::RedisUnavailable("redis coalescer stopped".into());
        self.tx.send(queued).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

impl Tenanted for Queued {
    fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// What sending one batch needs from the coalescer.
#[derive(Clone)]
struct Sending {
    con: ConnectionManager,
    invocation: Arc<Invocation>,
    timeout: Duration,
    /// Script calls sent (`Batcher::sent`).
    sent: Arc<AtomicU64>,
    /// When Redis last failed to answer a call: the calls queued before
    /// then are not sent.
    unanswered_at: Arc<Mutex<Option<Instant>>>,
    /// How long the last call took to be answered: what a call sent now is
    /// likely to take.
    last_call: Arc<LastCall>,
    /// The tenants sent for (`Batcher::touched`).
    touched: Touched,
}

impl Sending {
    async fn send(mut self, batch: Vec<Queued>) {
        let unanswered_at = *self.unanswered_at.lock().unwrap_or_else(|e| e.into_inner());
        let behind_unanswered = |q: &Queued| unanswered_at.is_some_and(|at| q.at <= at);
        let (unsent, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|q| behind_unanswered(q) || q.at.elapsed() > self.timeout);
        let margin = self.last_call.margin();
        let (batch, late) = coalesce::in_time(batch, margin);
        for q in unsent {
            let why = if behind_unanswered(&q) {
                "redis busy: redis did not answer the call before it (not sent; retry by id)".into()
            } else {
                format!(
                    "redis busy: the call waited over {:?} to be sent (not sent; retry by id)",
                    self.timeout
                )
            };
            let _ = q.reply.send(Err(Error::RedisUnavailable(why)));
        }
        for q in late {
            let _ = q
                .reply
                .send(Err(coalesce::too_late("redis", q.at.elapsed(), margin)));
        }
        let Some(first) = batch.first() else {
            return;
        };
        let mut call = (self.invocation)(&first.tenant);
        for q in &batch {
            call.arg(q.op).arg(q.args.0.len());
            for a in &q.args.0 {
                call.arg(a.as_slice());
            }
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!(metric::REDIS_BATCH_OPS).record(batch.len() as f64);
        let sent = Instant::now();
        let result = scripts::fcall::<Value>(&mut self.con, &scripts::BATCH, &call).await;
        self.last_call.record(sent.elapsed());
        // After the call: a refill flag it set is then there to be found.
        self.touched.mark(&first.tenant);
        metrics::histogram!(metric::REDIS_SCRIPT_SECONDS, "script" => "batch")
            .record(sent.elapsed().as_secs_f64());
        match result {
            Ok(Value::Array(replies)) if replies.len() == batch.len() => {
                static OP_SECONDS: Handles<&str, Histogram, 8> = Handles::new();
                for (q, v) in batch.into_iter().zip(replies) {
                    OP_SECONDS
                        .get(
                            q.op,
                            |op| metrics::histogram!(metric::REDIS_SCRIPT_SECONDS, "script" => op),
                        )
                        .record(q.at.elapsed().as_secs_f64());
                    let _ = q.reply.send(script_error(q.op, v));
                }
            }
            Ok(other) => {
                let why = format!("batch of {} answered {other:?}", batch.len());
                for q in batch {
                    let _ = q.reply.send(Err(Error::internal(why.clone())));
                }
            }
            Err(e) => {
                let e = Error::from(e);
                if matches!(e, Error::RedisUnavailable(_)) {
                    *self.unanswered_at.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Instant::now());
                }
                for q in batch {
                    let _ = q.reply.send(Err(e.share()));
                }
            }
        }
    }
}

/// An operation's reply, or the error it raised in Redis (batch.lua
/// answers `{ 'SCRIPT_ERROR', message }` for it, and runs the others).
fn script_error(op: &str, v: Value) -> Result<Value, Error> {
    if let Value::Array(items) = &v
        && let [Value::BulkString(tag), why] = items.as_slice()
        && tag.as_slice() == b"SCRIPT_ERROR"
    {
        let why = match why {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        };
        return Err(Error::internal(format!("{op} script failed: {why}")));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::scripts::tests::{redis, tag};

    fn tenant(name: &str) -> TenantId {
        TenantId::parse(name).expect("a valid tenant id")
    }

    fn invocation_for(prefix: String) -> Invocation {
        Box::new(move |t: &TenantId| {
            let mut call = scripts::BATCH.call();
            call.arg(format!("{prefix}:{{{t}}}:"))
                .arg(60_000)
                .arg(1_000_000);
            call
        })
    }

    #[tokio::test]
    async fn an_operation_that_raises_fails_alone_and_the_others_still_answer() {
        let mut con = redis().await;
        let prefix = format!("batchtest{}", rand::random::<u32>());
        let invocation = invocation_for(prefix);
        let mut call = invocation(&tenant("acme"));
        // get_hold of an unknown hold; an unknown operation; a claim whose
        // lines are not JSON (cjson raises); get_hold again.
        call.arg("get_hold").arg(2).arg("h1").arg("flash");
        call.arg("no_such_op").arg(0);
        call.arg("claim")
            .arg(5)
            .arg("c1")
            .arg("flash")
            .arg("{not json")
            .arg("")
            .arg(0);
        call.arg("get_hold").arg(2).arg("h2").arg("flash");
        let replies = match scripts::fcall::<Value>(&mut con, &scripts::BATCH, &call)
            .await
            .expect("the batch runs")
        {
            Value::Array(r) => r,
            other => panic!("expected one reply per operation, got {other:?}"),
        };
        let tags: Vec<_> = replies.iter().map(tag).collect();
        assert_eq!(tags, ["NO_HOLD", "SCRIPT_ERROR", "SCRIPT_ERROR", "NO_HOLD"]);
        let err = script_error("claim", replies[2].clone()).expect_err("a raised error");
        assert!(err.to_string().contains("claim script failed"), "{err}");
        assert!(script_error("get_hold", replies[0].clone()).is_ok());
    }

    #[tokio::test]
    async fn a_library_redis_does_not_have_is_loaded_and_the_call_made_again() {
        // A library of its own (its digest differs from every other's), so
        // that deleting it disturbs no other test's daemon.
        let lib = scripts::Library::new(&format!(
            "redis.register_function('HOLDFAST_BATCH', function(KEYS, ARGV) return ARGV[1] .. '-{}' end)",
            rand::random::<u32>()
        ));
        let name = lib
            .text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("#!lua name="))
            .expect("the first line names the library")
            .to_string();
        let mut con = redis().await;
        let mut call = lib.call();
        call.arg("echo");
        // Never loaded: the call loads it, and answers.
        let first: String = scripts::fcall(&mut con, &lib, &call)
            .await
            .expect("loaded on first use");
        assert!(first.starts_with("echo-"), "{first}");
        // Gone, as from a Redis that lost its data: loaded again.
        let _: () = redis::cmd("FUNCTION")
            .arg("DELETE")
            .arg(&name)
            .query_async(&mut con)
            .await
            .expect("the library was there");
        let again: String = scripts::fcall(&mut con, &lib, &call)
            .await
            .expect("loaded again");
        assert_eq!(again, first);
        // Loading a library that is there already is no error.
        scripts::load(&mut con, &lib).await.expect("already there");
        let _: () = redis::cmd("FUNCTION")
            .arg("DELETE")
            .arg(&name)
            .query_async(&mut con)
            .await
            .expect("cleaned up");
    }

    /// A call whose deadline is closer than twice what the last call took
    /// is answered DEADLINE_EXCEEDED unsent, and one beside it without a
    /// deadline goes; when every call of a batch is that close, the one
    /// with the latest deadline goes anyway.
    #[tokio::test]
    async fn a_call_too_close_to_its_deadline_is_not_sent_unless_none_would_be() {
        let prefix = format!("batchtest{}", rand::random::<u32>());
        let sending = Sending {
            con: redis().await,
            invocation: Arc::new(invocation_for(prefix)),
            timeout: Duration::from_secs(5),
            sent: Arc::default(),
            unanswered_at: Arc::default(),
            last_call: Arc::default(),
            touched: Touched::default(),
        };
        let queued = |id: &str, in_ms: Option<u64>| {
            let (reply, rx) = oneshot::channel();
            let mut args = OpArgs::default();
            args.arg(id).arg("flash");
            let q = Queued {
                tenant: tenant("acme"),
                op: "get_hold",
                args,
                at: Instant::now(),
                deadline: in_ms.map(|ms| Instant::now() + Duration::from_millis(ms)),
                reply,
            };
            (q, rx)
        };
        let too_late = |r: Result<Value, Error>| matches!(r, Err(Error::DeadlineExceeded(_)));
        // The last call took a second: a call with less than two to go
        // would be answered after its caller gave up.
        sending.last_call.record(Duration::from_secs(1));
        let (hurried, hurried_rx) = queued("h1", Some(500));
        let (patient, patient_rx) = queued("h2", None);
        sending.clone().send(vec![hurried, patient]).await;
        assert!(too_late(hurried_rx.await.unwrap()));
        assert!(patient_rx.await.unwrap().is_ok(), "sent and answered");

        sending.last_call.record(Duration::from_secs(1));
        let (first, first_rx) = queued("h3", Some(500));
        let (later, later_rx) = queued("h4", Some(900));
        sending.clone().send(vec![first, later]).await;
        assert!(too_late(first_rx.await.unwrap()));
        assert!(later_rx.await.unwrap().is_ok(), "the latest deadline went");
    }

    #[tokio::test]
    async fn calls_queued_behind_a_call_redis_did_not_answer_are_not_sent() {
        let url = std::env::var("HOLDFAST_TEST_REDIS_URL")
            .expect("HOLDFAST_TEST_REDIS_URL: run the tests with ./deploy/test.sh");
        let redis = url.trim_start_matches("redis://").split('/').next();
        let gate = crate::gate::Gate::start(redis.expect("host:port"))
            .await
            .expect("a relay to the test Redis");
        let timeout = Duration::from_secs(2);
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}", gate.port)).expect("a valid URL");
        let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(timeout));
        let con = ConnectionManager::new_with_config(client, config)
            .await
            .expect("Redis through the gate");
        let prefix = format!("batchtest{}", rand::random::<u32>());
        let batcher = Batcher::start(con, invocation_for(prefix), timeout);
        let call = |i: u32| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                let mut args = OpArgs::default();
                args.arg(format!("h{i}")).arg("flash");
                batcher.call(&tenant("acme"), "get_hold", args).await
            })
        };
        let sent = || batcher.sent.load(std::sync::atomic::Ordering::Relaxed);
        gate.set(false);
        // One call in each of the tenant's slots, each its own batch, sent
        // to a Redis that does not answer...
        let mut in_flight = Vec::new();
        for i in 0..IN_FLIGHT.per_tenant {
            in_flight.push(call(i as u32));
            while sent() <= i as u64 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // ...and more queued behind them, well before their timeout, and
        // well within their own: these would be sent when a slot frees.
        tokio::time::sleep(timeout / 2).await;
        let queued: Vec<_> = (100..110).map(call).collect();
        for c in in_flight {
            let e = c.await.expect("the task ends").expect_err("no answer");
            assert!(matches!(e, Error::RedisUnavailable(_)), "{e}");
        }
        for c in queued {
            let e = c.await.expect("the task ends").expect_err("not sent");
            assert!(
                matches!(&e, Error::RedisUnavailable(why) if why.contains("not sent")),
                "{e}"
            );
        }
        assert_eq!(
            sent(),
            IN_FLIGHT.per_tenant as u64,
            "only the calls in flight went"
        );
        // Redis answers again: the next call goes, and is answered.
        gate.set(true);
        let reply = call(200).await.expect("the task ends").expect("answered");
        assert_eq!(tag(&reply), "NO_HOLD");
        assert_eq!(sent(), IN_FLIGHT.per_tenant as u64 + 1);
    }

    #[tokio::test]
    async fn concurrent_calls_each_get_their_own_reply_in_fewer_redis_calls() {
        let con = redis().await;
        let prefix = format!("batchtest{}", rand::random::<u32>());
        let batcher = Batcher::start(con, invocation_for(prefix), Duration::from_secs(5));
        let calls = (0..200).map(|i| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                let mut args = OpArgs::default();
                args.arg(format!("h{i}")).arg("flash");
                (i, batcher.call(&tenant("acme"), "get_hold", args).await)
            })
        });
        let mut answered = 0;
        for call in calls.collect::<Vec<_>>() {
            let (i, reply) = call.await.expect("the call task finishes");
            let reply = reply.unwrap_or_else(|e| panic!("call {i} failed: {e}"));
            assert_eq!(tag(&reply), "NO_HOLD", "call {i}");
            answered += 1;
        }
        assert_eq!(answered, 200);
        let sent = batcher.sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            sent < 200,
            "200 concurrent calls went as {sent} Redis calls"
        );
        // The jobs' lists of tenants to look at: each once, then none.
        for watcher in [Watcher::Refiller, Watcher::Sweeper, Watcher::Drainer] {
            assert_eq!(batcher.touched(watcher), [tenant("acme")]);
            assert!(batcher.touched(watcher).is_empty());
        }
    }
}

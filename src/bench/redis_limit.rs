//! `redis_limit`: what Redis alone does of a workload's operation. The
//! engine's own hold operations through the function the engine calls
//! (`FCALL` of the batch library, `RedisStore::single_op_command`), one
//! operation a call, at the workload's concurrency, with no pipelining:
//! everything holdfast adds (gRPC, the daemon, coalescing) is taken away.
//!
//! A one-step operation (a claim) goes through `redis-benchmark`, as the
//! issue names it. A two-step one (reserve, then commit) needs its second
//! call to name the hold its first made, which redis-benchmark cannot do
//! (each `__rand_int__` it fills is drawn anew), so [`drive_steps`] runs those:
//! one connection per client, all on one thread, each operation's calls
//! in a row.
//! Until 2026-12-05 the two-step limit was half of the first step's rate
//! through `EVALSHA` of the operation's script on its own, which ran all of
//! lib.lua's definitions on every call (the engine's function defines them
//! once) and counted a commit as costing what a reserve does
//! (deploy/BENCHMARKS.md, "2026-12-05, night: the yardsticks corrected").

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::Value;

use super::workloads::{self, Caller, Workload};
use crate::domain::{CardId, ChannelSlug, HoldId, Job, Line, Lines, PoolId, Quantity, TenantId};
use crate::store::redis::{Listed, NewHold, Op, RedisStore};

/// Where an operation's number goes in its command lines: redis-benchmark
/// fills it with a random 12-digit number (`-r`), [`drive_steps`] with the
/// operation's own (`number`), as long.
pub const N: &str = "__rand_int__";

/// What one run of [`drive_steps`] did.
#[derive(Debug, Default)]
pub struct Driven {
    /// From when every connection was open to the last answer.
    pub elapsed: Duration,
    /// Operations whose every call took (or sold, or gave back).
    pub done: u64,
    /// Operations a call refused, by the refusal (`SHORT`, `NO_HOLD`...).
    pub refused: BTreeMap<String, u64>,
    /// Operations a call failed (a Redis error).
    pub failed: u64,
    /// The first failure's words.
    pub first_failure: Option<String>,
}

impl Driven {
    /// Operations per second, refused ones included (a refusal costs
    /// Redis its work too; [`Driven::check`] makes sure they are few).
    pub fn rate(&self) -> f64 {
        let refused: u64 = self.refused.values().sum();
        (self.done + refused + self.failed) as f64 / self.elapsed.as_secs_f64()
    }

    /// An error unless at least 90% of the operations did their work: a
    /// run of refusals measures the refusal, not the operation.
    pub fn check(&self) -> anyhow::Result<()> {
        let refused: u64 = self.refused.values().sum();
        let all = self.done + refused + self.failed;
        if self.done * 10 < all * 9 {
            anyhow::bail!(
                "only {} of {all} operations did their work (refused: {:?}; failed: {}{})",
                self.done,
                self.refused,
                self.failed,
                self.first_failure
                    .as_deref()
                    .map_or(String::new(), |f| format!(", first: {f}"))
            );
        }
        Ok(())
    }
}

/// The command lines of one operation of `w`, with [`N`] in its ids.
///
/// slot-confirm's are reserve-commit's (the same two operations, on a
/// stock pool instead of a time window's). lock-complete's lock a card of
/// its own each (`workloads::baseline_card`), listed on the channel, so
/// Redis checks the listing mirror as the engine's lock does.
pub async fn steps(
    redis: &RedisStore,
    tenant: &TenantId,
    w: Workload,
    caller: &Caller,
) -> anyhow::Result<Vec<Vec<String>>> {
    let id = HoldId::from_store(format!("bench{N}"));
    let order = format!("o{N}");
    let ttl = Duration::from_secs(60);
    let one_of = |pool: String| -> anyhow::Result<Lines> {
        let line = Line {
            pool: PoolId::from_store(pool),
            quantity: Quantity::parse("quantity", 1, 1)?,
        };
        Ok(Lines::parse("lines", vec![line], 1)?)
    };
    let hold = |job, lines| NewHold {
        id: &id,
        job,
        ttl,
        lines,
        customer: None,
        reference: "",
    };
    let mut ops = Vec::new();
    match w {
        Workload::ClaimHot | Workload::Claim10k | Workload::ClaimSellout => {
            let lines = one_of(workloads::hot_pool(w, caller))?;
            let claim = Op::Claim {
                id: &id,
                job: Job::Flash,
                lines: &lines,
                customer: None,
            };
            ops.push(redis.single_op_command(tenant, claim).await?);
        }
        Workload::ReserveCommit | Workload::ReserveRelease | Workload::SlotConfirm => {
            let lines = one_of(workloads::hot_pool(w, caller))?;
            let reserve = Op::Reserve(hold(Job::Stock, &lines), None);
            ops.push(redis.single_op_command(tenant, reserve).await?);
            let then = match w {
                Workload::ReserveRelease => Op::Release {
                    id: &id,
                    job: Job::Stock,
                },
                _ => Op::Commit {
                    id: &id,
                    job: Job::Stock,
                    order_id: &order,
                },
            };
            ops.push(redis.single_op_command(tenant, then).await?);
        }
        Workload::LockComplete => {
            let card = CardId::from_store(workloads::baseline_card(caller, N));
            let lines = one_of(card.pool().as_str().to_string())?;
            let channel = ChannelSlug::from_store(workloads::CHANNEL.into());
            let cards = [card];
            let listed = Listed {
                channel: &channel,
                cards: &cards,
            };
            let lock = Op::Reserve(hold(Job::Lock, &lines), Some(listed));
            ops.push(redis.single_op_command(tenant, lock).await?);
            let complete = Op::Commit {
                id: &id,
                job: Job::Lock,
                order_id: &order,
            };
            ops.push(redis.single_op_command(tenant, complete).await?);
        }
    }
    Ok(ops)
}

/// Operation `i`'s text in its ids: 12 characters, as redis-benchmark's
/// random numbers are, but never one of them (a `d` first), so that the
/// driver's ids and redis-benchmark's never meet.
pub fn number(i: u64) -> String {
    format!("d{i:011}")
}

/// Numbers for `count` operations no earlier run of this process used: a
/// number used twice makes an id used twice, answered as a retry (or
/// refused as reused), not as the operation (one workload's limit after
/// another's, or a test's runs).
pub fn fresh_numbers(count: u64) -> Range<u64> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let first = NEXT.fetch_add(count, Ordering::Relaxed);
    first..first + count
}

/// Runs an operation for each number of `numbers` (from
/// `fresh_numbers`), each `steps`' calls in a row with [`N`] replaced by
/// its number, from `clients` connections
/// on one thread, one call in flight on each: what redis-benchmark does,
/// for operations of more than one call. The clock runs from when every
/// connection is open.
pub async fn drive_steps(
    redis_url: &str,
    clients: usize,
    numbers: Range<u64>,
    steps: &[Vec<String>],
) -> anyhow::Result<Driven> {
    let client = redis::Client::open(redis_url)?;
    let steps = steps.to_vec();
    tokio::task::spawn_blocking(move || drive_alone(&client, clients.max(1), numbers, &steps))
        .await
        .context("the Redis driver's threads")?
}

fn drive_alone(
    client: &redis::Client,
    clients: usize,
    numbers: Range<u64>,
    steps: &[Vec<String>],
) -> anyhow::Result<Driven> {
    // One thread, as redis-benchmark is: a thread per connection (the
    // first version) reached 0.87 of redis-benchmark's rate on the same
    // call, its wake-ups taking CPU from Redis on a two-core machine.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut cons = Vec::with_capacity(clients);
        for _ in 0..clients {
            cons.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .context("connecting the Redis driver")?,
            );
        }
        let next = Arc::new(AtomicU64::new(numbers.start));
        let steps = Arc::new(steps.to_vec());
        let t0 = Instant::now();
        let tasks: Vec<_> = cons
            .into_iter()
            .map(|mut con| {
                let (next, steps, end) = (next.clone(), steps.clone(), numbers.end);
                tokio::spawn(async move {
                    let mut part = Driven::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= end {
                            return part;
                        }
                        run_one(&mut con, &steps, &number(i), &mut part).await;
                    }
                })
            })
            .collect();
        let mut all = Driven::default();
        for task in tasks {
            let p = task.await?;
            all.done += p.done;
            all.failed += p.failed;
            all.first_failure = all.first_failure.or(p.first_failure);
            for (k, v) in p.refused {
                *all.refused.entry(k).or_default() += v;
            }
        }
        all.elapsed = t0.elapsed();
        Ok(all)
    })
}

/// One operation: its calls in a row, until one is refused or fails.
async fn run_one(
    con: &mut redis::aio::MultiplexedConnection,
    steps: &[Vec<String>],
    n: &str,
    tally: &mut Driven,
) {
    for step in steps {
        let mut cmd = redis::Cmd::new();
        for arg in step {
            if arg.contains(N) {
                cmd.arg(arg.replace(N, n));
            } else {
                cmd.arg(arg.as_str());
            }
        }
        match cmd.query_async::<Value>(con).await {
            Ok(reply) => match answer(&reply) {
                Some("HOLD" | "CLAIMED") => {}
                other => {
                    let why = other.unwrap_or("an unexpected reply").to_string();
                    *tally.refused.entry(why).or_default() += 1;
                    return;
                }
            },
            Err(e) => {
                tally.failed += 1;
                tally.first_failure.get_or_insert_with(|| e.to_string());
                return;
            }
        }
    }
    tally.done += 1;
}

/// The first word of a one-operation batch's answer: `HOLD` (a hold's
/// view), `CLAIMED`, or a refusal's name (lua/batch.lua, each script's
/// header).
fn answer(reply: &Value) -> Option<&str> {
    let Value::Array(replies) = reply else {
        return None;
    };
    let Some(Value::Array(items)) = replies.first() else {
        return None;
    };
    match items.first()? {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_batch_of_one_answers_with_its_first_word() {
        let hold = Value::Array(vec![Value::Array(vec![bulk("HOLD"), bulk("A")])]);
        assert_eq!(answer(&hold), Some("HOLD"));
        let short = Value::Array(vec![Value::Array(vec![bulk("SHORT"), bulk("p")])]);
        assert_eq!(answer(&short), Some("SHORT"));
        assert_eq!(answer(&Value::Array(vec![Value::Boolean(false)])), None);
        assert_eq!(answer(&Value::Int(1)), None);
    }

    #[test]
    fn a_run_of_refusals_is_not_the_operation() {
        let mut run = Driven {
            elapsed: Duration::from_secs(1),
            done: 95,
            refused: BTreeMap::from([("SHORT".to_string(), 5)]),
            ..Driven::default()
        };
        assert!(run.check().is_ok());
        assert_eq!(run.rate(), 100.0);
        run.done = 80;
        run.failed = 15;
        assert!(run.check().is_err());
    }
}

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
//! one blocking connection per client, each operation's calls in a row.
//! Until 2026-12-05 the two-step limit was half of the first step's rate
//! through `EVALSHA` of the operation's script on its own, which ran all of
//! lib.lua's definitions on every call (the engine's function defines them
//! once) and counted a commit as costing what a reserve does
//! (deploy/BENCHMARKS.md, "2026-12-05, night: the yardsticks corrected").

use std::collections::BTreeMap;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::Value;

use super::workloads::{self, Caller, Workload};
use crate::domain::{CardId, ChannelSlug, HoldId, Job, Line, Lines, PoolId, Quantity, TenantId};
use crate::store::redis::{Listed, NewHold, Op, RedisStore};

/// Where an operation's number goes in its command lines: redis-benchmark
/// fills it with a random 12-digit number (`-r`), [`drive_steps`] with the
/// operation's own, padded to the same 12 digits.
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
/// its own each ([`workloads::baseline_card`]), listed on the channel, so
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

/// Runs `ops` operations (numbers 0 to `ops` - 1), each `steps`' calls in
/// a row with [`N`] replaced by its number, from `clients` blocking
/// connections (threads), one call in flight on each: what
/// redis-benchmark does, for operations of more than one call. The clock
/// runs from when every connection is open.
pub async fn drive_steps(
    redis_url: &str,
    clients: usize,
    ops: u64,
    steps: &[Vec<String>],
) -> anyhow::Result<Driven> {
    let client = redis::Client::open(redis_url)?;
    let steps = steps.to_vec();
    tokio::task::spawn_blocking(move || drive_blocking(&client, clients.max(1), ops, &steps))
        .await
        .context("the Redis driver's threads")?
}

fn drive_blocking(
    client: &redis::Client,
    clients: usize,
    ops: u64,
    steps: &[Vec<String>],
) -> anyhow::Result<Driven> {
    let mut cons = (0..clients)
        .map(|_| client.get_connection())
        .collect::<Result<Vec<_>, _>>()
        .context("connecting the Redis driver")?;
    let next = AtomicU64::new(0);
    let start = Barrier::new(clients + 1);
    let (elapsed, parts) = std::thread::scope(|s| {
        let threads: Vec<_> = cons
            .iter_mut()
            .map(|con| {
                let (next, start) = (&next, &start);
                s.spawn(move || {
                    start.wait();
                    let mut part = Driven::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ops {
                            return part;
                        }
                        run_one(con, steps, &format!("{i:012}"), &mut part);
                    }
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let parts: Vec<Driven> = threads.into_iter().filter_map(|t| t.join().ok()).collect();
        (t0.elapsed(), parts)
    });
    let mut all = Driven {
        elapsed,
        ..Driven::default()
    };
    for p in parts {
        all.done += p.done;
        all.failed += p.failed;
        all.first_failure = all.first_failure.or(p.first_failure);
        for (k, v) in p.refused {
            *all.refused.entry(k).or_default() += v;
        }
    }
    Ok(all)
}

/// One operation: its calls in a row, until one is refused or fails.
fn run_one(con: &mut redis::Connection, steps: &[Vec<String>], n: &str, tally: &mut Driven) {
    for step in steps {
        let mut cmd = redis::Cmd::new();
        for arg in step {
            if arg.contains(N) {
                cmd.arg(arg.replace(N, n));
            } else {
                cmd.arg(arg.as_str());
            }
        }
        match cmd.query::<Value>(con) {
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

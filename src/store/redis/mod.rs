//! Redis, the fast path. One [`RedisStore`] per daemon: a multiplexed
//! connection for the scripts (concurrent calls are pipelined on it, not
//! queued for a pooled connection each; concurrent hold operations are
//! coalesced into one call, see `batch.rs`), and connections of their own
//! for the blocking stream readers (the drainer, Watch subscribers).

mod batch;
#[cfg(test)]
mod bucket_tests;
mod clock;
mod events;
mod keys;
mod reply;
mod restore;
mod scripts;
mod upkeep;

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation, Value};

pub use batch::Watcher;
use batch::{Batcher, OpArgs};

pub use clock::{RedisClock, STEP_MS};
pub use events::{StreamEvents, decode_event, decode_read};
pub use keys::Keys;
pub use reply::{GrantReply, HoldReply, Holder, RedisPool, ReturnReply, Swept, text};
#[cfg(test)]
pub(crate) use scripts::tests::redis as test_redis;
pub use upkeep::{Indexed, overdue_holds};

use crate::domain::{CardId, ChannelSlug, HoldId, Job, Lines, PoolId, TenantId};
use crate::error::Error;
use crate::telemetry::metric;

/// A sale lock's condition on its take: the listing mirror says every one
/// of `cards` is live on `channel` (src/services/listing_mirror.rs).
#[derive(Debug, Clone, Copy)]
pub struct Listed<'a> {
    /// The channel the lock is taken on.
    pub channel: &'a ChannelSlug,
    /// The cards the take's lines are the pools of.
    pub cards: &'a [CardId],
}

/// How long one Redis call may take before it fails (and the caller gets
/// UNAVAILABLE, safe to retry by id).
#[derive(Debug, Clone)]
pub struct RedisTimeouts {
    /// Connecting.
    pub connect: Duration,
    /// One command's reply.
    pub response: Duration,
}

impl Default for RedisTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            response: Duration::from_secs(1),
        }
    }
}

/// A customer's per-sale limit, checked in the same script as the take.
#[derive(Debug, Clone)]
pub struct CustomerLimit {
    /// The counter's key suffix, `cust:<scope>:<customer>`.
    pub key: String,
    /// Most units the customer may have.
    pub limit: u32,
}

/// A hold to make (`reserve.lua`): what a take asks for, with its TTL.
#[derive(Debug, Clone, Copy)]
pub struct NewHold<'a> {
    /// The hold's id.
    pub id: &'a HoldId,
    /// The job holding.
    pub job: Job,
    /// How long the hold lasts.
    pub ttl: Duration,
    /// What to hold.
    pub lines: &'a Lines,
    /// The customer's limit, if the pool's owner set one.
    pub customer: Option<&'a CustomerLimit>,
    /// The caller's reference (cart, session).
    pub reference: &'a str,
}

/// A hold operation as the engine sends it to Redis: one of the batch
/// function's operations (lua/batch.lua) with its arguments.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// Hold units (`reserve.lua`), for a sale lock only where `Listed`.
    Reserve(NewHold<'a>, Option<Listed<'a>>),
    /// Take and sell units in one step (`claim.lua`).
    Claim {
        /// The claim's id.
        id: &'a HoldId,
        /// The job claiming.
        job: Job,
        /// What to take.
        lines: &'a Lines,
        /// The customer's limit, if the pool's owner set one.
        customer: Option<&'a CustomerLimit>,
    },
    /// Sell an active hold (`commit.lua`).
    Commit {
        /// The hold.
        id: &'a HoldId,
        /// The job it must belong to.
        job: Job,
        /// The order it is sold to, or "".
        order_id: &'a str,
    },
    /// Give an active hold back (`release.lua`).
    Release {
        /// The hold.
        id: &'a HoldId,
        /// The job it must belong to.
        job: Job,
    },
}

impl Op<'_> {
    /// The hold the operation is about.
    fn id(&self) -> &HoldId {
        match self {
            Op::Reserve(hold, _) => hold.id,
            Op::Claim { id, .. } | Op::Commit { id, .. } | Op::Release { id, .. } => id,
        }
    }
}

/// What Postgres says about a pool, for Redis's copy (`grant.lua`).
#[derive(Debug, Clone)]
pub struct PoolGrant {
    /// The epoch of the grant.
    pub epoch: i64,
    /// Cumulative units granted in that epoch.
    pub granted: i64,
    /// Cumulative units of that epoch delegated before this grant: what
    /// Redis must already hold, or it lost data (`GrantReply::Lost`).
    pub prior: i64,
    /// Units of that epoch Postgres heard Redis sell (the drainer's count):
    /// Redis's own count is never below it, unless Redis went back to older
    /// data (`GrantReply::Lost`).
    pub reported_sold: i64,
    /// Nothing is left in Postgres to grant.
    pub full: bool,
    /// The pool has no capacity limit.
    pub unlimited: bool,
    /// Sale window (ms since the epoch, 0 for none).
    pub window_ms: (i64, i64),
    /// Low-stock threshold, if any.
    pub low_stock_threshold: Option<i64>,
    /// Ceiling on sold + held below the capacity, if any.
    pub ceiling: Option<i64>,
    /// Headroom at or below which a take flags the pool for a refill.
    pub low_water: i64,
    /// Units Postgres still has to grant after this grant.
    pub undelegated: i64,
}

/// The Redis side of the engine.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    con: ConnectionManager,
    batcher: Batcher,
    keys: Keys,
    retention_ms: i64,
    max_active_holds: u64,
    clock: RedisClock,
}

impl RedisStore {
    /// Connects to `url`. `prefix` starts every key; `retention` is how long
    /// finished holds and claims are remembered for idempotent retries.
    pub async fn connect(
        url: &str,
        prefix: &str,
        retention: Duration,
        timeouts: RedisTimeouts,
    ) -> Result<Self, Error> {
        let client =
            redis::Client::open(url).map_err(|e| Error::invalid("redis_url", e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeouts.connect))
            .set_response_timeout(Some(timeouts.response))
            .set_number_of_retries(1);
        let mut con = ConnectionManager::new_with_config(client.clone(), config).await?;
        let clock = read_time(&mut con)
            .await
            .map(|(ms, at)| RedisClock::anchored(ms, at))?;
        let keys = Keys::new(prefix);
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        // Loaded now so that the first hold operation does not pay for it
        // (it is loaded again whenever Redis turns out not to have it).
        match scripts::load(&mut con.clone(), &scripts::BATCH).await {
            Err(e) if e.detail().is_some_and(|d| d.starts_with("unknown command")) => {
                return Err(Error::invalid(
                    "redis_url",
                    "this Redis has no functions (FUNCTION LOAD, FCALL): holdfast needs Redis 7.0 or later",
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the batch library yet; it is loaded on first use")
            }
            Ok(()) => {}
        }
        let batcher = {
            let (keys, clock) = (keys.clone(), clock.clone());
            let invocation = move |tenant: &TenantId| {
                let mut call = scripts::BATCH.call();
                call.arg(keys.tenant(tenant))
                    .arg(retention_ms)
                    .arg(clock.now_ms());
                call
            };
            Batcher::start(con.clone(), Box::new(invocation), timeouts.response)
        };
        Ok(Self {
            client,
            con,
            batcher,
            keys,
            retention_ms,
            max_active_holds: u64::MAX >> 12,
            clock,
        })
    }

    /// Bounds the active holds one tenant may have, so no tenant can
    /// exhaust Redis's memory.
    pub fn with_max_active_holds(mut self, n: u64) -> Self {
        self.max_active_holds = n;
        self
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// How long finished holds are remembered for retries.
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(self.retention_ms).unwrap_or(0))
    }

    /// A connection of its own, for a long-lived blocking reader (a Watch
    /// subscriber, the drainer), whose replies may take up to
    /// `response_timeout`.
    pub async fn dedicated(
        &self,
        response_timeout: Duration,
    ) -> Result<redis::aio::MultiplexedConnection, Error> {
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(response_timeout));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// A handle on the multiplexed connection.
    pub fn multiplexed(&self) -> ConnectionManager {
        self.con.clone()
    }

    /// The engine's clock (Redis's, followed on this host's monotonic clock).
    pub fn clock(&self) -> &RedisClock {
        &self.clock
    }

    /// Reads Redis's clock and compares it with ours: `Some(step)` (Redis
    /// minus ours, ms) when Redis's clock has been stepped and is not being
    /// followed.
    pub async fn observe_clock(&self) -> Result<Option<i64>, Error> {
        let (ms, at) = read_time(&mut self.con.clone()).await?;
        Ok(self.clock.observe(ms, at))
    }

    /// A script invocation with the arguments every script starts with
    /// (lib.lua): the tenant's prefix, the retention and the clock.
    fn invocation<'a>(&self, script: &'a Script, tenant: &TenantId) -> ScriptInvocation<'a> {
        first_args(script, &self.keys, tenant, self.retention_ms, &self.clock)
    }

    /// Runs hold operation `op` for `tenant` through the coalescer, which
    /// may send it in one call with others (`batch.rs`).
    async fn batched(
        &self,
        op: &'static str,
        tenant: &TenantId,
        args: impl FnOnce(&mut OpArgs),
    ) -> Result<Value, Error> {
        let mut a = OpArgs::default();
        args(&mut a);
        self.batcher.call(tenant, op, a).await
    }

    /// Runs `script` for `tenant` with the standard first arguments,
    /// timing it.
    async fn run(
        &self,
        name: &'static str,
        script: &Script,
        tenant: &TenantId,
        args: impl FnOnce(&mut ScriptInvocation<'_>),
    ) -> Result<Value, Error> {
        let mut inv = self.invocation(script, tenant);
        args(&mut inv);
        let started = Instant::now();
        let mut con = self.con.clone();
        let result = inv.invoke_async::<Value>(&mut con).await;
        metrics::histogram!(metric::REDIS_SCRIPT_SECONDS, "script" => name)
            .record(started.elapsed().as_secs_f64());
        // Scripts may append events too: the drainer reads this tenant's
        // stream next round (src/jobs/drainer.rs).
        self.batcher.touch(tenant);
        Ok(result?)
    }

    /// Holds units (`reserve.lua`); for a sale lock, only if the listing
    /// mirror says `listed`'s cards are live on its channel (else
    /// `Unlisted`), and an existing lock under `id` is answered `Again`.
    pub async fn reserve(
        &self,
        tenant: &TenantId,
        hold: NewHold<'_>,
        listed: Option<Listed<'_>>,
    ) -> Result<HoldReply, Error> {
        self.hold_op(tenant, Op::Reserve(hold, listed)).await
    }

    /// Takes and sells units in one step (`claim.lua`).
    pub async fn claim(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        lines: &Lines,
        customer: Option<&CustomerLimit>,
    ) -> Result<HoldReply, Error> {
        let claim = Op::Claim {
            id,
            job,
            lines,
            customer,
        };
        self.hold_op(tenant, claim).await
    }

    /// Sells an active hold (`commit.lua`).
    pub async fn commit(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        order_id: &str,
    ) -> Result<HoldReply, Error> {
        self.hold_op(tenant, Op::Commit { id, job, order_id }).await
    }

    /// Gives an active hold back (`release.lua`).
    pub async fn release(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
    ) -> Result<HoldReply, Error> {
        self.hold_op(tenant, Op::Release { id, job }).await
    }

    /// Runs `op` through the coalescer and reads its reply.
    async fn hold_op(&self, tenant: &TenantId, op: Op<'_>) -> Result<HoldReply, Error> {
        let (name, args) = self.op_args(&op);
        let v = self.batcher.call(tenant, name, args).await?;
        match op {
            Op::Claim { id, job, lines, .. } => reply::claim_reply(id, job, lines, &v),
            _ => reply::hold_reply(op.id(), &v),
        }
    }

    /// `op`'s name in the batch function (lua/batch.lua) and its own
    /// arguments, in its script's order (each script's header).
    fn op_args(&self, op: &Op<'_>) -> (&'static str, OpArgs) {
        let mut i = OpArgs::default();
        let name = match *op {
            Op::Reserve(hold, listed) => {
                let ttl_ms = i64::try_from(hold.ttl.as_millis()).unwrap_or(i64::MAX);
                let (ck, limit) = customer_args(hold.customer);
                i.arg(hold.id.as_str())
                    .arg(hold.job.as_str())
                    .arg(ttl_ms)
                    .arg(lines_json(hold.lines))
                    .arg(ck)
                    .arg(limit)
                    .arg(hold.reference)
                    .arg(self.max_active_holds);
                if let Some(listed) = listed {
                    i.arg(listed.channel.as_str());
                    for card in listed.cards {
                        i.arg(card.as_str());
                    }
                }
                "reserve"
            }
            Op::Claim {
                id,
                job,
                lines,
                customer,
            } => {
                let (ck, limit) = customer_args(customer);
                i.arg(id.as_str())
                    .arg(job.as_str())
                    .arg(lines_json(lines))
                    .arg(ck)
                    .arg(limit);
                "claim"
            }
            Op::Commit { id, job, order_id } => {
                i.arg(id.as_str()).arg(job.as_str()).arg(order_id);
                "commit"
            }
            Op::Release { id, job } => {
                i.arg(id.as_str()).arg(job.as_str());
                "release"
            }
        };
        (name, i)
    }

    /// `op` alone in one call of the batch function, as a command line:
    /// the benchmark's Redis baseline (src/bench), the engine's own code
    /// and arguments at one operation a call, where the engine sends many
    /// in one (`batch.rs`). The library is loaded first.
    pub async fn single_op_command(
        &self,
        tenant: &TenantId,
        op: Op<'_>,
    ) -> Result<Vec<String>, Error> {
        scripts::load(&mut self.con.clone(), &scripts::BATCH).await?;
        let (name, args) = self.op_args(&op);
        let mut line = vec![
            "FCALL".to_string(),
            scripts::BATCH.function.clone(),
            "0".into(),
            self.keys.tenant(tenant),
            self.retention_ms.to_string(),
            self.clock.now_ms().to_string(),
            name.into(),
            args.0.len().to_string(),
        ];
        line.extend(
            args.0
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
        );
        Ok(line)
    }

    /// Moves an active hold's expiry (`extend.lua`).
    pub async fn extend(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        ttl: Duration,
        max_extensions: u32,
        extension_id: &str,
    ) -> Result<HoldReply, Error> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let v = self
            .batched("extend", tenant, |i| {
                i.arg(id.as_str())
                    .arg(job.as_str())
                    .arg(ttl_ms)
                    .arg(max_extensions)
                    .arg(extension_id);
            })
            .await?;
        reply::hold_reply(id, &v)
    }

    /// Reads a hold (`get_hold.lua`).
    pub async fn get_hold(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
    ) -> Result<HoldReply, Error> {
        let v = self
            .batched("get_hold", tenant, |i| {
                i.arg(id.as_str()).arg(job.as_str());
            })
            .await?;
        reply::hold_reply(id, &v)
    }

    /// Reads pools' counters (`get_pools.lua`); `None` where Redis lacks one.
    pub async fn get_pools(
        &self,
        tenant: &TenantId,
        pools: &[PoolId],
    ) -> Result<Vec<Option<RedisPool>>, Error> {
        let mut inv = self.invocation(&scripts::GET_POOLS, tenant);
        for p in pools {
            inv.arg(p.as_str());
        }
        let mut con = self.con.clone();
        let v: Value = inv.invoke_async(&mut con).await?;
        reply::pools_reply(&v, pools.len())
    }

    /// Reads who holds or sold each pool (`holders.lua`).
    pub async fn holders(&self, tenant: &TenantId, pools: &[PoolId]) -> Result<Vec<Holder>, Error> {
        let v = self
            .run("holders", &scripts::HOLDERS, tenant, |i| {
                for p in pools {
                    i.arg(p.as_str());
                }
            })
            .await?;
        reply::holders_reply(&v, pools.len())
    }

    /// Writes `cards`' state on `channel` into the listing mirror, as of
    /// `version` (`set_listings.lua`): entries holding a newer version are
    /// left alone. Returns how many changed.
    pub async fn set_listings(
        &self,
        tenant: &TenantId,
        channel: &ChannelSlug,
        version: i64,
        live: bool,
        cards: &[CardId],
    ) -> Result<i64, Error> {
        let v = self
            .run("set_listings", &scripts::SET_LISTINGS, tenant, |i| {
                i.arg(channel.as_str()).arg(version).arg(flag(live));
                for c in cards {
                    i.arg(c.as_str());
                }
            })
            .await?;
        reply::int_reply("set_listings", &v)
    }
}

/// A Redis setting's value (`CONFIG GET name`), or `None` when Redis will
/// not say (managed services often disable CONFIG): the daemon's check of
/// its durability settings at start, and the bench's report of them.
pub async fn config_get(con: &mut impl redis::aio::ConnectionLike, name: &str) -> Option<String> {
    let reply: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(con)
        .await
        .ok()?;
    reply.into_iter().nth(1)
}

/// `script` with the arguments every script starts with (lib.lua): the
/// tenant's prefix, the retention and the clock.
fn first_args<'a>(
    script: &'a Script,
    keys: &Keys,
    tenant: &TenantId,
    retention_ms: i64,
    clock: &RedisClock,
) -> ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
    inv.arg(keys.tenant(tenant))
        .arg(retention_ms)
        .arg(clock.now_ms());
    inv
}

fn flag(b: bool) -> &'static str {
    if b { "1" } else { "0" }
}

fn customer_args(customer: Option<&CustomerLimit>) -> (String, u32) {
    customer
        .map(|c| (c.key.clone(), c.limit))
        .unwrap_or_default()
}

/// The lines as the scripts take them: `[[pool_id, qty], ...]`. Pool ids are
/// key-safe names, so they need no escaping beyond JSON's.
fn lines_json(lines: &Lines) -> String {
    pairs_json(
        lines
            .as_slice()
            .iter()
            .map(|l| (l.pool.as_str(), l.quantity.get())),
    )
}

/// Lines as a take sends them, `[[pool_id, qty], ...]`: the request digest
/// of a one-line take is of these very bytes (`restore.rs` makes them again).
fn pairs_json<'a>(pairs: impl Iterator<Item = (&'a str, i64)>) -> String {
    let v: Vec<(&str, i64)> = pairs.collect();
    // Serialising strings and integers cannot fail.
    serde_json::to_string(&v).expect("lines serialise")
}

/// Redis's clock in ms, and the instant halfway through the round trip that
/// read it.
async fn read_time(con: &mut ConnectionManager) -> Result<(i64, Instant), Error> {
    let sent = Instant::now();
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(con).await?;
    let at = sent + sent.elapsed() / 2;
    Ok((secs * 1000 + micros / 1000, at))
}

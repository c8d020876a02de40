//! The hold engine: reserve, commit, release, extend, claim and reads, on
//! top of the stores.
//!
//! The rules live in the Lua scripts (atomic in Redis) and, for the
//! fallback, in the Postgres transactions of `store/postgres/fallback/`.
//! The engine's own jobs are escrow (`escrow.rs`: granting Redis its share
//! of each pool, Postgres first; `capacity.rs`: operators' changes to a
//! pool's capacity and units in doubt) and routing: while the circuit
//! (`circuit.rs`) is closed, calls go to Redis; when Redis fails they go to
//! Postgres, which sells only what was never granted to Redis, so the two
//! can never sell the same unit. A hold lives where it was made: calls about it go there.

mod capacity;
mod circuit;
mod escrow;
mod grants;
mod ids;
mod lost;
mod reads;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::Counter;

pub use capacity::Capacity;
pub use circuit::Circuit;
pub use grants::GrantPolicy;

use crate::domain::{Hold, HoldId, HoldState, Job, Lines, PoolId, TakeOutcome, TenantId};
use crate::error::Error;
use crate::store::HoldReply;
use crate::store::postgres::{PgStore, PgTake, TakeQueue};
use crate::store::redis::{CustomerLimit, Listed, NewHold, RedisStore};
use crate::telemetry::{Handles, metric};

/// How many "sweep first" answers a take accepts (the engine sweeps and
/// retries after each but the last, then answers UNAVAILABLE). One sweep
/// settles a pool, so a third means other calls keep changing it. "Grant
/// first" is retried until the take's grant wait ends instead
/// ([`escrow::GrantWait`], 5 s in all): in a crowd, the grant one take
/// waited for is sold to others as often as not, and a sale of 1,000 has
/// a dozen grants (the last of a unit or two) before it sells out; counted
/// like sweeps, takes were answered UNAVAILABLE while the pool still sold
/// (deploy/BENCHMARKS.md, "a sale's opening").
const TAKE_SWEEPS: usize = 3;
/// Holds one sweep script finalises, and how many such batches one
/// [`Engine::finish_due`] runs at most (200,000 holds).
const SWEEP_BATCH: u32 = 500;
const SWEEP_BATCHES: usize = 400;
/// Once the oldest hold waiting for its EXPIRED state has been due this
/// long, a sweeper round writes all of them (up to [`SWEEP_BATCHES`]):
/// pacing must not let a tenant whose holds expire faster than the pace
/// fall behind for good.
const BOOKING_BEHIND_MS: i64 = 30_000;

/// A pool's counts across Redis and Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// The pool.
    pub pool: PoolId,
    /// Capacity (lowered to the pool's ceiling, if it has one); `None` when
    /// unlimited.
    pub capacity: Option<i64>,
    /// Units sold, on either path.
    pub sold: i64,
    /// Units in active holds.
    pub held: i64,
    /// Units in doubt after a store failure.
    pub in_doubt: i64,
    /// Units that can be taken now (0 when unlimited).
    pub available: i64,
    /// Units currently delegated to Redis.
    pub granted_to_redis: i64,
    /// The epoch of that grant.
    pub epoch: i64,
    /// Available units at or below which a low-stock alert fires.
    pub low_stock_threshold: Option<i64>,
}

/// A request to take units: a hold, or a claim when `ttl` is `None`.
#[derive(Debug, Clone)]
pub struct Take {
    /// The hold or claim id.
    pub id: HoldId,
    /// The job taking.
    pub job: Job,
    /// What to take.
    pub lines: Lines,
    /// How long to hold; `None` to sell at once (a claim).
    pub ttl: Option<Duration>,
    /// The customer's limit, if the pool's owner set one.
    pub customer: Option<CustomerLimit>,
    /// The caller's reference (cart, session).
    pub reference: String,
}

/// What [`Engine::take_if_listed`] found.
#[derive(Debug)]
pub enum ListedTake {
    /// Redis cannot vouch for the cards' listings (or cannot be reached):
    /// nothing changed; check them in Postgres.
    NotMirrored,
    /// The id already names a hold of the take's job; the hold as it
    /// stands, for the caller to judge (a retry, a refresh, a reuse).
    Again(Hold),
    /// Taken, or refused, as [`Engine::take`] answers.
    Took(TakeOutcome),
}

/// The engine, shared behind an `Arc` ([`Engine::new`] makes one).
pub struct Engine {
    /// The engine itself, for work that must outlive the call that asked
    /// for it (a grant: escrow.rs, `serially`).
    me: std::sync::Weak<Engine>,
    redis: RedisStore,
    pg: PgStore,
    /// Gathers concurrent fallback takes into shared transactions.
    fallback: TakeQueue,
    /// Gathers concurrent pool reads into shared reads of the stores.
    reads: reads::PoolReads,
    /// Each tenant's grant lock, which serialises the tenant's grants so
    /// that a pool being loaded is never mistaken for a pool that Redis
    /// lost, and the count of works run under it (escrow.rs).
    escrows: escrow::Escrows,
    /// Each pool's last grant, which sizes the next (escrow.rs). A poisoned
    /// lock is used as it is: the worst a half-written entry costs is the
    /// size of one grant.
    last_grants: std::sync::Mutex<grants::LastGrants>,
    circuit: Circuit,
    /// Take ids Redis did not answer since the circuit last closed.
    unanswered: ids::IdSet,
    /// Take ids the fallback took for (`ids.rs`).
    fallback_served: ids::IdSet,
    policy: GrantPolicy,
    max_extensions: u32,
}

impl Engine {
    /// An engine over the two stores. Starts the fallback's and the pool
    /// reads' coalescers, so it must be called on a Tokio runtime.
    pub fn new(
        redis: RedisStore,
        pg: PgStore,
        policy: GrantPolicy,
        max_extensions: u32,
    ) -> Arc<Self> {
        metrics::gauge!(metric::CIRCUIT_OPEN).set(0.0);
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            redis,
            fallback: TakeQueue::start(pg.clone()),
            reads: reads::PoolReads::start(me.clone()),
            pg,
            escrows: escrow::Escrows::default(),
            last_grants: std::sync::Mutex::default(),
            circuit: Circuit::default(),
            unanswered: Default::default(),
            fallback_served: Default::default(),
            policy,
            max_extensions,
        })
    }

    /// The Redis store.
    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// The Postgres store.
    pub fn pg(&self) -> &PgStore {
        &self.pg
    }

    /// The circuit in front of Redis.
    pub fn circuit(&self) -> &Circuit {
        &self.circuit
    }

    /// Takes units: holds them for `ttl`, or sells them at once when `ttl` is
    /// `None`. All-or-nothing across the lines; business refusals are
    /// outcomes, not errors. Served by Redis, or by the Postgres fallback
    /// while Redis fails.
    pub async fn take(&self, tenant: &TenantId, take: &Take) -> Result<TakeOutcome, Error> {
        if self.circuit.closed() {
            self.unanswered.forget_all();
            if let Some(answer) = self.fallback_took(tenant, take).await? {
                return Ok(answer);
            }
            match self.take_redis(tenant, take).await {
                Err(Error::RedisUnavailable(why)) => {
                    tracing::warn!(%tenant, id = %take.id, error = %why, "redis failed; taking from the fallback");
                    self.circuit.failure();
                    self.unanswered.note(tenant, &take.id);
                    return self
                        .take_fallback(tenant, take)
                        .await
                        .and_then(|o| in_doubt(take, o));
                }
                other => return other,
            }
        }
        let outcome = self.take_fallback(tenant, take).await?;
        if self.unanswered.contains(tenant, &take.id) {
            return in_doubt(take, outcome);
        }
        Ok(outcome)
    }

    /// [`Self::take_pg`], remembering the ids it takes for.
    async fn take_fallback(&self, tenant: &TenantId, take: &Take) -> Result<TakeOutcome, Error> {
        let outcome = self.take_pg(tenant, take).await?;
        if matches!(outcome, TakeOutcome::Taken(_)) {
            self.fallback_served.note(tenant, &take.id);
        }
        Ok(outcome)
    }

    /// The fallback's answer to the retry of a take it served while Redis
    /// was away. Redis knows nothing of that id: it would refuse the retry
    /// (sold out) though it succeeded, or take again, making a second hold
    /// under the id (a twin, with its own expiry). `None` for any other id,
    /// and for one whose hold the drainer found Redis also had and undid
    /// here (`SERVED_BY_FAST_PATH`): Redis's answer stands.
    async fn fallback_took(
        &self,
        tenant: &TenantId,
        take: &Take,
    ) -> Result<Option<TakeOutcome>, Error> {
        if !self.fallback_served.contains(tenant, &take.id) {
            return Ok(None);
        }
        match self.take_pg(tenant, take).await {
            Err(Error::Unavailable(_)) => Ok(None),
            answer => answer.map(Some),
        }
    }

    async fn take_redis(&self, tenant: &TenantId, take: &Take) -> Result<TakeOutcome, Error> {
        let reply = self.take_redis_reply(tenant, take, None).await?;
        served_by_redis(take, reply)
    }

    /// A sale lock's take in one Redis call (`reserve.lua` with a channel):
    /// Redis checks the listing mirror, answers an earlier lock under the
    /// same id, or takes the cards. Redis alone: `NotMirrored` when the
    /// mirror does not vouch for every card or Redis cannot answer, and
    /// the caller checks Postgres and takes the usual way.
    pub async fn take_if_listed(
        &self,
        tenant: &TenantId,
        take: &Take,
        listed: Listed<'_>,
    ) -> Result<ListedTake, Error> {
        if !self.circuit.closed() {
            return Ok(ListedTake::NotMirrored);
        }
        let reply = match self.take_redis_reply(tenant, take, Some(listed)).await {
            Err(Error::RedisUnavailable(why)) => {
                tracing::warn!(%tenant, id = %take.id, error = %why, "redis failed; checking the lock in postgres");
                self.circuit.failure();
                return Ok(ListedTake::NotMirrored);
            }
            reply => reply?,
        };
        Ok(match reply {
            HoldReply::Unlisted => ListedTake::NotMirrored,
            HoldReply::Again(hold) => ListedTake::Again(hold),
            reply => ListedTake::Took(served_by_redis(take, reply)?),
        })
    }

    /// Sends a take to Redis until it answers something other than "sweep
    /// first" or "grant first", doing either in between.
    async fn take_redis_reply(
        &self,
        tenant: &TenantId,
        take: &Take,
        listed: Option<Listed<'_>>,
    ) -> Result<HoldReply, Error> {
        let mut sweeps = 0;
        let mut waiting = escrow::GrantWait::default();
        loop {
            let reply = match take.ttl {
                Some(ttl) => {
                    let hold = NewHold {
                        id: &take.id,
                        job: take.job,
                        ttl,
                        lines: &take.lines,
                        customer: take.customer.as_ref(),
                        reference: &take.reference,
                    };
                    self.redis.reserve(tenant, hold, listed).await?
                }
                None => {
                    debug_assert!(listed.is_none(), "a claim has no listing condition");
                    self.redis
                        .claim(
                            tenant,
                            &take.id,
                            take.job,
                            &take.lines,
                            take.customer.as_ref(),
                        )
                        .await?
                }
            };
            self.circuit.success();
            match &reply {
                HoldReply::Busy if sweeps + 1 < TAKE_SWEEPS => {
                    sweeps += 1;
                    self.finish_due(tenant, None).await?;
                }
                HoldReply::Busy => {
                    return Err(Error::Unavailable(
                        "expired holds kept being swept while this take waited; retry with the same id"
                            .into(),
                    ));
                }
                HoldReply::NeedGrant(pools) => {
                    let needed: Vec<(PoolId, i64)> = take
                        .lines
                        .as_slice()
                        .iter()
                        .filter(|l| pools.contains(&l.pool))
                        .map(|l| (l.pool.clone(), l.quantity.get()))
                        .collect();
                    self.grant(tenant, &needed, waiting.until()).await?;
                }
                _ => return Ok(reply),
            }
        }
    }

    /// Gives back the units of the tenant's expired holds in bounded
    /// batches (each one short script, so Redis keeps serving everyone
    /// else meanwhile) until none is out: the sweeper's round
    /// (`states: Some(n)`), and what a take answered BUSY waits for
    /// (`None`). A take also needs the holds due in the expiry buckets that
    /// hold "now" (lua/lib.lua), which its refusal depends on; the sweeper
    /// leaves them for the round after their bucket ends (50 ms), since
    /// finding them means reading every hold of that bucket.
    ///
    /// A sweeper round also writes the EXPIRED state (event, audit row,
    /// retention) of up to `n` holds whose units are back, all of them once
    /// they are 30 s late: a burst of 100,000 expiries gives its units back
    /// at once, a bucket at a time, and its per-hold writes are spread over
    /// the next seconds instead of starving the calls made meanwhile
    /// (deploy/BENCHMARKS.md, "mass expiry by bucket"). A take waits only
    /// for the units.
    pub async fn finish_due(&self, tenant: &TenantId, states: Option<i64>) -> Result<(), Error> {
        let now_too = states.is_none();
        let most = states.unwrap_or(0);
        let mut booked = 0;
        let mut behind = false;
        for _ in 0..SWEEP_BATCHES {
            let book = if behind {
                SWEEP_BATCH
            } else {
                u32::try_from((most - booked).clamp(0, i64::from(SWEEP_BATCH))).unwrap_or(0)
            };
            let s = self.redis.sweep(tenant, SWEEP_BATCH, now_too, book).await?;
            let expired = s.ended + s.booked;
            if expired > 0 {
                metrics::counter!(metric::ENGINE_OUTCOMES, "job" => "any", "outcome" => "expired")
                    .increment(expired.unsigned_abs());
            }
            if s.ended > 0 {
                metrics::histogram!(metric::SWEEPER_LAG_SECONDS).record(s.lag_ms as f64 / 1000.0);
            }
            if s.booked > 0 {
                metrics::histogram!(metric::SWEEPER_LAG_SECONDS)
                    .record(s.book_lag_ms as f64 / 1000.0);
            }
            booked += s.booked;
            behind = s.book_lag_ms > BOOKING_BEHIND_MS;
            let book_more = book > 0 && s.still_to_book && (booked < most || behind);
            if !s.still_due && !book_more {
                return Ok(());
            }
        }
        Err(Error::Unavailable(
            "too many holds are expiring at once to answer now; retry with the same id".into(),
        ))
    }

    async fn take_pg(&self, tenant: &TenantId, take: &Take) -> Result<TakeOutcome, Error> {
        if take.customer.is_some() {
            return Err(Error::Unavailable(
                "this sale limits units per customer, which only the fast path can enforce; retry with the same id shortly".into(),
            ));
        }
        let t = PgTake {
            id: take.id.clone(),
            job: take.job,
            lines: take.lines.clone(),
            ttl: take.ttl,
            reference: take.reference.clone(),
        };
        let reply = self.fallback.take(tenant, t).await?;
        let outcome = outcome(take, reply)?;
        metrics::counter!(metric::SERVED_BY, "path" => "postgres").increment(1);
        Ok(outcome)
    }

    /// Runs a call about an existing hold where the hold lives: Redis first
    /// (and the fallback when Redis does not have it: a hold made during an
    /// outage), or only the fallback while the circuit is open, in which
    /// case a hold the fallback does not have may be in Redis: UNAVAILABLE,
    /// retry with the same id.
    async fn on_hold(
        &self,
        id: &HoldId,
        redis: impl Future<Output = Result<HoldReply, Error>>,
        pg: impl Future<Output = Result<HoldReply, Error>>,
    ) -> Result<Hold, Error> {
        if self.circuit.closed() {
            match redis.await {
                Ok(HoldReply::NoHold) => {
                    self.circuit.success();
                    return settle(id, pg.await?);
                }
                Err(Error::RedisUnavailable(why)) => {
                    tracing::warn!(hold = %id, error = %why, "redis failed; looking in the fallback");
                    self.circuit.failure();
                }
                Ok(reply) => {
                    self.circuit.success();
                    return settle(id, reply);
                }
                Err(e) => return Err(e),
            }
        }
        match pg.await? {
            HoldReply::NoHold => Err(Error::Unavailable(format!(
                "hold {id} is not in the fallback and Redis is unreachable; retry with the same id"
            ))),
            reply => settle(id, reply),
        }
    }

    /// Sells an active hold's units, once. With an order id, a hold already
    /// consumed by a different order is refused.
    pub async fn commit(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        order_id: &str,
    ) -> Result<Hold, Error> {
        let hold = self
            .on_hold(
                id,
                self.redis.commit(tenant, id, job, order_id),
                self.pg.fallback_commit(tenant, id, job, order_id),
            )
            .await;
        let hold = self
            .unless_lost(tenant, id, job, hold, |h| match h.state {
                HoldState::Committed if order_id.is_empty() || h.order_id == order_id => {
                    HoldReply::Hold(h)
                }
                HoldState::Committed => HoldReply::OrderMismatch(h),
                _ => HoldReply::NotActiveHold(h),
            })
            .await?;
        count_outcome(job, "committed");
        Ok(hold)
    }

    /// Gives an active hold's units back. Idempotent; a committed hold is
    /// refused.
    pub async fn release(&self, tenant: &TenantId, id: &HoldId, job: Job) -> Result<Hold, Error> {
        let hold = self
            .on_hold(
                id,
                self.redis.release(tenant, id, job),
                self.pg.fallback_release(tenant, id, job),
            )
            .await;
        let hold = self
            .unless_lost(tenant, id, job, hold, |h| match h.state {
                HoldState::Committed => HoldReply::Committed(h),
                _ => HoldReply::Hold(h),
            })
            .await?;
        count_outcome(job, "released");
        Ok(hold)
    }

    /// Moves an active hold's expiry to `ttl` from now, within the server's
    /// extension budget.
    pub async fn extend(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        ttl: Duration,
        extension_id: &str,
    ) -> Result<Hold, Error> {
        self.extend_within(tenant, id, job, ttl, extension_id, self.max_extensions)
            .await
    }

    /// [`Engine::extend`] with this call's own extension budget, for jobs
    /// whose holds may be refreshed any number of times (sale locks).
    pub async fn extend_within(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        ttl: Duration,
        extension_id: &str,
        max: u32,
    ) -> Result<Hold, Error> {
        let hold = self
            .on_hold(
                id,
                self.redis.extend(tenant, id, job, ttl, max, extension_id),
                self.pg
                    .fallback_extend(tenant, id, job, ttl, max, extension_id),
            )
            .await;
        // A hold that ended (sold, given back, expired) is not extended.
        self.unless_lost(tenant, id, job, hold, HoldReply::NotActiveHold)
            .await
    }

    /// Reads a hold; one Redis lost with its data reads as the audit log
    /// has it (`unless_lost`), not as one that never was.
    pub async fn get_hold(&self, tenant: &TenantId, id: &HoldId, job: Job) -> Result<Hold, Error> {
        let hold = self
            .on_hold(
                id,
                self.redis.get_hold(tenant, id, job),
                self.pg.fallback_get(tenant, id, job),
            )
            .await;
        self.unless_lost(tenant, id, job, hold, HoldReply::Hold)
            .await
    }
}

/// The fallback's answer to a take whose Redis call failed (now, or
/// since the circuit last closed: `ids.rs`). The call may have run
/// in Redis before its answer was lost. If the fallback took the
/// units too, the drainer finds the twin and keeps one; but a refusal
/// would tell the caller "not sold" of a take Redis may have made, and
/// nothing would ever set that right: so a refusal is UNAVAILABLE, and
/// the retry with the same id finds Redis's answer, or the fallback's.
fn in_doubt(take: &Take, outcome: TakeOutcome) -> Result<TakeOutcome, Error> {
    match outcome {
        TakeOutcome::Taken(hold) => Ok(TakeOutcome::Taken(hold)),
        _ => Err(Error::Unavailable(format!(
            "redis did not answer, and may have taken {}; retry with the same id",
            take.id
        ))),
    }
}

/// The outcome of a take Redis answered, counted as served there.
fn served_by_redis(take: &Take, reply: HoldReply) -> Result<TakeOutcome, Error> {
    let outcome = outcome(take, reply)?;
    static SERVED: OnceLock<Counter> = OnceLock::new();
    SERVED
        .get_or_init(|| metrics::counter!(metric::SERVED_BY, "path" => "redis"))
        .increment(1);
    Ok(outcome)
}

/// Turns a store's answer to a take into the outcome.
fn outcome(take: &Take, reply: HoldReply) -> Result<TakeOutcome, Error> {
    let outcome = match reply {
        HoldReply::Hold(hold) => TakeOutcome::Taken(hold),
        HoldReply::Short(short) => TakeOutcome::SoldOut(short),
        HoldReply::NotActive(pool) => TakeOutcome::NotActive(pool),
        HoldReply::CustomerLimit(used) => TakeOutcome::CustomerLimit(used),
        HoldReply::IdReused => {
            return Err(Error::AlreadyExists(format!(
                "id {} was already used for a different request; use a new id",
                take.id
            )));
        }
        HoldReply::TooManyHolds(n) => {
            return Err(Error::ResourceExhausted(format!(
                "this tenant has {n} active holds, its limit; commit or release some first"
            )));
        }
        other => {
            return Err(Error::internal(format!(
                "unexpected reply to a take: {other:?}"
            )));
        }
    };
    record_outcome(take, &outcome);
    Ok(outcome)
}

/// Counts engine outcomes for the metrics.
fn record_outcome(take: &Take, outcome: &TakeOutcome) {
    let name = match (outcome, take.ttl) {
        (TakeOutcome::Taken(_), None) => "claimed",
        (TakeOutcome::Taken(_), Some(_)) => "reserved",
        (TakeOutcome::SoldOut(_), _) => "sold_out",
        (TakeOutcome::NotActive(_), _) => "not_active",
        (TakeOutcome::CustomerLimit(_), _) => "customer_limit",
    };
    count_outcome(take.job, name);
}

/// Counts one engine outcome of `job`, with a handle kept per pair.
fn count_outcome(job: Job, outcome: &'static str) {
    // Four jobs, each with a few outcomes it sees often.
    static OUTCOMES: Handles<(Job, &str), Counter, 16> = Handles::new();
    OUTCOMES
        .get((job, outcome), |(job, outcome)| {
            metrics::counter!(metric::ENGINE_OUTCOMES, "job" => job.as_str(), "outcome" => outcome)
        })
        .increment(1);
}

/// Turns a reply about an existing hold into the hold, or the error that
/// says why the call does not fit the hold's life.
fn settle(id: &HoldId, reply: HoldReply) -> Result<Hold, Error> {
    match reply {
        HoldReply::Hold(hold) => Ok(hold),
        HoldReply::NoHold => Err(Error::NotFound(format!("hold {id}"))),
        HoldReply::NotActiveHold(hold) => Err(Error::FailedPrecondition(format!(
            "hold {id} is {}; only an active hold can change",
            state_word(&hold)
        ))),
        HoldReply::OrderMismatch(hold) => Err(Error::FailedPrecondition(format!(
            "hold {id} was already consumed by order {}",
            hold.order_id
        ))),
        HoldReply::Committed(_) => Err(Error::FailedPrecondition(format!(
            "hold {id} is committed; it cannot be released"
        ))),
        HoldReply::ExtendLimit(hold) => Err(Error::FailedPrecondition(format!(
            "hold {id} was already extended {} time(s), the most allowed",
            hold.extensions
        ))),
        HoldReply::StaleEpoch(pool) => Err(Error::FailedPrecondition(format!(
            "hold {id} was made before pool {pool} was reloaded after a Redis failure; its units are in doubt"
        ))),
        other => Err(Error::internal(format!(
            "unexpected reply about hold {id}: {other:?}"
        ))),
    }
}

fn state_word(hold: &Hold) -> &'static str {
    use crate::domain::HoldState::*;
    match hold.state {
        Active => "active",
        Committed => "committed",
        Released => "released",
        Expired => "expired",
    }
}

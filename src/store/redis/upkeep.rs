//! What the background jobs ask of Redis, beside the hold operations of
//! the hot path: grants from Postgres and units handed back
//! (src/engine/escrow.rs), the pools flagged for a refill, the expiry
//! index and the sweep (src/jobs/sweeper.rs), and the marker that tells a
//! Redis that came back empty (src/jobs/redis_watch.rs).

use super::{GrantReply, PoolGrant, RedisStore, ReturnReply, Swept, Watcher, flag, reply, scripts};
use crate::domain::{PoolId, TenantId};
use crate::error::Error;

/// The marker's value where Redis gives no run id (`check_marker`).
const NO_RUN_ID: &str = "present";

impl RedisStore {
    /// Records a grant from Postgres (`grant.lua`).
    pub async fn grant(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        g: &PoolGrant,
    ) -> Result<GrantReply, Error> {
        let v = self
            .run("grant", &scripts::GRANT, tenant, |i| {
                i.arg(pool.as_str())
                    .arg(g.epoch)
                    .arg(g.granted)
                    .arg(flag(g.full))
                    .arg(flag(g.unlimited))
                    .arg(g.window_ms.0)
                    .arg(g.window_ms.1)
                    .arg(g.low_stock_threshold.unwrap_or(-1))
                    .arg(g.ceiling.unwrap_or(-1))
                    .arg(g.low_water)
                    .arg(g.undelegated)
                    .arg(g.prior)
                    .arg(g.reported_sold);
            })
            .await?;
        reply::grant_reply(&v)
    }

    /// Hands `k` units of a pool's grant back to Postgres (`return.lua`).
    pub async fn return_units(
        &self,
        tenant: &TenantId,
        pool: &PoolId,
        epoch: i64,
        k: i64,
    ) -> Result<ReturnReply, Error> {
        let v = self
            .run("return", &scripts::RETURN, tenant, |i| {
                i.arg(pool.as_str()).arg(epoch).arg(k);
            })
            .await?;
        reply::return_reply(&v)
    }

    /// Takes up to `count` pools flagged for a refill from each of
    /// `tenants`, in one round trip; the tenants that had any, with them.
    /// When the refiller asked with a call per tenant, every 50 ms, a
    /// thousand idle shops cost a core (deploy/BENCHMARKS.md, "idle
    /// tenants").
    pub async fn pop_refills(
        &self,
        tenants: &[TenantId],
        count: usize,
    ) -> Result<Vec<(TenantId, Vec<PoolId>)>, Error> {
        if tenants.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for t in tenants {
            pipe.cmd("SPOP").arg(self.keys.refill(t)).arg(count);
        }
        let mut con = self.con.clone();
        let popped: Vec<Vec<String>> = pipe.query_async(&mut con).await?;
        Ok(tenants
            .iter()
            .zip(popped)
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(t, ids)| (t.clone(), ids.into_iter().map(PoolId::from_store).collect()))
            .collect())
    }

    /// The tenants this daemon sent hold operations or ran scripts for
    /// since `watcher` last asked ([`Watcher`]).
    pub fn tenants_touched(&self, watcher: Watcher) -> Vec<TenantId> {
        self.batcher.touched(watcher)
    }

    /// Which of `tenants` have holds in the expiry index, and which of
    /// those may have some due (by Redis's clock), in one round trip: the
    /// first bucket has begun (or its units were given back and its holds
    /// wait for their EXPIRED state), or, with `legacy`, an older build's
    /// index (by bucket, `due`, or from before buckets, `exp`) is not
    /// empty. The sweeper runs its script only for the due ones: a script
    /// call per tenant every 100 ms, due or not, made idle shops cost Redis
    /// and the daemon a core between them at a thousand tenants, and each
    /// command per tenant per look costs 10,000 idle shops about a point
    /// of a core in each (deploy/BENCHMARKS.md, "idle tenants"), so an
    /// older build's holds are looked for only with `legacy` (the
    /// sweeper's look at every tenant, twice a second).
    pub async fn expiry_index(
        &self,
        tenants: &[TenantId],
        legacy: bool,
    ) -> Result<Vec<Indexed>, Error> {
        if tenants.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for t in tenants {
            pipe.cmd("ZRANGE")
                .arg(self.keys.xdue(t))
                .arg(0)
                .arg(0)
                .arg("WITHSCORES");
            if legacy {
                pipe.cmd("EXISTS")
                    .arg(self.keys.legacy_expiry(t))
                    .arg(self.keys.due(t));
            }
        }
        let mut con = self.con.clone();
        let replies: Vec<redis::Value> = pipe.query_async(&mut con).await?;
        let now = self.clock.now_ms() as f64;
        let per_tenant = if legacy { 2 } else { 1 };
        let mut indexed = Vec::new();
        for (t, answers) in tenants.iter().zip(replies.chunks(per_tenant)) {
            let first: Vec<(String, f64)> =
                redis::from_redis_value_ref(&answers[0]).map_err(redis::RedisError::from)?;
            let old_index: i64 = match answers.get(1) {
                Some(v) => redis::from_redis_value_ref(v).map_err(redis::RedisError::from)?,
                None => 0,
            };
            let begun = first.first().is_some_and(|(_, from)| *from <= now);
            if old_index > 0 || !first.is_empty() {
                indexed.push(Indexed {
                    tenant: t.clone(),
                    due: old_index > 0 || begun,
                });
            }
        }
        Ok(indexed)
    }

    /// Answers when Redis answers: the run id of the Redis process that
    /// answered, when the marker does not name it, and `None` when it does.
    /// A run id means Redis came back empty (or is a different Redis), or
    /// restarted since the marker was left: every pool's grant must be
    /// checked, and only then the marker left for it
    /// ([`RedisStore::leave_marker`]), so that no daemon takes the marker
    /// as a sign the check was made while another is still making it.
    ///
    /// The marker names the Redis process, not just that one was there: a
    /// Redis restarted from an older AOF or snapshot, or a replica promoted
    /// with less than its primary had, still has a marker, from another
    /// process. Its pools are checked then too, and one whose Redis counts
    /// went back (`grant.lua`, LOST) has its outstanding grant put in doubt
    /// rather than sold again. A restart that lost nothing costs one check
    /// of every pool with a grant.
    ///
    /// A Redis that refuses `INFO` (an ACL without `@dangerous`, a proxy
    /// that hides it) has no run id to give: the marker then only tells
    /// that Redis was not emptied, as before run ids were kept, and a
    /// restart with older data goes unseen (logged once).
    pub async fn check_marker(&self) -> Result<Option<String>, Error> {
        static NO_INFO: std::sync::Once = std::sync::Once::new();
        let mut con = self.con.clone();
        let info: Result<String, redis::RedisError> =
            redis::cmd("INFO").arg("server").query_async(&mut con).await;
        let run_id = match info {
            Ok(info) => info
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map_or(NO_RUN_ID.to_owned(), |id| id.trim().to_owned()),
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                return Err(e.into());
            }
            Err(e) => {
                NO_INFO.call_once(|| {
                    tracing::warn!(error = %e, "Redis refuses INFO: a restart of Redis with older data will not be noticed (allow INFO for holdfast's Redis user)");
                });
                NO_RUN_ID.to_owned()
            }
        };
        let marker: Option<String> = redis::cmd("GET")
            .arg(self.keys.marker())
            .query_async(&mut con)
            .await?;
        Ok((marker.as_deref() != Some(run_id.as_str())).then_some(run_id))
    }

    /// Leaves the marker for the Redis process `run_id` (or `NO_RUN_ID`), once its pools
    /// were checked ([`RedisStore::check_marker`]).
    pub async fn leave_marker(&self, run_id: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        let _: () = redis::cmd("SET")
            .arg(self.keys.marker())
            .arg(run_id)
            .query_async(&mut con)
            .await?;
        Ok(())
    }

    /// Ends up to `limit` expired holds of a tenant (`sweep.lua`): gives
    /// back the units of the expiry buckets that have ended, ends the due
    /// holds of an older build's index and, with `now_too`, those of the
    /// buckets that hold now; then writes the EXPIRED state of up to
    /// `book` holds whose units are back.
    pub async fn sweep(
        &self,
        tenant: &TenantId,
        limit: u32,
        now_too: bool,
        book: u32,
    ) -> Result<Swept, Error> {
        let v = self
            .run("sweep", &scripts::SWEEP, tenant, |i| {
                i.arg(limit).arg(flag(now_too)).arg(book);
            })
            .await?;
        reply::sweep_reply(&v)
    }
}

/// A tenant with holds in the expiry index ([`RedisStore::expiry_index`]).
#[derive(Debug, Clone)]
pub struct Indexed {
    /// The tenant.
    pub tenant: TenantId,
    /// Whether some of its holds may be due.
    pub due: bool,
}

/// How many ACTIVE holds of the tenant whose keys start with `tenant_prefix`
/// (`hf:{dev}:`), with ids starting with `id_prefix`, were due by `due_by_ms`
/// on Redis's clock and are still not finalised. The sweeper's promise is
/// that this drops to zero within a sweep interval; the fault suite and the
/// bench's expiry probe check it from outside the daemon. It reads every
/// bucket of the expiry index due by then: not for the hot path.
pub async fn overdue_holds(
    con: &mut impl redis::aio::ConnectionLike,
    tenant_prefix: &str,
    due_by_ms: i64,
    id_prefix: &str,
) -> redis::RedisResult<i64> {
    scripts::OVERDUE
        .prepare_invoke()
        .arg(tenant_prefix)
        .arg(0)
        .arg(due_by_ms)
        .arg(due_by_ms)
        .arg(id_prefix)
        .invoke_async(con)
        .await
}

//! The Postgres fallback (ESCROW.md): while Redis is unreachable, holds are
//! taken here, from the share of each pool that was never delegated to
//! Redis, with conditional UPDATEs that re-check the escrow invariant on the
//! pool's own row. Each operation is one transaction that also writes its
//! audit row, so the fallback's events need no drainer.
//!
//! Every operation on a hold id first takes a transaction-scoped advisory
//! lock on (tenant, hold id), then the tenant's pool lock, shared. The
//! drainer holds the pool lock alone while it records Redis's takes, so a
//! hold that reached both stores (a retried in-doubt call) is always
//! noticed by one side or the other.

mod take;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::PgStore;
use super::lock_sales::{LockSale, record_lock_sales};
use super::pools::{PoolWrites, lock_tenant_pools};
use crate::domain::{CardId, Hold, HoldId, HoldState, Job, PoolId, TenantId};
use crate::error::Error;
use crate::store::HoldReply;
use take::lock_ids;
pub use take::{PgTake, SERVED_BY_FAST_PATH};

#[derive(sqlx::FromRow)]
struct HoldRow {
    hold_id: String,
    job: String,
    state: String,
    request: String,
    lines: serde_json::Value,
    expires_at: DateTime<Utc>,
    extensions: i32,
    extension_id: String,
    reference: String,
    order_id: String,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

const HOLD_COLUMNS: &str = "hold_id, job, state::text AS state, request, lines, expires_at, extensions, extension_id, reference, order_id, created_at, finished_at";

/// `lines` summed per pool, in pool order: how a writer that shares the
/// tenant's pool lock must write them.
fn in_pool_order(lines: impl IntoIterator<Item = (String, i64)>) -> BTreeMap<String, i64> {
    let mut by_pool = BTreeMap::new();
    for (pool, qty) in lines {
        *by_pool.entry(pool).or_insert(0) += qty;
    }
    by_pool
}

fn lines_of(v: &serde_json::Value) -> Vec<(String, i64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| {
                    Some((l.get("pool")?.as_str()?.to_owned(), l.get("qty")?.as_i64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

impl HoldRow {
    /// What Redis's twin of this undone twin still needs: its extension,
    /// if it was extended.
    fn extension(&self) -> Twin {
        if self.extensions > 0 {
            Twin::Extended {
                until: self.expires_at,
                extension_id: self.extension_id.clone(),
            }
        } else {
            Twin::Undone
        }
    }

    fn hold(&self) -> Hold {
        Hold {
            id: HoldId::from_store(self.hold_id.clone()),
            state: match self.state.as_str() {
                "A" => HoldState::Active,
                "C" => HoldState::Committed,
                "R" => HoldState::Released,
                _ => HoldState::Expired,
            },
            job: self.job.clone(),
            lines: lines_of(&self.lines)
                .into_iter()
                .map(|(p, q)| (PoolId::from_store(p), q))
                .collect(),
            expires_at_ms: self.expires_at.timestamp_millis(),
            extensions: u32::try_from(self.extensions).unwrap_or(0),
            reference: self.reference.clone(),
            order_id: self.order_id.clone(),
            created_at_ms: self.created_at.timestamp_millis(),
            finished_at_ms: self.finished_at.map_or(0, |t| t.timestamp_millis()),
            // The fencing counter lives in Redis; a hold made while Redis
            // is down has no token (0), which fenced systems treat as unfenced.
            fence: 0,
        }
    }
}

/// What a fallback hold remembers of the take that made it, so that a
/// retry answers as the first time and another request under its id is
/// refused. A batch names each pool once, so its lines are taken in pool
/// order: the same lines in another order are the same request (as in
/// Redis, lua/lib.lua `requests_of`).
fn fingerprint(t: &PgTake) -> String {
    fingerprint_of(t, true)
}

/// Whether `request`, a fallback hold's fingerprint, is `t`'s. A hold made
/// before lines were taken in pool order (2026-12-06) has them in the order
/// they came, and a retry of it must still match.
fn same_request(request: &str, t: &PgTake) -> bool {
    request == fingerprint(t) || request == fingerprint_of(t, false)
}

fn fingerprint_of(t: &PgTake, in_pool_order: bool) -> String {
    let mut lines: Vec<String> = t
        .lines
        .as_slice()
        .iter()
        .map(|l| format!("{}={}", l.pool, l.quantity.get()))
        .collect();
    if in_pool_order {
        // Each pool appears once, so this order is the same for any order sent.
        lines.sort_unstable();
    }
    format!(
        "{}|{}|{}",
        lines.join(","),
        t.job.as_str(),
        if t.ttl.is_some() { "hold" } else { "claim" }
    )
}

async fn lock_id(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    id: &str,
) -> Result<(), Error> {
    lock_ids(tx, tenant, &[id]).await
}

/// Appends the fallback's own audit row.
async fn audit(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    kind: &str,
    row: &HoldRow,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO audit_log (tenant, event_id, kind, job, hold_id, lines, reference, order_id, at)
         VALUES ($1, 'f' || nextval('fallback_event_ids'), $2, $3, $4, $5, $6, $7, now())",
    )
    .bind(tenant.as_str())
    .bind(kind)
    .bind(&row.job)
    .bind(&row.hold_id)
    .bind(&row.lines)
    .bind(&row.reference)
    .bind(&row.order_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Gives a fallback hold's units back to its pools (`sold`: it was
/// committed), in pool order (`PoolWrites::InPoolOrder`).
async fn give_back(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    lines: &serde_json::Value,
    sold: bool,
) -> Result<(), Error> {
    give_back_all(tx, tenant, lines_of(lines), sold).await
}

/// Gives units back to their pools, summed per pool, in pool order, and
/// marks each for the refiller to bring Redis up to date: Redis may have
/// been told the pool was full while these units were held here
/// (migrations/0012_pools_resync_seq.sql).
async fn give_back_all(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    lines: impl IntoIterator<Item = (String, i64)>,
    sold: bool,
) -> Result<(), Error> {
    let column = if sold { "sold_pg" } else { "held_pg" };
    for (pool, qty) in in_pool_order(lines) {
        sqlx::query(&format!(
            "UPDATE pools SET {column} = {column} - $3, resync_seq = resync_seq + 1 WHERE tenant = $1 AND pool_id = $2"
        ))
        .bind(tenant.as_str())
        .bind(pool)
        .bind(qty)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn find(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    id: &str,
) -> Result<Option<HoldRow>, Error> {
    Ok(sqlx::query_as::<_, HoldRow>(&format!(
        "SELECT {HOLD_COLUMNS} FROM pg_holds WHERE tenant = $1 AND hold_id = $2 FOR UPDATE"
    ))
    .bind(tenant.as_str())
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Opens a transaction on one fallback hold of `job`: takes the id's lock,
/// ends the tenant's due holds (so the hold reads as it stands now), and
/// finds it; `None` when the fallback never had it (or it was undone).
///
/// Most lookups that reach the fallback are for ids it never had: Redis
/// had no such hold either, because the id is new (a sale lock's acquire
/// looks its lockRef up first). One indexed read, outside any transaction,
/// answers those; a hold inserted just after it is one that did not exist
/// yet when the call was answered.
async fn open_hold(
    pg: &PgStore,
    tenant: &TenantId,
    id: &HoldId,
    job: Job,
) -> Result<Option<(Transaction<'static, Postgres>, HoldRow)>, Error> {
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_holds WHERE tenant = $1 AND hold_id = $2)",
    )
    .bind(tenant.as_str())
    .bind(id.as_str())
    .fetch_one(pg.pool())
    .await?;
    if !known {
        return Ok(None);
    }
    let mut tx = pg.begin().await?;
    lock_id(&mut tx, tenant, id.as_str()).await?;
    lock_tenant_pools(&mut tx, tenant, PoolWrites::InPoolOrder).await?;
    expire_due(&mut tx, tenant).await?;
    let row = find(&mut tx, tenant, id.as_str())
        .await?
        .filter(|r| r.job == job.as_str() && r.state != "D");
    Ok(row.map(|r| (tx, r)))
}

/// Ends the tenant's due fallback holds as expired (Postgres's clock), so
/// no take ever counts them. Returns how many. `tx` holds the tenant's pool
/// lock (`lock_tenant_pools`): the holds give their units back.
async fn expire_due(tx: &mut Transaction<'_, Postgres>, tenant: &TenantId) -> Result<usize, Error> {
    let due = sqlx::query_as::<_, HoldRow>(&format!(
        "UPDATE pg_holds SET state = 'E', finished_at = now()
         WHERE tenant = $1 AND state = 'A' AND expires_at <= now()
         RETURNING {HOLD_COLUMNS}"
    ))
    .bind(tenant.as_str())
    .fetch_all(&mut **tx)
    .await?;
    give_back_all(
        tx,
        tenant,
        due.iter().flat_map(|r| lines_of(&r.lines)),
        false,
    )
    .await?;
    for row in &due {
        audit(tx, tenant, "expired", row).await?;
    }
    Ok(due.len())
}

impl PgStore {
    /// Commits a fallback hold; `NoHold` when the fallback never had it.
    pub async fn fallback_commit(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        order_id: &str,
    ) -> Result<HoldReply, Error> {
        let Some((mut tx, row)) = open_hold(self, tenant, id, job).await? else {
            return Ok(HoldReply::NoHold);
        };
        match row.state.as_str() {
            "C" if !order_id.is_empty() && !row.order_id.is_empty() && row.order_id != order_id => {
                Ok(HoldReply::OrderMismatch(row.hold()))
            }
            "C" => Ok(HoldReply::Hold(row.hold())),
            "A" => {
                for (pool, qty) in in_pool_order(lines_of(&row.lines)) {
                    sqlx::query("UPDATE pools SET held_pg = held_pg - $3, sold_pg = sold_pg + $3 WHERE tenant = $1 AND pool_id = $2")
                        .bind(tenant.as_str())
                        .bind(pool)
                        .bind(qty)
                        .execute(&mut *tx)
                        .await?;
                }
                let row = sqlx::query_as::<_, HoldRow>(&format!(
                    "UPDATE pg_holds SET state = 'C', order_id = $3, finished_at = now() WHERE tenant = $1 AND hold_id = $2 RETURNING {HOLD_COLUMNS}"
                ))
                .bind(tenant.as_str())
                .bind(id.as_str())
                .bind(order_id)
                .fetch_one(&mut *tx)
                .await?;
                audit(&mut tx, tenant, "committed", &row).await?;
                if job == Job::Lock {
                    // A sale lock completed here sells its cards in this
                    // transaction, as the drainer does for Redis's commits.
                    let sale = LockSale {
                        channel: &row.reference,
                        lock_ref: id.as_str(),
                        cards: lines_of(&row.lines)
                            .iter()
                            .filter_map(|(pool, _)| CardId::of_pool(pool))
                            .collect(),
                        at: Utc::now(),
                    };
                    record_lock_sales(&mut tx, tenant, &[sale]).await?;
                }
                tx.commit().await?;
                Ok(HoldReply::Hold(row.hold()))
            }
            _ => {
                tx.commit().await?;
                Ok(HoldReply::NotActiveHold(row.hold()))
            }
        }
    }

    /// Releases a fallback hold; `NoHold` when the fallback never had it.
    pub async fn fallback_release(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
    ) -> Result<HoldReply, Error> {
        let Some((mut tx, row)) = open_hold(self, tenant, id, job).await? else {
            return Ok(HoldReply::NoHold);
        };
        match row.state.as_str() {
            "C" => Ok(HoldReply::Committed(row.hold())),
            "A" => {
                give_back(&mut tx, tenant, &row.lines, false).await?;
                let row = sqlx::query_as::<_, HoldRow>(&format!(
                    "UPDATE pg_holds SET state = 'R', finished_at = now() WHERE tenant = $1 AND hold_id = $2 RETURNING {HOLD_COLUMNS}"
                ))
                .bind(tenant.as_str())
                .bind(id.as_str())
                .fetch_one(&mut *tx)
                .await?;
                audit(&mut tx, tenant, "released", &row).await?;
                tx.commit().await?;
                Ok(HoldReply::Hold(row.hold()))
            }
            _ => {
                tx.commit().await?;
                Ok(HoldReply::Hold(row.hold()))
            }
        }
    }

    /// Extends a fallback hold; `NoHold` when the fallback never had it.
    pub async fn fallback_extend(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        ttl: Duration,
        max_extensions: u32,
        extension_id: &str,
    ) -> Result<HoldReply, Error> {
        let Some((mut tx, row)) = open_hold(self, tenant, id, job).await? else {
            return Ok(HoldReply::NoHold);
        };
        if !extension_id.is_empty() && row.extension_id == extension_id {
            return Ok(HoldReply::Hold(row.hold()));
        }
        if row.state != "A" {
            tx.commit().await?;
            return Ok(HoldReply::NotActiveHold(row.hold()));
        }
        if u32::try_from(row.extensions).unwrap_or(u32::MAX) >= max_extensions {
            return Ok(HoldReply::ExtendLimit(row.hold()));
        }
        let row = sqlx::query_as::<_, HoldRow>(&format!(
            "UPDATE pg_holds SET expires_at = GREATEST(expires_at, now() + make_interval(secs => $3::double precision / 1000)),
                    extensions = extensions + 1, extension_id = $4
             WHERE tenant = $1 AND hold_id = $2 RETURNING {HOLD_COLUMNS}"
        ))
        .bind(tenant.as_str())
        .bind(id.as_str())
        .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
        .bind(extension_id)
        .fetch_one(&mut *tx)
        .await?;
        audit(&mut tx, tenant, "extended", &row).await?;
        tx.commit().await?;
        Ok(HoldReply::Hold(row.hold()))
    }

    /// Reads a fallback hold (expiring it first if due).
    pub async fn fallback_get(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
    ) -> Result<HoldReply, Error> {
        let Some((tx, row)) = open_hold(self, tenant, id, job).await? else {
            return Ok(HoldReply::NoHold);
        };
        tx.commit().await?;
        Ok(HoldReply::Hold(row.hold()))
    }

    /// The reference (a sale lock's channel) of each unexpired, active
    /// fallback hold of `job` on any of `pools`, by pool. Not for the hot
    /// path: a sale lock asks it only when a card's unit is in no one's
    /// hands in Redis.
    pub async fn fallback_holders(
        &self,
        tenant: &TenantId,
        job: Job,
        pools: &[PoolId],
    ) -> Result<Vec<(PoolId, String)>, Error> {
        let pools: Vec<&str> = pools.iter().map(PoolId::as_str).collect();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT l->>'pool', h.reference
               FROM pg_holds h, jsonb_array_elements(h.lines) l
              WHERE h.tenant = $1 AND h.job = $2 AND h.state = 'A'
                AND h.expires_at > now() AND l->>'pool' = ANY($3)",
        )
        .bind(tenant.as_str())
        .bind(job.as_str())
        .bind(&pools)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(pool, reference)| (PoolId::from_store(pool), reference))
            .collect())
    }

    /// The tenants with fallback holds due (`pg_holds_due` serves it).
    pub async fn fallback_tenants_due(&self) -> Result<Vec<TenantId>, Error> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT tenant FROM pg_holds WHERE state = 'A' AND expires_at <= now()",
        )
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| TenantId::parse(id)).collect()
    }

    /// The sweeper's pass over the fallback: ends due holds. Returns how
    /// many.
    pub async fn fallback_sweep(&self, tenant: &TenantId) -> Result<usize, Error> {
        let mut tx = self.begin().await?;
        lock_tenant_pools(&mut tx, tenant, PoolWrites::InPoolOrder).await?;
        let n = expire_due(&mut tx, tenant).await?;
        tx.commit().await?;
        Ok(n)
    }
}

/// What the drainer must do about a fallback twin of a hold Redis also has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Twin {
    /// None, or nothing to do.
    None,
    /// The fallback twin was active and was undone; Redis's stands.
    Undone,
    /// The fallback twin was active and extended (acknowledged to its
    /// caller), and was undone: Redis's twin must be extended to the same
    /// expiry, or the hold ends before its caller was told.
    Extended {
        /// The fallback twin's expiry.
        until: DateTime<Utc>,
        /// Its last extension's id, so a retry of it finds it done.
        extension_id: String,
    },
    /// The fallback twin was committed (with this order id): Redis's twin
    /// must be committed too before the fallback one is undone.
    Committed(String),
    /// The fallback twin was released or expired: Redis's twin should be
    /// released.
    Ended,
}

impl PgStore {
    /// Called by the drainer, inside its transaction (holding the tenant's
    /// pool lock alone, so no fallback transaction is writing a hold of
    /// the tenant: none needs the id's lock), for a Redis `reserved` or
    /// `claimed` event: finds a fallback twin of the same id and undoes it
    /// when Redis's twin is at least as far along. What is left to do in
    /// Redis can be read from the twin again (a batch read again after a
    /// round that failed before doing it): a committed twin stays
    /// committed until Redis's is ([`PgStore::undo_committed_twin`]), and
    /// an undone one keeps its expiry and extensions.
    pub(super) async fn settle_twin(
        tx: &mut Transaction<'_, Postgres>,
        tenant: &TenantId,
        hold_id: &str,
        redis_sold: bool,
    ) -> Result<Twin, Error> {
        let Some(row) = find(tx, tenant, hold_id).await? else {
            return Ok(Twin::None);
        };
        let undo = match (row.state.as_str(), redis_sold) {
            ("A", _) => Some(false),
            ("C", true) => Some(true),
            ("C", false) => return Ok(Twin::Committed(row.order_id.clone())),
            ("R" | "E", false) => return Ok(Twin::Ended),
            ("D", false) => return Ok(row.extension()),
            _ => None,
        };
        let Some(sold) = undo else {
            return Ok(Twin::None);
        };
        give_back(tx, tenant, &row.lines, sold).await?;
        sqlx::query("UPDATE pg_holds SET state = 'D', finished_at = now() WHERE tenant = $1 AND hold_id = $2")
            .bind(tenant.as_str())
            .bind(hold_id)
            .execute(&mut **tx)
            .await?;
        Ok(if redis_sold {
            Twin::Undone
        } else {
            row.extension()
        })
    }

    /// Undoes a committed fallback twin once Redis's twin is committed.
    pub async fn undo_committed_twin(&self, tenant: &TenantId, hold_id: &str) -> Result<(), Error> {
        let mut tx = self.begin().await?;
        lock_id(&mut tx, tenant, hold_id).await?;
        lock_tenant_pools(&mut tx, tenant, PoolWrites::InPoolOrder).await?;
        if let Some(row) = find(&mut tx, tenant, hold_id)
            .await?
            .filter(|r| r.state == "C")
        {
            give_back(&mut tx, tenant, &row.lines, true).await?;
            sqlx::query("UPDATE pg_holds SET state = 'D', finished_at = now() WHERE tenant = $1 AND hold_id = $2")
                .bind(tenant.as_str())
                .bind(hold_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

//! Takes on the fallback path, several in one transaction.
//!
//! While Redis is down a flash sale's claims all land on one pool row, and
//! a transaction per claim queues every claim behind the one before it on
//! that row's lock, for a round trip and a commit each. So concurrent takes
//! of one tenant are judged together (`take_queue.rs` gathers them): one
//! transaction locks their ids and their pools, walks the takes in order
//! exactly as one-at-a-time transactions would have run them, and writes
//! every accepted hold, audit row and pool total at once. A batch of one is
//! the plain case, so there is one implementation of a take.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::{Postgres, Transaction};

use super::{HOLD_COLUMNS, HoldRow, expire_due, fingerprint, same_request};
use crate::domain::{HoldId, Job, Lines, Shortage, TenantId};
use crate::error::Error;
use crate::store::HoldReply;
use crate::store::postgres::PgStore;
use crate::store::postgres::pools::{PoolWrites, lock_tenant_pools};

/// A take for the fallback.
#[derive(Debug, Clone)]
pub struct PgTake {
    /// The hold or claim id.
    pub id: HoldId,
    /// The job.
    pub job: Job,
    /// The lines.
    pub lines: Lines,
    /// How long to hold; `None` sells at once.
    pub ttl: Option<Duration>,
    /// The caller's reference.
    pub reference: String,
}

/// A pool as a take sees it: units it may still give (`None`: no cap) and
/// whether its sale window is open.
struct Room {
    free: Option<i64>,
    open: bool,
}

/// What one take came to, before anything is written.
enum Verdict {
    /// Answered without writing: a replay, a refusal, an error.
    Answer(Result<HoldReply, Error>),
    /// Taken: the hold and its pool totals are written with the batch.
    Take,
    /// The same id appeared earlier in the batch: runs alone afterwards,
    /// so it replays (or refuses) against what the first one wrote.
    Later,
}

impl PgStore {
    /// Takes units on the fallback path: holds them for `ttl`, or sells them
    /// at once. Answers like the Redis scripts.
    pub async fn fallback_take(&self, tenant: &TenantId, t: &PgTake) -> Result<HoldReply, Error> {
        self.fallback_takes(tenant, std::slice::from_ref(t))
            .await?
            .pop()
            .expect("one answer per take")
    }

    /// Runs `takes` of one tenant in one transaction, in order, each
    /// all-or-nothing across its lines and answered as if it ran alone; one
    /// answer per take. An error of the transaction itself fails them all
    /// (none was written; a retry by id is safe).
    pub async fn fallback_takes(
        &self,
        tenant: &TenantId,
        takes: &[PgTake],
    ) -> Result<Vec<Result<HoldReply, Error>>, Error> {
        let mut tx = self.begin().await?;
        let ids: Vec<&str> = takes.iter().map(|t| t.id.as_str()).collect();
        lock_ids(&mut tx, tenant, &ids).await?;
        lock_tenant_pools(&mut tx, tenant, PoolWrites::InPoolOrder).await?;
        let known: HashMap<String, HoldRow> = sqlx::query_as::<_, HoldRow>(&format!(
            "SELECT {HOLD_COLUMNS} FROM pg_holds WHERE tenant = $1 AND hold_id = ANY($2) FOR UPDATE"
        ))
        .bind(tenant.as_str())
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| (r.hold_id.clone(), r))
        .collect();
        // An id Redis already served (and the drainer recorded) must not be
        // taken twice: the client is retrying a call that succeeded.
        let served: HashSet<String> = sqlx::query_scalar(SERVED_BY_FAST_PATH)
            .bind(tenant.as_str())
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        expire_due(&mut tx, tenant).await?;
        let mut rooms = lock_pools(&mut tx, tenant, takes).await?;

        let mut seen = HashSet::new();
        let verdicts: Vec<Verdict> = takes
            .iter()
            .map(|t| {
                if !seen.insert(t.id.as_str()) {
                    Verdict::Later
                } else if let Some(row) = known.get(t.id.as_str()) {
                    Verdict::Answer(replay(t, row))
                } else if served.contains(t.id.as_str()) {
                    Verdict::Answer(Err(fast_path_served(&t.id)))
                } else {
                    judge(t, &mut rooms)
                }
            })
            .collect();
        let taken: Vec<&PgTake> = takes
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| matches!(v, Verdict::Take))
            .map(|(t, _)| t)
            .collect();
        let mut rows = HashMap::new();
        if !taken.is_empty() {
            add_to_pools(&mut tx, tenant, &taken).await?;
            rows = insert_holds(&mut tx, tenant, &taken).await?;
        }
        tx.commit().await?;

        let mut answers = Vec::with_capacity(takes.len());
        for (t, v) in takes.iter().zip(verdicts) {
            answers.push(match v {
                Verdict::Answer(a) => a,
                Verdict::Take => rows
                    .remove(t.id.as_str())
                    .map(|r: HoldRow| HoldReply::Hold(r.hold()))
                    .ok_or_else(|| Error::internal(format!("hold {} was not written", t.id))),
                Verdict::Later => Box::pin(self.fallback_take(tenant, t)).await,
            });
        }
        Ok(answers)
    }
}

/// Which of the ids `$2` (of tenant `$1`) Redis served and the drainer
/// recorded: the audit log's `reserved` and `claimed` rows not written by
/// the fallback (whose event ids start with `f`). Public so a test can
/// check that an index serves it (migrations/0008).
///
/// The ids are looked up by the takes' hash index alone, and the tenant is
/// checked on the rows found (`OFFSET 0` keeps the planner from pushing it
/// into the scan). Right after a burst of sales, before autovacuum has
/// analysed the audit log, the planner thought a tenant had a few hundred
/// rows and ANDed the tenant's whole range of the `(tenant, event_id)`
/// index into the look-up: 6-10 ms a batch on a log of 120,000 rows, the
/// fallback's largest cost on spread workloads (deploy/BENCHMARKS.md,
/// "the fallback on every workload").
pub const SERVED_BY_FAST_PATH: &str = "SELECT DISTINCT hold_id FROM \
     (SELECT hold_id, tenant, event_id FROM audit_log \
      WHERE hold_id = ANY($2) AND kind IN ('reserved', 'claimed') OFFSET 0) AS taken \
     WHERE tenant = $1 AND event_id NOT LIKE 'f%'";

fn fast_path_served(id: &HoldId) -> Error {
    Error::Unavailable(format!(
        "id {id} was served by the fast path; retry when Redis is back"
    ))
}

/// The answer to a take whose id the fallback already has.
fn replay(t: &PgTake, row: &HoldRow) -> Result<HoldReply, Error> {
    if row.state == "D" {
        return Err(fast_path_served(&t.id));
    }
    Ok(if same_request(&row.request, t) {
        HoldReply::Hold(row.hold())
    } else {
        HoldReply::IdReused
    })
}

/// Checks a new take against what is left of its pools, and on success
/// counts its units out of them (the next take sees what is left).
fn judge(t: &PgTake, rooms: &mut HashMap<String, Room>) -> Verdict {
    let mut short = Vec::new();
    for l in t.lines.as_slice() {
        let Some(room) = rooms.get(l.pool.as_str()) else {
            return Verdict::Answer(Err(Error::NotFound(format!("pool {}", l.pool))));
        };
        if !room.open {
            return Verdict::Answer(Ok(HoldReply::NotActive(l.pool.clone())));
        }
        if let Some(free) = room.free
            && free < l.quantity.get()
        {
            short.push(Shortage {
                pool: l.pool.clone(),
                requested: l.quantity.get(),
                available: free.max(0),
            });
        }
    }
    if !short.is_empty() {
        return Verdict::Answer(Ok(HoldReply::Short(short)));
    }
    for l in t.lines.as_slice() {
        if let Some(room) = rooms.get_mut(l.pool.as_str())
            && let Some(free) = room.free.as_mut()
        {
            *free -= l.quantity.get();
        }
    }
    Verdict::Take
}

/// Takes the hold ids' advisory locks, in a fixed order so that two
/// batches never deadlock: fallback operations on one id run one at a
/// time. (The drainer needs none: it holds the tenant's pool lock alone,
/// which every fallback writer of a hold shares, `audit.rs` `twins`.)
pub(super) async fn lock_ids(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    ids: &[&str],
) -> Result<(), Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(k)
         FROM (SELECT DISTINCT hashtextextended($1 || '/' || id, 7) AS k FROM UNNEST($2::text[]) AS id) ks
         ORDER BY k",
    )
    .bind(tenant.as_str())
    .bind(ids)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Reads what each pool the takes name may still give, locking (in pool
/// order: the caller shares the tenant's pool lock with other writers in
/// pool order) only the pools with units left. Holding these locks, the
/// walk over the takes sees exactly what one-at-a-time transactions would
/// have seen.
///
/// A pool with nothing left is read, not locked, and counts as empty: a
/// take from it is answered short, as one that ran just before a
/// concurrent release would be. A pool that had units when the statement
/// began but none once its lock came free is skipped by the lock (Postgres
/// checks the row again) and counts as empty too. So a batch that sells
/// nothing locks no row and writes nothing, and its commit waits for no
/// WAL flush: after a sell-out, while Redis is away, the stampede's
/// answers no longer queue for the pools' locks and a flush each
/// (deploy/BENCHMARKS.md, "sold out in the fallback").
async fn lock_pools(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    takes: &[PgTake],
) -> Result<HashMap<String, Room>, Error> {
    let mut pools: Vec<&str> = takes
        .iter()
        .flat_map(|t| t.lines.as_slice().iter().map(|l| l.pool.as_str()))
        .collect();
    pools.sort_unstable();
    pools.dedup();
    let rows: Vec<(String, Option<i64>, bool, bool)> = sqlx::query_as(
        "WITH locked AS MATERIALIZED (
           SELECT pool_id,
                  CASE WHEN capacity IS NULL THEN NULL ELSE
                    LEAST(capacity, COALESCE(ceiling, capacity)) - sold_pg - held_pg - sold_prior - in_doubt - (granted - returned) END AS free
           FROM pools
           WHERE tenant = $1 AND pool_id = ANY($2)
             AND (capacity IS NULL OR
                  LEAST(capacity, COALESCE(ceiling, capacity)) - sold_pg - held_pg - sold_prior - in_doubt - (granted - returned) > 0)
           ORDER BY pool_id FOR UPDATE
         )
         SELECT p.pool_id, l.free,
                (p.starts_at IS NULL OR now() >= p.starts_at) AND (p.ends_at IS NULL OR now() < p.ends_at),
                l.pool_id IS NOT NULL
         FROM pools p LEFT JOIN locked l ON l.pool_id = p.pool_id
         WHERE p.tenant = $1 AND p.pool_id = ANY($2)",
    )
    .bind(tenant.as_str())
    .bind(&pools)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(pool, free, open, locked)| {
            let free = if locked { free } else { Some(0) };
            (pool, Room { free, open })
        })
        .collect())
}

/// Adds the taken units to their pools: held for holds, sold for claims,
/// one UPDATE for every pool. The guard re-checks the escrow invariant on
/// each row; it cannot refuse under the locks `lock_pools` holds, and if it
/// ever did the whole batch would fail rather than oversell.
async fn add_to_pools(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    taken: &[&PgTake],
) -> Result<(), Error> {
    let mut totals: HashMap<&str, (i64, i64)> = HashMap::new();
    for t in taken {
        for l in t.lines.as_slice() {
            let (held, sold) = totals.entry(l.pool.as_str()).or_default();
            match t.ttl {
                Some(_) => *held += l.quantity.get(),
                None => *sold += l.quantity.get(),
            }
        }
    }
    let mut pools = Vec::with_capacity(totals.len());
    let (mut held, mut sold) = (Vec::new(), Vec::new());
    for (pool, (h, s)) in &totals {
        pools.push(*pool);
        held.push(*h);
        sold.push(*s);
    }
    let updated = sqlx::query(
        "UPDATE pools p SET held_pg = p.held_pg + d.held, sold_pg = p.sold_pg + d.sold
         FROM UNNEST($2::text[], $3::bigint[], $4::bigint[]) AS d(pool, held, sold)
         WHERE p.tenant = $1 AND p.pool_id = d.pool
           AND (p.capacity IS NULL OR
                LEAST(p.capacity, COALESCE(p.ceiling, p.capacity)) - p.sold_pg - p.held_pg - p.sold_prior - p.in_doubt - (p.granted - p.returned) >= d.held + d.sold)",
    )
    .bind(tenant.as_str())
    .bind(&pools)
    .bind(&held)
    .bind(&sold)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if updated != pools.len() as u64 {
        return Err(Error::internal(format!(
            "fallback guard refused {} of {} pools after their check",
            pools.len() as u64 - updated,
            pools.len()
        )));
    }
    Ok(())
}

/// Writes the taken holds and their audit rows; the rows by hold id.
async fn insert_holds(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    taken: &[&PgTake],
) -> Result<HashMap<String, HoldRow>, Error> {
    let n = taken.len();
    let (mut ids, mut jobs, mut states, mut requests) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut lines, mut ttls, mut refs) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for t in taken {
        ids.push(t.id.as_str());
        jobs.push(t.job.as_str());
        states.push(if t.ttl.is_some() { "A" } else { "C" });
        requests.push(fingerprint(t));
        lines.push(
            t.lines
                .as_slice()
                .iter()
                .map(|l| serde_json::json!({ "pool": l.pool.as_str(), "qty": l.quantity.get(), "epoch": 0 }))
                .collect::<serde_json::Value>()
                .to_string(),
        );
        ttls.push(
            t.ttl
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        );
        refs.push(t.reference.as_str());
    }
    let rows = sqlx::query_as::<_, HoldRow>(&format!(
        "WITH h AS (
           INSERT INTO pg_holds (tenant, hold_id, job, state, request, lines, expires_at, reference, finished_at)
           SELECT $1, u.id, u.job, u.state, u.request, u.lines::jsonb,
                  now() + make_interval(secs => u.ttl::double precision / 1000), u.reference,
                  CASE WHEN u.state = 'C' THEN now() END
           FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[])
                AS u(id, job, state, request, lines, ttl, reference)
           RETURNING *
         ), audited AS (
           INSERT INTO audit_log (tenant, event_id, kind, job, hold_id, lines, reference, order_id, at)
           SELECT tenant, 'f' || nextval('fallback_event_ids'),
                  CASE WHEN state = 'A' THEN 'reserved' ELSE 'claimed' END,
                  job, hold_id, lines, reference, order_id, now()
           FROM h
         )
         SELECT {HOLD_COLUMNS} FROM h"
    ))
    .bind(tenant.as_str())
    .bind(&ids)
    .bind(&jobs)
    .bind(&states)
    .bind(&requests)
    .bind(&lines)
    .bind(&ttls)
    .bind(&refs)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.hold_id.clone(), r)).collect())
}

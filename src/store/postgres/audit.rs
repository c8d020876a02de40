//! The audit log and the write-back of sold counts: the drainer's one
//! transaction per batch of events.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};

use super::PgStore;
use super::fallback::Twin;
use super::lock_sales::{LockSale, record_lock_sales};
use super::pools::{PoolWrites, lock_tenant_pools};
use crate::domain::{CardId, Event, EventLine, Job, TenantId};
use crate::error::Error;

impl PgStore {
    /// Records events exactly once, each with its effects, in one
    /// transaction: an event id seen before is skipped with its effects.
    /// The effects are the sold-count write-back and, for a completed sale
    /// lock, the channel changes and their webhooks (`listings.rs`).
    /// Returns how many were new.
    ///
    /// A `reserved` or `claimed` event whose id the fallback also served (a
    /// retried in-doubt call) settles the twin here; what remains to be done
    /// in Redis is returned for the caller to do after the commit.
    pub async fn record_events(
        &self,
        tenant: &TenantId,
        events: &[Event],
    ) -> Result<(usize, Vec<(String, String, Twin)>), Error> {
        let mut tx = self.begin().await?;
        let fresh: Vec<&Event> = if insert_all(&mut tx, tenant, events).await? {
            events.iter().collect()
        } else {
            // Some were recorded before: a batch read again after a
            // daemon stopped between its commit and its acknowledgement.
            tx.rollback().await?;
            tx = self.begin().await?;
            let new = insert_new(&mut tx, tenant, events).await?;
            events
                .iter()
                .filter(|e| new.contains(e.event_id.as_str()))
                .collect()
        };
        // A batch read again may be one whose round failed after its
        // commit, with a twin's work in Redis undone: every take in it is
        // looked at again (a settled twin is found as such, `settle_twin`).
        let takes: Vec<&Event> = if fresh.len() < events.len() {
            events.iter().filter(|e| e.is_take()).collect()
        } else {
            fresh.iter().copied().filter(|e| e.is_take()).collect()
        };
        let reports = reports(&fresh);
        // The pools are written from here on, and the twins looked for: the
        // tenant's pool lock, alone, comes first (`twins`).
        if !takes.is_empty() || !reports.is_empty() {
            lock_tenant_pools(&mut tx, tenant, PoolWrites::InAnyOrder).await?;
        }
        let twins = twins(&mut tx, tenant, takes).await?;
        let mut follow_ups = Vec::new();
        for e in twins {
            match PgStore::settle_twin(&mut tx, tenant, &e.hold_id, e.kind == "claimed").await? {
                Twin::None | Twin::Undone => {}
                twin => follow_ups.push((e.hold_id.clone(), e.job.clone(), twin)),
            }
        }
        let sales: Vec<LockSale<'_>> = fresh
            .iter()
            .filter(|e| e.sells() && e.job == Job::Lock.as_str())
            .map(|e| LockSale {
                channel: &e.reference,
                lock_ref: &e.hold_id,
                cards: e
                    .lines
                    .iter()
                    .filter_map(|l| CardId::of_pool(&l.pool))
                    .collect(),
                at: e.at,
            })
            .collect();
        record_lock_sales(&mut tx, tenant, &sales).await?;
        write_back(&mut tx, tenant, &reports).await?;
        tx.commit().await?;
        Ok((fresh.len(), follow_ups))
    }

    /// One page of the audit log, oldest first, after row id `after`.
    pub async fn audit_page(
        &self,
        tenant: &TenantId,
        f: &AuditFilter<'_>,
    ) -> Result<Vec<AuditRow>, Error> {
        let rows = sqlx::query_as::<_, AuditRow>(
            "SELECT id, event_id, kind, hold_id, lines, reference, order_id, at FROM audit_log
             WHERE tenant = $1 AND job = $2 AND id > $3
               AND ($4::text IS NULL OR EXISTS (
                     SELECT 1 FROM jsonb_array_elements(lines) l
                     WHERE l->>'pool' = $4 OR starts_with(l->>'pool', $4 || '/')))
               AND ($5::text IS NULL OR reference = $5)
             ORDER BY id
             LIMIT $6",
        )
        .bind(tenant.as_str())
        .bind(f.job)
        .bind(f.after)
        .bind(f.pool)
        .bind(f.reference)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

/// Which audit rows to read.
#[derive(Debug, Clone)]
pub struct AuditFilter<'a> {
    /// The job.
    pub job: &'a str,
    /// Only rows touching this pool or the pools below it (`pool/...`).
    pub pool: Option<&'a str>,
    /// Only rows with this reference.
    pub reference: Option<&'a str>,
    /// Only rows after this row id (the page token).
    pub after: i64,
    /// At most this many.
    pub limit: i64,
}

/// One audit row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    /// The row id (page token).
    pub id: i64,
    /// The event id.
    pub event_id: String,
    /// What happened.
    pub kind: String,
    /// The hold.
    pub hold_id: String,
    /// `[{"pool", "qty", "epoch"}]`.
    pub lines: serde_json::Value,
    /// The reference.
    pub reference: String,
    /// The order id.
    pub order_id: String,
    /// When.
    pub at: DateTime<Utc>,
}

impl PgStore {
    /// Recorded events after `after` and before `before` (stream ids,
    /// exclusive), in stream order: the history a Watch subscriber resuming
    /// from an id older than the Redis stream's retention needs.
    pub async fn events_between(
        &self,
        tenant: &TenantId,
        after: (u64, u64),
        before: Option<(u64, u64)>,
        limit: i64,
    ) -> Result<Vec<Event>, Error> {
        let to_i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (before_ms, before_seq) =
            before.map_or((i64::MAX, i64::MAX), |(a, b)| (to_i(a), to_i(b)));
        // Redis's events only: the fallback's ('f<n>') are not in Watch
        // (README), and their ids are not stream ids. `OFFSET 0` keeps the
        // casts from running on the rows the inner filter drops.
        //
        // A page reads a range of the (tenant, event_id) index, not the
        // tenant's whole log: reading and sorting every row cost 0.4 s a
        // page at 1,000,000 rows, so a subscriber resuming 14,000 events
        // back waited 12 s (deploy/BENCHMARKS.md, "a Watch resume on a
        // grown log"). The ids sort as text by their milliseconds, which
        // have 13 digits from 2001 to 2286, and a shorter string before
        // its extensions (`<ms>` < `<ms>-<seq>`), in C and in
        // natural-language collations alike; only sequence numbers of
        // one millisecond sort as text wrongly ("-10" before "-9"), so
        // the rows are still ordered by number. The range: every id of
        // `after`'s millisecond, and those of later milliseconds up to
        // the one of the `limit`-th id past it (`cap`), which holds at
        // least `limit` ids after `after`, and short of `before`'s next
        // millisecond (without one, of i64::MAX's digits: past every
        // 13-digit id, and before the fallback's 'f' ids).
        let text = |ms: i64| ms.saturating_add(1).to_string();
        let rows: Vec<EventRow> = sqlx::query_as(
            "WITH cap AS (
                 SELECT (split_part(event_id, '-', 1)::bigint + 1)::text AS below
                 FROM audit_log
                 WHERE tenant = $1 AND event_id >= $7 AND event_id < $8 AND event_id NOT LIKE 'f%'
                 ORDER BY event_id OFFSET greatest($6 - 1, 0) LIMIT 1)
             SELECT event_id, kind, job, hold_id, lines, reference, order_id, customer, at
             FROM (SELECT *, split_part(event_id, '-', 1) AS ms, split_part(event_id, '-', 2) AS seq
                   FROM audit_log
                   WHERE tenant = $1 AND event_id >= $9 AND event_id NOT LIKE 'f%'
                     AND event_id < LEAST((SELECT below FROM cap), $8)
                   OFFSET 0) AS redis_events
             WHERE (ms::bigint, seq::bigint) > ($2, $3) AND (ms::bigint, seq::bigint) < ($4, $5)
             ORDER BY ms::bigint, seq::bigint
             LIMIT $6",
        )
        .bind(tenant.as_str())
        .bind(to_i(after.0))
        .bind(to_i(after.1))
        .bind(before_ms)
        .bind(before_seq)
        .bind(limit)
        .bind(text(to_i(after.0)))
        .bind(text(before_ms))
        .bind(to_i(after.0).to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Event {
                    lines: serde_json::from_value(r.lines)
                        .map_err(|e| Error::Internal(e.into()))?,
                    event_id: r.event_id,
                    kind: r.kind,
                    job: r.job,
                    hold_id: r.hold_id,
                    reference: r.reference,
                    order_id: r.order_id,
                    customer: r.customer,
                    at: r.at,
                })
            })
            .collect()
    }
}

/// An audit row read back as an event.
#[derive(sqlx::FromRow)]
struct EventRow {
    event_id: String,
    kind: String,
    job: String,
    hold_id: String,
    lines: serde_json::Value,
    reference: String,
    order_id: String,
    customer: String,
    at: DateTime<Utc>,
}

/// The audit rows of `events`, in stream order: the statement without its
/// ending, for `insert_all` and `insert_new`.
const INSERT: &str = "INSERT INTO audit_log (tenant, event_id, kind, job, hold_id, lines, reference, order_id, customer, at)
     SELECT $1, e.event_id, e.kind, e.job, e.hold_id, e.lines, e.reference, e.order_id, e.customer, e.at
     FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::text[], $8::text[], $9::text[], $10::timestamptz[])
          WITH ORDINALITY AS e(event_id, kind, job, hold_id, lines, reference, order_id, customer, at, n)
     ORDER BY e.n";

/// Inserts the audit rows of `events`, all of them taken to be new: true
/// when they were. False when one was recorded before (the unique event id
/// refused it), and then `tx` is aborted, with nothing written.
///
/// The drainer reads each event once, so nearly every batch is new, and a
/// plain insert costs Postgres ~4 µs a row less than `insert_new`'s
/// `ON CONFLICT DO NOTHING`, a fifth of what an event costs it
/// (deploy/BENCHMARKS.md, 2026-12-04, morning).
async fn insert_all(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    events: &[Event],
) -> Result<bool, Error> {
    match bind_events(INSERT, tenant, events).execute(&mut **tx).await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_database_error()
                .is_some_and(|d| d.is_unique_violation()) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Inserts the audit rows of `events` that are new; returns their ids (an
/// event recorded before is skipped).
async fn insert_new(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    events: &[Event],
) -> Result<HashSet<String>, Error> {
    let sql = format!("{INSERT} ON CONFLICT (tenant, event_id) DO NOTHING RETURNING event_id");
    let rows = bind_events(&sql, tenant, events)
        .fetch_all(&mut **tx)
        .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>(0).map_err(Error::from))
        .collect()
}

/// `sql` (`INSERT` and its ending) with the columns of `events` bound.
fn bind_events<'q>(
    sql: &'q str,
    tenant: &'q TenantId,
    events: &'q [Event],
) -> Query<'q, Postgres, PgArguments> {
    // Written straight from the lines as `jsonb` (sqlx's `Json`), not
    // through a `serde_json::Value` tree per event: 1.5 points of the
    // daemon under claim-hot, with the same binary input for Postgres
    // (binding JSON text and casting it in the statement cost Postgres
    // ~2 µs a row more; deploy/BENCHMARKS.md, "what the drainer costs
    // claim-hot").
    let lines: Vec<Json<&[EventLine]>> = events.iter().map(|e| Json(e.lines.as_slice())).collect();
    let column = |f: fn(&Event) -> &str| events.iter().map(f).collect::<Vec<&str>>();
    let at: Vec<DateTime<Utc>> = events.iter().map(|e| e.at).collect();
    sqlx::query(sql)
        .bind(tenant.as_str())
        .bind(column(|e| &e.event_id))
        .bind(column(|e| &e.kind))
        .bind(column(|e| &e.job))
        .bind(column(|e| &e.hold_id))
        .bind(lines)
        .bind(column(|e| &e.reference))
        .bind(column(|e| &e.order_id))
        .bind(column(|e| &e.customer))
        .bind(at)
}

/// The takes among `takes` whose hold id the fallback also served.
///
/// `tx` holds the tenant's pool lock alone (`PoolWrites::InAnyOrder`), and
/// every fallback transaction that writes a hold holds it shared from
/// before it looks for the drainer's rows until it commits
/// (`fallback/take.rs`). So a fallback take of one of these ids
/// either committed before this look, and is found here, or waits for this
/// transaction to commit, and then finds its audit row and refuses the id.
///
/// Until 2026-12-07 the drainer took each take's hold-id lock for this, as
/// the fallback does, one advisory lock per take on top of the pool lock
/// nearly every batch took anyway (deploy/BENCHMARKS.md, "2026-12-07,
/// 13:30: the twin check without a lock per take").
async fn twins<'e>(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    takes: Vec<&'e Event>,
) -> Result<Vec<&'e Event>, Error> {
    if takes.is_empty() {
        return Ok(takes);
    }
    let ids: Vec<&str> = takes.iter().map(|e| e.hold_id.as_str()).collect();
    // A statement of its own, after the lock's: a statement sees what was
    // committed when it began, so a look inside the lock's statement would
    // miss a fallback take that committed while the lock was awaited.
    let served: HashSet<String> =
        sqlx::query_scalar("SELECT hold_id FROM pg_holds WHERE tenant = $1 AND hold_id = ANY($2)")
            .bind(tenant.as_str())
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect();
    Ok(takes
        .into_iter()
        .filter(|e| served.contains(&e.hold_id))
        .collect())
}

/// What a batch of events sold from one pool, for the write-back: the
/// units of the newest epoch the batch names for it, and those of older
/// ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Report<'e> {
    pool: &'e str,
    epoch: i64,
    qty: i64,
    older: i64,
}

/// The new events' sales summed per pool, newest epoch apart from older.
///
/// Postgres opens every epoch (`open_epoch`) before Redis can sell in it,
/// so no event names an epoch newer than its pool's row; only the newest
/// one a batch names can be the row's current epoch.
fn reports<'e>(fresh: &[&'e Event]) -> Vec<Report<'e>> {
    let mut by_pool: HashMap<&str, Report<'e>> = HashMap::new();
    for e in fresh.iter().filter(|e| e.sells()) {
        for l in &e.lines {
            let r = by_pool.entry(l.pool.as_str()).or_insert(Report {
                pool: l.pool.as_str(),
                epoch: l.epoch,
                qty: 0,
                older: 0,
            });
            match l.epoch.cmp(&r.epoch) {
                std::cmp::Ordering::Equal => r.qty += l.qty,
                std::cmp::Ordering::Less => r.older += l.qty,
                std::cmp::Ordering::Greater => {
                    r.older += r.qty;
                    r.epoch = l.epoch;
                    r.qty = l.qty;
                }
            }
        }
    }
    by_pool.into_values().collect()
}

/// Writes back what the new events sold, one row update per pool; `tx`
/// holds the tenant's pool lock.
///
/// Write-back changes what Postgres reports, never what it may sell: the
/// units are already inside `granted`. A late report for a closed epoch
/// turns in-doubt units into sold. Summing per pool first is the same as
/// applying the events one by one: reports for the current epoch add up,
/// and late ones take min(in_doubt, their sum) out of doubt.
///
/// Which epoch is current is read from the row being updated, not from
/// the statement's snapshot: an epoch opened meanwhile (a single-row
/// write, which takes no pool lock) makes Postgres update the row as it
/// stands now, recomputing every `SET` from it.
async fn write_back(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    reports: &[Report<'_>],
) -> Result<(), Error> {
    if reports.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&Report<'_>) -> i64| reports.iter().map(f).collect::<Vec<i64>>();
    let pools: Vec<&str> = reports.iter().map(|r| r.pool).collect();
    sqlx::query(
        "UPDATE pools p SET
             reported_sold = p.reported_sold + CASE WHEN v.epoch = p.epoch THEN v.qty ELSE 0 END,
             sold_prior = p.sold_prior
                 + LEAST(p.in_doubt, v.older + CASE WHEN v.epoch = p.epoch THEN 0 ELSE v.qty END),
             in_doubt = p.in_doubt
                 - LEAST(p.in_doubt, v.older + CASE WHEN v.epoch = p.epoch THEN 0 ELSE v.qty END)
         FROM UNNEST($2::text[], $3::bigint[], $4::bigint[], $5::bigint[]) AS v(pool_id, epoch, qty, older)
         WHERE p.tenant = $1 AND p.pool_id = v.pool_id",
    )
    .bind(tenant.as_str())
    .bind(&pools)
    .bind(column(|r| r.epoch))
    .bind(column(|r| r.qty))
    .bind(column(|r| r.older))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventLine;

    fn sold(pool: &str, epoch: i64, qty: i64) -> Event {
        Event {
            event_id: format!("1-{epoch}{qty}"),
            kind: "claimed".into(),
            job: "flash".into(),
            hold_id: "h".into(),
            lines: vec![EventLine {
                pool: pool.into(),
                qty,
                epoch,
            }],
            reference: String::new(),
            order_id: String::new(),
            customer: String::new(),
            at: Utc::now(),
        }
    }

    #[test]
    fn a_batchs_sales_are_summed_per_pool_with_the_newest_epoch_apart() {
        let events = [
            sold("a", 2, 1),
            sold("a", 1, 4),
            sold("a", 3, 2),
            sold("b", 5, 7),
            sold("a", 3, 10),
            sold("a", 2, 100),
        ];
        let mut released = sold("b", 5, 1000);
        released.kind = "released".into();
        let fresh: Vec<&Event> = events.iter().chain([&released]).collect();
        let mut got = reports(&fresh);
        got.sort_by_key(|r| r.pool);
        assert_eq!(
            got,
            vec![
                Report {
                    pool: "a",
                    epoch: 3,
                    qty: 12,
                    older: 105
                },
                Report {
                    pool: "b",
                    epoch: 5,
                    qty: 7,
                    older: 0
                },
            ]
        );
    }
}

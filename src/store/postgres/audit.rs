//! The audit log and the write-back of sold counts: the drainer's one
//! transaction per batch of events.

use chrono::{DateTime, Utc};

use super::PgStore;
use super::fallback::Twin;
use super::listings::record_lock_sale;
use crate::domain::{CardId, Event, Job, TenantId};
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
        let mut new = 0;
        let mut follow_ups = Vec::new();
        for e in events {
            let lines =
                serde_json::to_value(&e.lines).map_err(|err| Error::Internal(err.into()))?;
            let inserted = sqlx::query(
                "INSERT INTO audit_log (tenant, event_id, kind, job, hold_id, lines, reference, order_id, customer, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (tenant, event_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(&e.event_id)
            .bind(&e.kind)
            .bind(&e.job)
            .bind(&e.hold_id)
            .bind(lines)
            .bind(&e.reference)
            .bind(&e.order_id)
            .bind(&e.customer)
            .bind(e.at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                continue;
            }
            new += 1;
            if matches!(e.kind.as_str(), "reserved" | "claimed") {
                match PgStore::settle_twin(&mut tx, tenant, &e.hold_id, e.kind == "claimed").await?
                {
                    Twin::None | Twin::Undone => {}
                    twin => follow_ups.push((e.hold_id.clone(), e.job.clone(), twin)),
                }
            }
            if e.sells() && e.job == Job::Lock.as_str() {
                let cards: Vec<CardId> = e
                    .lines
                    .iter()
                    .filter_map(|l| CardId::of_pool(&l.pool))
                    .collect();
                record_lock_sale(&mut tx, tenant, &e.reference, &e.hold_id, &cards, e.at).await?;
            }
            if e.sells() {
                for l in &e.lines {
                    // Write-back changes what Postgres reports, never what it
                    // may sell: the units are already inside `granted`. A late
                    // report for a closed epoch turns in-doubt units into sold.
                    sqlx::query(
                        "UPDATE pools SET
                             reported_sold = reported_sold + CASE WHEN epoch = $3 THEN $4 ELSE 0 END,
                             sold_prior = sold_prior + CASE WHEN epoch = $3 THEN 0 ELSE LEAST(in_doubt, $4) END,
                             in_doubt = in_doubt - CASE WHEN epoch = $3 THEN 0 ELSE LEAST(in_doubt, $4) END
                         WHERE tenant = $1 AND pool_id = $2",
                    )
                    .bind(tenant.as_str())
                    .bind(&l.pool)
                    .bind(l.epoch)
                    .bind(l.qty)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok((new, follow_ups))
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
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT event_id, kind, job, hold_id, lines, reference, order_id, customer, at FROM audit_log
             WHERE tenant = $1
               AND (split_part(event_id, '-', 1)::bigint, split_part(event_id, '-', 2)::bigint) > ($2, $3)
               AND (split_part(event_id, '-', 1)::bigint, split_part(event_id, '-', 2)::bigint) < ($4, $5)
             ORDER BY split_part(event_id, '-', 1)::bigint, split_part(event_id, '-', 2)::bigint
             LIMIT $6",
        )
        .bind(tenant.as_str())
        .bind(to_i(after.0))
        .bind(to_i(after.1))
        .bind(before_ms)
        .bind(before_seq)
        .bind(limit)
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

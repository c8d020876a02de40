//! The audit log and the write-back of sold counts: the drainer's one
//! transaction per batch of events.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::PgStore;
use crate::domain::TenantId;
use crate::error::Error;

/// One line of an event: a pool, the units, and the Redis epoch they were
/// taken in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventLine {
    /// The pool.
    pub pool: String,
    /// The units.
    pub qty: i64,
    /// The epoch.
    pub epoch: i64,
}

/// One engine event, as read from the tenant's Redis stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// The stream entry id: unique per tenant, the key of exactly-once.
    pub event_id: String,
    /// What happened: reserved, claimed, committed, released, expired,
    /// extended.
    pub kind: String,
    /// Which job: flash, stock, lock, slot.
    pub job: String,
    /// The hold (or claim) id.
    pub hold_id: String,
    /// The pools and units.
    pub lines: Vec<EventLine>,
    /// The caller's reference.
    pub reference: String,
    /// The order id, for commits.
    pub order_id: String,
    /// The customer counter, if any.
    pub customer: String,
    /// When it happened (Redis time).
    pub at: DateTime<Utc>,
}

impl AuditEvent {
    /// True for the events that sell units.
    pub fn sells(&self) -> bool {
        matches!(self.kind.as_str(), "claimed" | "committed")
    }
}

impl PgStore {
    /// Records events exactly once, each with its effects, in one
    /// transaction: an event id seen before is skipped with its effects.
    /// Returns how many were new.
    pub async fn record_events(
        &self,
        tenant: &TenantId,
        events: &[AuditEvent],
    ) -> Result<usize, Error> {
        let mut tx = self.pool.begin().await?;
        let mut new = 0;
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
        Ok(new)
    }
}

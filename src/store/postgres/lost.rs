//! What Redis lost with its data, as the audit log tells it (ESCROW.md
//! "Losing Redis"): the hold a retry finds in neither store, and every
//! take of a tenant's retention, to write back into a Redis that lost
//! them (`RedisStore::restore_takes`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_stream::StreamExt;

use super::PgStore;
use crate::domain::{EventLine, Hold, HoldId, HoldState, Job, PoolId, TenantId};
use crate::error::Error;

/// A take Redis made, as the audit log tells it: the hold as it ended,
/// and what Redis needs to remember it again.
#[derive(Debug, Clone)]
pub struct AuditedTake {
    /// The hold: committed (with its order), released or expired, or
    /// still `Active` when it was live at the loss (its units in doubt).
    /// A hold that ended expires as it ends, as a claim does.
    pub hold: Hold,
    /// Each line's Redis epoch, in the hold's line order.
    pub epochs: Vec<i64>,
    /// The customer counter the take named, or empty.
    pub customer: String,
    /// A claim (sold as it was made), not a hold.
    pub claim: bool,
}

impl AuditedTake {
    /// The take of `id` logged as `kind` (`reserved` or `claimed`).
    fn new(
        id: &str,
        kind: &str,
        job: String,
        lines: serde_json::Value,
        reference: String,
        customer: String,
        at: DateTime<Utc>,
    ) -> Result<Self, Error> {
        let lines: Vec<EventLine> =
            serde_json::from_value(lines).map_err(|e| Error::Internal(e.into()))?;
        let claim = kind == "claimed";
        let at = at.timestamp_millis();
        Ok(Self {
            epochs: lines.iter().map(|l| l.epoch).collect(),
            hold: Hold {
                id: HoldId::from_store(id.to_owned()),
                state: if claim {
                    HoldState::Committed
                } else {
                    HoldState::Active
                },
                job,
                lines: lines
                    .into_iter()
                    .map(|l| (PoolId::from_store(l.pool), l.qty))
                    .collect(),
                expires_at_ms: if claim { at } else { 0 },
                extensions: 0,
                reference,
                order_id: String::new(),
                created_at_ms: at,
                finished_at_ms: if claim { at } else { 0 },
                fence: 0,
            },
            customer,
            claim,
        })
    }

    /// Applies an event logged after the take: its end (committed,
    /// released, expired), or an extension. A hold ends one way, so the
    /// order of these does not matter.
    fn then(&mut self, kind: &str, order_id: String, at: DateTime<Utc>) {
        let hold = &mut self.hold;
        hold.state = match kind {
            "committed" => HoldState::Committed,
            "released" => HoldState::Released,
            "expired" => HoldState::Expired,
            _ => {
                hold.extensions += 1;
                return;
            }
        };
        hold.order_id = order_id;
        hold.finished_at_ms = at.timestamp_millis();
        hold.expires_at_ms = hold.finished_at_ms;
    }
}

/// An audit row of a hold, as `audited_takes` reads it.
type Row = (
    String,
    String,
    String,
    serde_json::Value,
    String,
    String,
    String,
    DateTime<Utc>,
);

/// The kinds of the rows that tell a hold's life.
const KINDS: &str = "('reserved', 'claimed', 'committed', 'released', 'expired', 'extended')";

impl PgStore {
    /// A hold Redis made, as the audit log tells it: for a retry that
    /// finds the hold in neither store because Redis lost its data. Only
    /// within `retention`, as long as Redis would have remembered it.
    pub async fn audited_hold(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        retention: Duration,
    ) -> Result<Option<Hold>, Error> {
        // The take first, through the takes' index: an id no one took
        // (a typo, a poll of an unknown id) costs one index probe, not a
        // scan of the log.
        let take: Option<(
            i64,
            String,
            serde_json::Value,
            String,
            String,
            DateTime<Utc>,
        )> = sqlx::query_as(
            "SELECT id, kind, lines, reference, customer, at FROM audit_log
                 WHERE hold_id = $2 AND kind IN ('reserved', 'claimed')
                   AND tenant = $1 AND job = $3 AND event_id NOT LIKE 'f%'
                   AND at > now() - make_interval(secs => $4::double precision)
                 ORDER BY id LIMIT 1",
        )
        .bind(tenant.as_str())
        .bind(id.as_str())
        .bind(job.as_str())
        .bind(retention.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        let Some((take_id, kind, lines, reference, customer, at)) = take else {
            return Ok(None);
        };
        let mut take = AuditedTake::new(
            id.as_str(),
            &kind,
            job.as_str().to_owned(),
            lines,
            reference,
            customer,
            at,
        )?;
        // Then how it went on, among the rows after the take. Only a hold
        // Redis lost gets here (the take is logged, the hold in neither
        // store), so this walk of the log from the take on is rare.
        let after: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT kind, order_id, at FROM audit_log
                 WHERE id > $4 AND tenant = $1 AND hold_id = $2 AND job = $3
                   AND kind IN ('committed', 'released', 'expired', 'extended')
                   AND event_id NOT LIKE 'f%'
                 ORDER BY id",
        )
        .bind(tenant.as_str())
        .bind(id.as_str())
        .bind(job.as_str())
        .bind(take_id)
        .fetch_all(&self.pool)
        .await?;
        for (kind, order_id, at) in after {
            take.then(&kind, order_id, at);
        }
        Ok(Some(take.hold))
    }

    /// The ids of `tenant`'s newest takes in Redis within `retention`, at
    /// most `n`: if Redis still has them, it lost nothing the log knows of
    /// (what a Redis loses is everything, or all after some moment), and
    /// `audited_takes` need not be read. One backward step through the
    /// `(tenant, event_id)` index.
    pub async fn newest_take_ids(
        &self,
        tenant: &TenantId,
        retention: Duration,
        n: i64,
    ) -> Result<Vec<String>, Error> {
        Ok(sqlx::query_scalar(
            "SELECT hold_id FROM audit_log
             WHERE tenant = $1 AND event_id > $2 AND event_id < 'f'
               AND kind IN ('reserved', 'claimed')
             ORDER BY event_id DESC LIMIT $3",
        )
        .bind(tenant.as_str())
        .bind(cutoff(retention))
        .bind(n)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every take Redis made for `tenant` within `retention`, as the
    /// audit log tells it, for a Redis that lost them
    /// (`Engine::restore_lost_takes`). The fallback's own rows are not
    /// Redis's (their holds are in `pg_holds`).
    ///
    /// One range of the `(tenant, event_id)` index, read as a stream: a
    /// stream id starts with its time in ms, 13 digits until the year
    /// 2286, so the text order of ids past the cut-off's is the log's
    /// order to the ms. Within one ms it is not (`-10` sorts before `-9`),
    /// so each hold's later rows are kept apart until its take is read.
    pub async fn audited_takes(
        &self,
        tenant: &TenantId,
        retention: Duration,
    ) -> Result<Vec<AuditedTake>, Error> {
        let sql = format!(
            "SELECT kind, job, hold_id, lines, reference, order_id, customer, at FROM audit_log
             WHERE tenant = $1 AND event_id > $2 AND event_id < 'f' AND kind IN {KINDS}"
        );
        let mut rows = sqlx::query_as::<_, Row>(&sql)
            .bind(tenant.as_str())
            .bind(cutoff(retention))
            .fetch(&self.pool);
        let mut takes: HashMap<String, AuditedTake> = HashMap::new();
        let mut later: HashMap<String, Vec<(String, String, DateTime<Utc>)>> = HashMap::new();
        while let Some(row) = rows.next().await {
            let (kind, job, id, lines, reference, order_id, customer, at) = row?;
            if kind == "reserved" || kind == "claimed" {
                let take = AuditedTake::new(&id, &kind, job, lines, reference, customer, at)?;
                // An id taken twice (in Redis before this was done, a
                // retry after a loss took again): its first take stands.
                match takes.get(&id) {
                    Some(first) if first.hold.created_at_ms <= take.hold.created_at_ms => {}
                    _ => {
                        takes.insert(id, take);
                    }
                }
            } else {
                later.entry(id).or_default().push((kind, order_id, at));
            }
        }
        Ok(takes
            .into_iter()
            .map(|(id, mut take)| {
                for (kind, order_id, at) in later.remove(&id).unwrap_or_default() {
                    take.then(&kind, order_id, at);
                }
                take
            })
            .collect())
    }
}

/// The stream id before which a take is past `retention`: its time in ms,
/// which every id of that ms or later sorts after as text.
fn cutoff(retention: Duration) -> String {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let ms = Utc::now().timestamp_millis().saturating_sub(retention_ms);
    ms.max(0).to_string()
}

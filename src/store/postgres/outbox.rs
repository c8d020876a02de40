//! The webhook outbox: rows written with the change they announce
//! (`listings.rs`), claimed and marked by the outbox job.
//!
//! Deliveries to one satellite go in order: only the oldest pending row of
//! each (workspace, channel) is ever attempted, so a satellite never sees a
//! disengage overtake the engage before it, and a satellite that is down
//! delays only itself. Marking a row delivered can claim the satellite's
//! next one in the same statement ([`PgStore::delivered`]), so a backlog
//! goes out one round trip after another rather than one row a round.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::PgStore;
use crate::domain::{ChannelSlug, TenantId};
use crate::error::Error;

/// The `NOTIFY` channel on which each transaction that queues a webhook
/// says so at its commit (`listings.rs`), so that the outbox job of every
/// daemon on the database looks at once rather than at its next round.
/// Each notification names a satellite it queued for, as `<workspace>
/// <channel>` ([`queued_for`] reads it back).
pub(super) const QUEUED_CHANNEL: &str = "holdfast_outbox";

/// The satellite, (workspace, channel), a notification on
/// `QUEUED_CHANNEL` names; `None` for one that names none (an older
/// daemon's, which named nothing).
pub fn queued_for(payload: &str) -> Option<(String, String)> {
    let (workspace, channel) = payload.split_once(' ')?;
    (!workspace.is_empty() && !channel.is_empty())
        .then(|| (workspace.to_owned(), channel.to_owned()))
}

/// A delivery claimed for one attempt, with where it goes.
#[derive(Clone, sqlx::FromRow)]
pub struct DueDelivery {
    /// The outbox row id (sent as `X-Holdfast-Delivery`).
    pub id: i64,
    /// The workspace.
    pub workspace: String,
    /// The channel.
    pub channel: String,
    /// The event (the last part of the URL path).
    pub event: String,
    /// The JSON body, as stored.
    pub body: String,
    /// Attempts made before this one.
    pub attempts: i32,
    /// The satellite's base URL.
    pub base_url: String,
    /// The HMAC key; never logged.
    pub secret: String,
    /// Most webhooks the satellite takes in one request: this one and
    /// up to `batch_size - 1` of its rows behind it ([`PgStore::behind`]).
    pub batch_size: i32,
}

impl std::fmt::Debug for DueDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DueDelivery")
            .field("id", &self.id)
            .field("workspace", &self.workspace)
            .field("channel", &self.channel)
            .field("event", &self.event)
            .field("attempts", &self.attempts)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

/// A pending row sent in a batch behind a claimed one.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Behind {
    /// The outbox row id.
    pub id: i64,
    /// The event.
    pub event: String,
    /// The JSON body, as stored.
    pub body: String,
}

/// A delivery as callers see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    /// The outbox row id.
    pub id: i64,
    /// The channel.
    pub channel: String,
    /// The event.
    pub event: String,
    /// The JSON body.
    pub body: String,
    /// How many cards it lists.
    pub card_count: i32,
    /// `pending` or `delivered`.
    pub state: String,
    /// Attempts made.
    pub attempts: i32,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: DateTime<Utc>,
    /// HTTP status of the last attempt, if it got one.
    pub last_status: Option<i32>,
    /// Why the last attempt failed, or empty.
    pub last_error: String,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// When a satellite acknowledged it.
    pub delivered_at: Option<DateTime<Utc>>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The end of a claim: of the rows whose ids the CTE `$from` names, those
/// due and not held by another claim (`$order` may order and limit them),
/// leased for `$1` milliseconds, with where each goes. The lease is
/// written twice: as when the row is next due, which is what makes it
/// this claim's, and as `leased_until`, which tells it from a backoff
/// ([`PgStore::retry_deliveries`]).
///
/// The ids are looked up one by one (`= ANY (ARRAY(...))`): as a join, the
/// planner may judge `next_attempt_at <= now()` selective enough to scan
/// the whole table instead, which keeps every delivered row, and it did
/// on a table of 10,000 rows (tests/api/outbox.rs).
macro_rules! lease_due {
    ($from:literal, $order:literal) => {
        concat!(
            "due AS (
                 SELECT o.id FROM outbox o
                 WHERE o.id = ANY (ARRAY(SELECT id FROM ",
            $from,
            ")) AND o.next_attempt_at <= now() ",
            $order,
            "
                 FOR UPDATE OF o SKIP LOCKED
             )
             UPDATE outbox o SET next_attempt_at = now() + $1 * interval '1 millisecond',
                 leased_until = now() + $1 * interval '1 millisecond'
             FROM due, satellites s
             WHERE o.id = due.id AND s.workspace = o.workspace AND s.channel = o.channel
             RETURNING o.id, o.workspace, o.channel, o.event, o.body, o.attempts, s.base_url, s.secret,
                 s.batch_size"
        )
    };
}

/// The columns of a [`DeliveryRow`], for the statements that read them.
macro_rules! delivery_columns {
    () => {
        "id, channel, event, body, card_count, state, attempts, next_attempt_at, last_status,
         last_error, created_at, delivered_at"
    };
}

/// A delivery's state, as `ListDeliveries` filters by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryState {
    /// Not yet acknowledged by the satellite.
    Pending,
    /// Acknowledged (kept for `--delivery-retention-secs`).
    Delivered,
}

/// The CTE `heads`, after `WITH RECURSIVE`: the oldest pending row of
/// each satellite of workspace `$1` (of channel `$2` alone, unless it is
/// NULL), as `(channel, id)`, by the same skip through the index of
/// pending rows as [`PgStore::claim_deliveries`]. One channel's head is
/// where the index's range for it starts (the first head at or after it,
/// which the caller must check is that channel's): a filter on the
/// channel instead, in the plan Postgres reuses for a prepared
/// statement, walked every other channel's backlog before it.
macro_rules! workspace_heads {
    () => {
        "heads AS (
             (SELECT channel, id FROM outbox
              WHERE state = 'pending' AND workspace = $1 AND channel >= coalesce($2::text, '')
              ORDER BY workspace, channel, id LIMIT 1)
             UNION ALL
             SELECT n.channel, n.id FROM heads h CROSS JOIN LATERAL (
                 SELECT o.channel, o.id FROM outbox o
                 WHERE o.state = 'pending' AND o.workspace = $1 AND o.channel > h.channel
                   AND $2::text IS NULL
                 ORDER BY o.workspace, o.channel, o.id LIMIT 1
             ) n
         )"
    };
}

impl PgStore {
    /// Claims up to `limit` due deliveries, the oldest pending one of each
    /// satellite, for `lease`: until then no other claim (of this daemon or
    /// another) takes them, and if this one dies they come due again.
    ///
    /// The heads are found by skipping from one satellite to the next in
    /// the index of pending rows, one short descent each, so a round costs
    /// the same whatever a satellite's backlog. `DISTINCT ON` read every
    /// pending row instead: a satellite down for an hour of sales left a
    /// backlog that each round (each tick, and each commit that queued a
    /// webhook for it) walked whole, ~136 ms of Postgres per million rows
    /// (deploy/BENCHMARKS.md, "a satellite that is down").
    pub async fn claim_deliveries(
        &self,
        lease: Duration,
        limit: i64,
    ) -> Result<Vec<DueDelivery>, Error> {
        Ok(sqlx::query_as::<_, DueDelivery>(concat!(
            "WITH RECURSIVE heads AS (
                 (SELECT workspace, channel, id FROM outbox WHERE state = 'pending'
                  ORDER BY workspace, channel, id LIMIT 1)
                 UNION ALL
                 SELECT n.workspace, n.channel, n.id FROM heads h CROSS JOIN LATERAL (
                     SELECT o.workspace, o.channel, o.id FROM outbox o
                     WHERE o.state = 'pending' AND (o.workspace, o.channel) > (h.workspace, h.channel)
                     ORDER BY o.workspace, o.channel, o.id LIMIT 1
                 ) n
             ), ",
            lease_due!("heads", "ORDER BY o.id LIMIT $2")
        ))
        .bind(millis(lease))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records deliveries the satellite acknowledged (one, or a batch of
    /// its rows in order: `ids` ascending) and, given a `lease`, claims the
    /// same satellite's next pending row after them if that one is due and
    /// no one else holds it: what a satellite with a backlog is sent next,
    /// or `None`.
    ///
    /// One statement, so a backlog costs one commit a request (a delivery
    /// or a batch). The next row is the oldest pending one after the last
    /// acknowledged: the index of pending rows
    /// keeps the delivered ones' entries until a vacuum, and looking from
    /// the satellite's first entry walked them all, so that a backlog of
    /// 15,000 went out at 370 a second instead of 1,400
    /// (deploy/BENCHMARKS.md, "webhooks"). It is one descent of that
    /// index: the first entry after this row's, checked to be the same
    /// satellite's. Asked for as the satellite's first row after this id,
    /// the planner could walk the table's key from this row instead,
    /// through every other satellite's rows (as a join ordered by id, and
    /// in the plan Postgres reuses for the prepared statement: 10,000 rows
    /// read beside a backlog of 10,000). A row whose transaction took an
    /// older id but committed later is the next round's head.
    ///
    /// Its commit does not wait for the WAL to reach the disk
    /// (`synchronous_commit` off for this transaction alone, set inside
    /// the statement so that it stays one round trip). An acknowledgement
    /// lost to a Postgres crash leaves its row pending, to be sent again:
    /// a satellite may see a delivery twice, as it must expect anyway,
    /// and never loses one. The flush was a quarter to a third of each
    /// delivery's time, and a backlog goes one delivery after another
    /// (deploy/BENCHMARKS.md, "an acknowledgement's flush").
    pub async fn delivered(
        &self,
        ids: &[i64],
        status: u16,
        lease: Option<Duration>,
    ) -> Result<Option<DueDelivery>, Error> {
        let last = ids.iter().copied().max().unwrap_or(0);
        Ok(sqlx::query_as::<_, DueDelivery>(concat!(
            "WITH done AS (
                 UPDATE outbox SET state = 'delivered', attempts = attempts + 1, last_status = $2,
                     last_error = '', delivered_at = now()
                 WHERE id = ANY ($3) AND set_config('synchronous_commit', 'off', true) = 'off'
                 RETURNING workspace, channel, id
             ), last AS (
                 SELECT workspace, channel, id FROM done WHERE id = $4
             ), next AS (
                 SELECT n.id FROM last CROSS JOIN LATERAL (
                     SELECT o.workspace, o.channel, o.id FROM outbox o
                     WHERE o.state = 'pending' AND $1::bigint IS NOT NULL
                       AND (o.workspace, o.channel, o.id) > (last.workspace, last.channel, last.id)
                     ORDER BY o.workspace, o.channel, o.id LIMIT 1
                 ) n
                 WHERE n.workspace = last.workspace AND n.channel = last.channel
             ), ",
            lease_due!("next", "")
        ))
        .bind(lease.map(millis))
        .bind(i32::from(status))
        .bind(ids)
        .bind(last)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Up to `limit` of the pending rows behind `head` in its satellite's
    /// queue, in order: what goes with it in one request to a satellite
    /// that takes batches. They are not leased: only a satellite's oldest
    /// pending row is ever claimed, and `head`'s lease keeps every other
    /// claim off this satellite until the batch is acknowledged (all of
    /// it, by [`PgStore::delivered`]) or has failed (its head's backoff
    /// holds the rest back).
    ///
    /// The next `limit` entries of the index of pending rows after the
    /// head's, of which the satellite's own are kept: asked for as the
    /// satellite's rows after this id, the plan Postgres reuses for the
    /// prepared statement walked the table's key from the head through
    /// every other satellite's rows (10,002 read beside a backlog of
    /// 10,000, tests/api/outbox.rs).
    pub async fn behind(&self, head: &DueDelivery, limit: i64) -> Result<Vec<Behind>, Error> {
        Ok(sqlx::query_as::<_, Behind>(
            "SELECT id, event, body FROM (
                 SELECT workspace, channel, id, event, body FROM outbox
                 WHERE state = 'pending' AND (workspace, channel, id) > ($1, $2, $3)
                 ORDER BY workspace, channel, id LIMIT $4
             ) n
             WHERE workspace = $1 AND channel = $2 ORDER BY id",
        )
        .bind(&head.workspace)
        .bind(&head.channel)
        .bind(head.id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records a failed attempt; the next one is due after `retry_in`.
    pub async fn delivery_failed(
        &self,
        id: i64,
        status: Option<u16>,
        error: &str,
        retry_in: Duration,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_status = $2, last_error = $3,
                 next_attempt_at = now() + $4 * interval '1 millisecond', leased_until = NULL
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(status.map(i32::from))
        .bind(error)
        .bind(millis(retry_in))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes the next delivery of a workspace's satellite (of `channel`,
    /// or of each) due now if it is waiting out a backoff: for a
    /// satellite back from an outage, whose next attempt could otherwise
    /// be `--webhook-backoff-max-secs` away. Returns the channels whose
    /// delivery was brought forward, and wakes every daemon's outbox job
    /// for them.
    ///
    /// A delivery leased for an attempt in flight is left alone: made due,
    /// it would be sent a second time at once, and that copy could reach
    /// the satellite after the rows behind it. Only a satellite's oldest
    /// pending row is ever attempted, so only it is looked at
    /// (`workspace_heads!`).
    pub async fn retry_deliveries(
        &self,
        workspace: &TenantId,
        channel: Option<&ChannelSlug>,
    ) -> Result<Vec<String>, Error> {
        let mut tx = self.begin().await?;
        let retried: Vec<(String,)> = sqlx::query_as(concat!(
            "WITH RECURSIVE ",
            workspace_heads!(),
            "
             UPDATE outbox o SET next_attempt_at = now()
             WHERE o.id = ANY (ARRAY(SELECT id FROM heads)) AND ($2::text IS NULL OR o.channel = $2)
               AND o.state = 'pending' AND o.next_attempt_at > now() AND o.leased_until IS NULL
             RETURNING o.channel"
        ))
        .bind(workspace.as_str())
        .bind(channel.map(ChannelSlug::as_str))
        .fetch_all(&mut *tx)
        .await?;
        if !retried.is_empty() {
            // A notification that names no satellite asks each daemon for
            // a round, even one that would skip a wake-up naming a
            // satellite it saw fail (`jobs::outbox`); claiming the head
            // ends that rest.
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(QUEUED_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let mut channels: Vec<String> = retried.into_iter().map(|(c,)| c).collect();
        channels.sort();
        Ok(channels)
    }

    /// The delivery each of a workspace's satellites waits on, by
    /// channel: its oldest pending one. What a satellite that is behind
    /// shows (ListSatellites), read one index descent a satellite
    /// whatever its backlog.
    pub async fn waiting_deliveries(
        &self,
        workspace: &TenantId,
    ) -> Result<Vec<DeliveryRow>, Error> {
        Ok(sqlx::query_as::<_, DeliveryRow>(concat!(
            "WITH RECURSIVE ",
            workspace_heads!(),
            "
             SELECT ",
            delivery_columns!(),
            " FROM outbox WHERE id = ANY (ARRAY(SELECT id FROM heads)) ORDER BY channel"
        ))
        .bind(workspace.as_str())
        .bind(None::<&str>)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A listener for queued webhooks (`QUEUED_CHANNEL`), on a
    /// connection of the pool's that it keeps until dropped.
    pub async fn listen_for_queued(&self) -> Result<sqlx::postgres::PgListener, Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(QUEUED_CHANNEL).await?;
        Ok(listener)
    }

    /// Deletes up to `limit` deliveries acknowledged more than `age` ago,
    /// the oldest first, over every workspace; returns how many. Found by
    /// the index of acknowledged rows (migration 0017), so a prune reads
    /// what it deletes and not the rows it keeps.
    pub async fn prune_deliveries(&self, age: Duration, limit: i64) -> Result<u64, Error> {
        let done = sqlx::query(
            "DELETE FROM outbox WHERE id = ANY (ARRAY(
                 SELECT id FROM outbox
                 WHERE state = 'delivered' AND delivered_at < now() - $1 * interval '1 millisecond'
                 ORDER BY delivered_at LIMIT $2))",
        )
        .bind(millis(age))
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Deliveries waiting, over every workspace (the backlog gauge).
    pub async fn outbox_backlog(&self) -> Result<i64, Error> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox WHERE state = 'pending'")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    /// A workspace's deliveries, newest first, before row id `before` (0:
    /// from the newest), optionally of one channel and one state.
    ///
    /// A page reads about what it returns, on any plan (a daemon's
    /// statements are prepared, and Postgres plans them for any
    /// parameters after five runs). A channel's page is the `limit`
    /// entries of `outbox_by_channel` (of `outbox_pending` for the waiting
    /// ones: the state is written into the statement, so that the partial
    /// index fits whatever the parameters) before the channel's `before`,
    /// of which the channel's own are kept; a page of every channel is
    /// each channel's page, merged. Asked for as the channel's rows, the
    /// reused plan walked the table's key back from `before` through
    /// every other channel's rows; and before this, one statement
    /// filtered the workspace's rows: a page of one channel read every
    /// other channel's rows newer than it, a page of the waiting ones
    /// every acknowledged row, and a second page every row of the first
    /// (tests/api/outbox.rs; deploy/BENCHMARKS.md, "a page of
    /// deliveries"). What is left: a page of the acknowledged ones reads
    /// past the channel's waiting rows, so beside an outage's backlog it
    /// reads the backlog.
    pub async fn deliveries(
        &self,
        workspace: &TenantId,
        channel: Option<&ChannelSlug>,
        state: Option<DeliveryState>,
        before: i64,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, Error> {
        let state = match state {
            None => "",
            Some(DeliveryState::Pending) => "AND state = 'pending'",
            Some(DeliveryState::Delivered) => "AND state = 'delivered'",
        };
        let page = |channel: &str| {
            format!(
                "SELECT {columns} FROM (
                     SELECT workspace, {columns} FROM outbox
                     WHERE (workspace, channel, id) < ($1, {channel}, $2) {state}
                     ORDER BY workspace DESC, channel DESC, id DESC LIMIT $3
                 ) p
                 WHERE workspace = $1 AND channel = {channel}",
                columns = delivery_columns!()
            )
        };
        let sql = match channel {
            Some(_) => format!("{} ORDER BY id DESC", page("$4")),
            None => format!(
                "SELECT o.* FROM channels c CROSS JOIN LATERAL ({}) o
                 WHERE c.workspace = $1 ORDER BY o.id DESC LIMIT $3",
                page("c.slug")
            ),
        };
        let before = if before == 0 { i64::MAX } else { before };
        let mut query = sqlx::query_as::<_, DeliveryRow>(&sql)
            .bind(workspace.as_str())
            .bind(before)
            .bind(limit);
        if let Some(channel) = channel {
            query = query.bind(channel.as_str());
        }
        Ok(query.fetch_all(&self.pool).await?)
    }
}

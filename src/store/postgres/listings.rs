//! The four transitions of `card_channels`: engage, disengage, sale (from
//! the drainer, exactly once per commit event) and reconcile. Each runs in
//! one transaction with the outbox rows that tell the satellites, so a
//! change and its webhook are never one without the other.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Postgres, Transaction};

use super::PgStore;
use crate::domain::channel::{EngageConflict, engage_rule};
use crate::domain::{CardId, Channel, ChannelSlug, TenantId};
use crate::error::Error;

/// A card to engage, with the satellite's context for it.
#[derive(Debug, Clone)]
pub struct EngageCard {
    /// The card.
    pub card_id: CardId,
    /// The satellite's id for the listing, or empty.
    pub external_ref: String,
    /// Per-channel context (a JSON object).
    pub metadata: serde_json::Value,
}

/// How an engage batch went. All-or-nothing: with conflicts, nothing
/// changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngageOutcome {
    /// Every card is live on the channel now.
    Engaged {
        /// Cards that went live with this call.
        engaged: Vec<CardId>,
        /// Cards that were live there already (left as they were).
        already: Vec<CardId>,
        /// The change's number from the `listing_version` sequence, for
        /// the listing mirror (src/services/listing_mirror.rs).
        version: i64,
    },
    /// The rules refused these cards; nothing changed.
    Conflicts(Vec<(CardId, EngageConflict)>),
}

/// What a reconcile found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Live here but not on the satellite: cleared (now inactive).
    pub missing_on_satellite: Vec<CardId>,
    /// Listed by the satellite but not live here: reported, not adopted.
    pub unknown_to_holdfast: Vec<CardId>,
}

/// One recorded drift.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DriftRow {
    /// Row id (page token).
    pub id: i64,
    /// The channel.
    pub channel: String,
    /// The card.
    pub card_id: String,
    /// `missing_on_satellite` or `unknown_to_holdfast`.
    pub direction: String,
    /// Whether holdfast changed its own row to match.
    pub cleared: bool,
    /// When.
    pub detected_at: DateTime<Utc>,
}

impl PgStore {
    /// Engages `cards` on `channel`, all-or-nothing against the listing
    /// rule. Cards are locked in id order, so concurrent batches touching
    /// one card queue rather than both passing the check.
    pub async fn engage(
        &self,
        workspace: &TenantId,
        channel: &Channel,
        cards: &[EngageCard],
    ) -> Result<EngageOutcome, Error> {
        let ws = workspace.as_str();
        let mut ids: Vec<&str> = cards.iter().map(|c| c.card_id.as_str()).collect();
        ids.sort_unstable();
        let mut tx = self.begin().await?;
        let conflicts = engage_conflicts(&mut tx, ws, channel, cards, &ids).await?;
        if !conflicts.is_empty() {
            tx.rollback().await?;
            return Ok(EngageOutcome::Conflicts(conflicts));
        }
        let engaged = list_on(&mut tx, ws, channel, cards).await?;
        // Taken while the upsert holds every listing row of the batch, so a
        // change that follows this one on these rows gets a larger number.
        let version = next_version(&mut tx).await?;
        // Each card is a capacity-1 pool, so a sale lock can take it.
        sqlx::query(
            "INSERT INTO pools (tenant, pool_id, job, capacity)
             SELECT $1, 'card/' || c, 'lock', 1 FROM unnest($2::text[]) AS c ON CONFLICT DO NOTHING",
        )
        .bind(ws)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        let new_cards: Vec<_> = cards
            .iter()
            .filter(|c| engaged.contains(&c.card_id))
            .map(|c| json!({"card_id": c.card_id.as_str(), "external_ref": c.external_ref, "metadata": c.metadata}))
            .collect();
        if !new_cards.is_empty() {
            let body = json!({"reason": "engaged", "cards": new_cards});
            let slug = channel.slug.as_str();
            enqueue(&mut tx, ws, slug, "engage", body, Utc::now()).await?;
        }
        tx.commit().await?;
        let already = cards
            .iter()
            .map(|c| c.card_id.clone())
            .filter(|c| !engaged.contains(c))
            .collect();
        Ok(EngageOutcome::Engaged {
            engaged,
            already,
            version,
        })
    }

    /// Takes cards off a channel (all its live cards when `cards` is
    /// `None`: a bulk wipe). Returns the cards that were live there; the
    /// others are left as they are. `before_commit` gets the change's
    /// version and those cards while their rows are still locked, and the
    /// change commits only if it succeeds (the listing mirror forgets them
    /// first: src/services/listing_mirror.rs).
    pub async fn disengage(
        &self,
        workspace: &TenantId,
        channel: &ChannelSlug,
        cards: Option<&[CardId]>,
        before_commit: impl AsyncFnOnce(i64, &[CardId]) -> Result<(), Error>,
    ) -> Result<Vec<CardId>, Error> {
        let ids: Option<Vec<&str>> = cards.map(|c| c.iter().map(CardId::as_str).collect());
        let mut tx = self.begin().await?;
        // A wipe and a delist are two statements: as one, with `$3 IS
        // NULL OR card_id = ANY($3)`, a plan made for any list (which
        // Postgres may reuse for a prepared statement) cannot look the
        // named cards up by key, and reads every card live on the channel.
        let sql = if ids.is_some() {
            "UPDATE card_channels SET status = 'inactive', disengaged_at = now()
             WHERE workspace = $1 AND card_id = ANY($3) AND channel = $2 AND status = 'active'
             RETURNING card_id, external_ref"
        } else {
            "UPDATE card_channels SET status = 'inactive', disengaged_at = now()
             WHERE workspace = $1 AND channel = $2 AND status = 'active'
             RETURNING card_id, external_ref"
        };
        let mut update = sqlx::query_as(sql)
            .bind(workspace.as_str())
            .bind(channel.as_str());
        if let Some(ids) = &ids {
            update = update.bind(ids);
        }
        let rows: Vec<(String, String)> = update.fetch_all(&mut *tx).await?;
        if !rows.is_empty() {
            let reason = if cards.is_none() { "wipe" } else { "delisted" };
            let body = json!({"reason": reason, "cards": card_refs(&rows)});
            enqueue(
                &mut tx,
                workspace.as_str(),
                channel.as_str(),
                "disengage",
                body,
                Utc::now(),
            )
            .await?;
        }
        let delisted: Vec<CardId> = rows
            .into_iter()
            .map(|(c, _)| CardId::from_store(c))
            .collect();
        if !delisted.is_empty() {
            before_commit(next_version(&mut tx).await?, &delisted).await?;
        }
        tx.commit().await?;
        Ok(delisted)
    }

    /// Hands `copy` the cards of `cards` live on `channel` and a fresh
    /// version, while a share lock on their listing rows keeps any
    /// delisting of them waiting until `copy` is done: the listing
    /// mirror's repair (src/services/listing_mirror.rs), which a later
    /// delisting's larger version then overrides.
    pub async fn with_live_listings(
        &self,
        workspace: &TenantId,
        channel: &ChannelSlug,
        cards: &[CardId],
        copy: impl AsyncFnOnce(i64, &[CardId]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let ids: Vec<&str> = cards.iter().map(CardId::as_str).collect();
        let mut tx = self.begin().await?;
        let live: Vec<(String,)> = sqlx::query_as(
            "SELECT card_id FROM card_channels
             WHERE workspace = $1 AND channel = $2 AND card_id = ANY($3) AND status = 'active'
             ORDER BY card_id FOR SHARE",
        )
        .bind(workspace.as_str())
        .bind(channel.as_str())
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let live: Vec<CardId> = live.into_iter().map(|(c,)| CardId::from_store(c)).collect();
        if !live.is_empty() {
            copy(next_version(&mut tx).await?, &live).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Compares a channel's live cards with the satellite's canonical list,
    /// as it stood at `as_of` (Postgres's clock): cards live here that the
    /// satellite no longer has are cleared (inactive); cards the satellite
    /// lists that are not live here are reported, and those already sold
    /// get a `bulk-disengage` so the satellite pulls them. Both directions
    /// are recorded as drift. The cleared cards go to `before_commit` as
    /// in [`PgStore::disengage`].
    ///
    /// A card engaged after `as_of`, or after the oldest webhook to the
    /// channel still undelivered, is not cleared: the satellite may not
    /// have heard of it yet (its `engage` waits in that queue), and it is
    /// looked at again by a later reconcile.
    pub async fn reconcile(
        &self,
        workspace: &TenantId,
        channel: &ChannelSlug,
        satellite_cards: &[CardId],
        as_of: DateTime<Utc>,
        before_commit: impl AsyncFnOnce(i64, &[CardId]) -> Result<(), Error>,
    ) -> Result<Drift, Error> {
        let ws = workspace.as_str();
        let listed: Vec<&str> = satellite_cards.iter().map(CardId::as_str).collect();
        let mut tx = self.begin().await?;
        // `NOT (card_id = ANY($3))` is a hash look-up when the statement
        // is planned for its list, and a walk of the list for each live
        // card in a plan made for any list: 31 ms against 77 s for a
        // satellite's 100,000 cards against as many live (`EXPLAIN
        // ANALYZE`, deploy/BENCHMARKS.md, "on a reused plan"). Postgres
        // keeps planning it per list by its own estimates, unless its
        // operator set `plan_cache_mode` to reuse plans; this transaction
        // asks for a plan per run whatever the setting.
        sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
            .execute(&mut *tx)
            .await?;
        let cleared: Vec<(String,)> = sqlx::query_as(
            "UPDATE card_channels SET status = 'inactive', disengaged_at = now()
             WHERE workspace = $1 AND channel = $2 AND status = 'active' AND NOT (card_id = ANY($3))
               AND engaged_at < $4
               AND engaged_at < COALESCE((SELECT min(created_at) FROM outbox
                                          WHERE workspace = $1 AND channel = $2 AND state = 'pending'),
                                         'infinity')
             RETURNING card_id",
        )
        .bind(ws)
        .bind(channel.as_str())
        .bind(&listed)
        .bind(as_of)
        .fetch_all(&mut *tx)
        .await?;
        let unknown: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT u.c, cards.sold_channel FROM unnest($3::text[]) AS u(c)
             LEFT JOIN cards ON cards.workspace = $1 AND cards.card_id = u.c
             WHERE NOT EXISTS (SELECT 1 FROM card_channels cc WHERE cc.workspace = $1 AND cc.channel = $2
                               AND cc.card_id = u.c AND cc.status = 'active')
             ORDER BY u.c",
        )
        .bind(ws)
        .bind(channel.as_str())
        .bind(&listed)
        .fetch_all(&mut *tx)
        .await?;
        // The satellite's extra cards are re-reported by each reconcile;
        // keep only the latest report of them.
        sqlx::query(
            "DELETE FROM channel_drift WHERE workspace = $1 AND channel = $2 AND NOT cleared",
        )
        .bind(ws)
        .bind(channel.as_str())
        .execute(&mut *tx)
        .await?;
        let mut cleared: Vec<String> = cleared.into_iter().map(|(c,)| c).collect();
        cleared.sort();
        let extra: Vec<&str> = unknown.iter().map(|(c, _)| c.as_str()).collect();
        sqlx::query(
            "INSERT INTO channel_drift (workspace, channel, card_id, direction, cleared)
             SELECT $1, $2, c, 'missing_on_satellite', true FROM unnest($3::text[]) AS c
             UNION ALL
             SELECT $1, $2, c, 'unknown_to_holdfast', false FROM unnest($4::text[]) AS c",
        )
        .bind(ws)
        .bind(channel.as_str())
        .bind(&cleared)
        .bind(&extra)
        .execute(&mut *tx)
        .await?;
        let sold: Vec<(String, String)> = unknown
            .iter()
            .filter(|(_, s)| s.is_some())
            .map(|(c, _)| (c.clone(), String::new()))
            .collect();
        if !sold.is_empty() {
            let body = json!({"reason": "sold", "cards": card_refs(&sold)});
            enqueue(
                &mut tx,
                ws,
                channel.as_str(),
                "bulk-disengage",
                body,
                Utc::now(),
            )
            .await?;
        }
        let cleared: Vec<CardId> = cleared.into_iter().map(CardId::from_store).collect();
        if !cleared.is_empty() {
            before_commit(next_version(&mut tx).await?, &cleared).await?;
        }
        tx.commit().await?;
        Ok(Drift {
            missing_on_satellite: cleared,
            unknown_to_holdfast: unknown
                .into_iter()
                .map(|(c, _)| CardId::from_store(c))
                .collect(),
        })
    }

    /// Recorded drift, newest first, before row id `before` (0: from the
    /// newest), optionally of one channel.
    pub async fn drift(
        &self,
        workspace: &TenantId,
        channel: Option<&ChannelSlug>,
        before: i64,
        limit: i64,
    ) -> Result<Vec<DriftRow>, Error> {
        Ok(sqlx::query_as::<_, DriftRow>(
            "SELECT id, channel, card_id, direction, cleared, detected_at FROM channel_drift
             WHERE workspace = $1 AND ($2::text IS NULL OR channel = $2) AND ($3 = 0 OR id < $3)
             ORDER BY id DESC LIMIT $4",
        )
        .bind(workspace.as_str())
        .bind(channel.map(ChannelSlug::as_str))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Why each of `cards` may not go live on `channel` (`engage_rule`), read
/// with the cards' rows locked; the cards are created first if new. `ids`
/// are the cards' ids, sorted, so concurrent engages lock in one order.
async fn engage_conflicts(
    tx: &mut Transaction<'_, Postgres>,
    ws: &str,
    channel: &Channel,
    cards: &[EngageCard],
    ids: &[&str],
) -> Result<Vec<(CardId, EngageConflict)>, Error> {
    let dual: Option<(bool,)> =
        sqlx::query_as("SELECT dual_listing FROM channel_settings WHERE workspace = $1")
            .bind(ws)
            .fetch_optional(&mut **tx)
            .await?;
    let dual = dual.is_some_and(|(d,)| d);
    sqlx::query(
        "INSERT INTO cards (workspace, card_id) SELECT $1, c FROM unnest($2::text[]) AS c ON CONFLICT DO NOTHING",
    )
    .bind(ws)
    .bind(ids)
    .execute(&mut **tx)
    .await?;
    let sold: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT card_id, sold_channel FROM cards WHERE workspace = $1 AND card_id = ANY($2)
         ORDER BY card_id FOR UPDATE",
    )
    .bind(ws)
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    // Every listing of these cards, live ones kept here: with
    // `status = 'active'` in the query, a planner working from a fresh
    // table's statistics took the partial index of active listings and
    // walked all of them (seconds per Engage of a large catalogue).
    let live: Vec<(String, String, bool)> = sqlx::query_as::<_, (String, String, bool, String)>(
        "SELECT cc.card_id, cc.channel, ch.exclusive, cc.status FROM card_channels cc
         JOIN channels ch ON ch.workspace = cc.workspace AND ch.slug = cc.channel
         WHERE cc.workspace = $1 AND cc.card_id = ANY($2)",
    )
    .bind(ws)
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .filter(|r| r.3 == "active")
    .map(|(card, channel, exclusive, _)| (card, channel, exclusive))
    .collect();
    let mut conflicts = Vec::new();
    for card in cards {
        let id = card.card_id.as_str();
        let sold_on = sold
            .iter()
            .find(|(c, _)| c == id)
            .and_then(|(_, s)| s.clone())
            .map(ChannelSlug::from_store);
        let on: Vec<(ChannelSlug, bool)> = live
            .iter()
            .filter(|(c, _, _)| c == id)
            .map(|(_, ch, ex)| (ChannelSlug::from_store(ch.clone()), *ex))
            .collect();
        if let Err(why) = engage_rule(channel, &on, sold_on.as_ref(), dual) {
            conflicts.push((card.card_id.clone(), why));
        }
    }
    Ok(conflicts)
}

/// Makes `cards` live on `channel` (new listings, or inactive ones made
/// live again, with the satellite's context); returns those that were not
/// live there already.
async fn list_on(
    tx: &mut Transaction<'_, Postgres>,
    ws: &str,
    channel: &Channel,
    cards: &[EngageCard],
) -> Result<Vec<CardId>, Error> {
    let refs: Vec<&str> = cards.iter().map(|c| c.external_ref.as_str()).collect();
    let metas: Vec<String> = cards.iter().map(|c| c.metadata.to_string()).collect();
    let card_ids: Vec<&str> = cards.iter().map(|c| c.card_id.as_str()).collect();
    let engaged: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO card_channels (workspace, card_id, channel, status, external_ref, metadata)
         SELECT $1, u.card_id, $2, 'active', u.external_ref, u.metadata::jsonb
         FROM unnest($3::text[], $4::text[], $5::text[]) AS u(card_id, external_ref, metadata)
         ON CONFLICT (workspace, card_id, channel) DO UPDATE
             SET status = 'active', external_ref = EXCLUDED.external_ref, metadata = EXCLUDED.metadata,
                 engaged_at = now(), disengaged_at = NULL
             WHERE card_channels.status = 'inactive'
         RETURNING card_id",
    )
    .bind(ws)
    .bind(channel.slug.as_str())
    .bind(&card_ids)
    .bind(&refs)
    .bind(&metas)
    .fetch_all(&mut **tx)
    .await?;
    Ok(engaged
        .into_iter()
        .map(|(c,)| CardId::from_store(c))
        .collect())
}

/// The next number of the `listing_version` sequence. Called after the
/// change has locked its listing rows, so numbers follow the order in
/// which Postgres applies changes to any one listing.
async fn next_version(tx: &mut Transaction<'_, Postgres>) -> Result<i64, Error> {
    Ok(sqlx::query_scalar("SELECT nextval('listing_version')")
        .fetch_one(&mut **tx)
        .await?)
}

/// The `cards` of a webhook body: (card id, external ref) pairs.
pub(super) fn card_refs(rows: &[(String, String)]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|(c, r)| json!({"card_id": c, "external_ref": r}))
        .collect()
}

/// Adds a webhook for `channel`'s satellite to the outbox, in the caller's
/// transaction. A channel without a satellite gets none: reconcile is how
/// a satellite configured later catches up.
pub(super) async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    workspace: &str,
    channel: &str,
    event: &str,
    body: serde_json::Value,
    at: DateTime<Utc>,
) -> Result<(), Error> {
    enqueue_all(tx, workspace, event, vec![(channel.to_string(), body, at)]).await
}

/// Adds the webhooks `hooks` (channel, body, when), in their order, as
/// [`enqueue`] does each, in one statement.
///
/// A drainer batch of completed sale locks on cards listed on several
/// channels pulls many listings; one statement per webhook made Postgres
/// and the daemon's statement handling the larger part of a sale, and the
/// drainer fell behind the sales (deploy/BENCHMARKS.md, "2026-12-07,
/// 14:10: cards listed on several channels").
pub(super) async fn enqueue_all(
    tx: &mut Transaction<'_, Postgres>,
    workspace: &str,
    event: &str,
    hooks: Vec<(String, serde_json::Value, DateTime<Utc>)>,
) -> Result<(), Error> {
    if hooks.is_empty() {
        return Ok(());
    }
    let mut channels = Vec::with_capacity(hooks.len());
    let mut bodies = Vec::with_capacity(hooks.len());
    let mut counts = Vec::with_capacity(hooks.len());
    for (channel, mut body, at) in hooks {
        let cards = body["cards"].as_array().map_or(0, Vec::len);
        body["event"] = json!(event);
        body["workspace"] = json!(workspace);
        body["channel"] = json!(channel);
        body["occurred_at"] = json!(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        bodies.push(body.to_string());
        counts.push(i32::try_from(cards).unwrap_or(i32::MAX));
        channels.push(channel);
    }
    // A transaction's notifications go out when it commits, one a
    // satellite however often it queued (`outbox::QUEUED_CHANNEL` says
    // what they carry).
    sqlx::query(
        "WITH queued AS (
             INSERT INTO outbox (workspace, channel, event, body, card_count)
             SELECT $1, h.channel, $2, h.body, h.card_count
             FROM UNNEST($3::text[], $4::text[], $5::int4[]) WITH ORDINALITY AS h(channel, body, card_count, n)
             WHERE EXISTS (SELECT 1 FROM satellites s WHERE s.workspace = $1 AND s.channel = h.channel)
             ORDER BY h.n
             RETURNING channel
         )
         SELECT pg_notify($6, $1 || ' ' || q.channel) FROM (SELECT DISTINCT channel FROM queued) q",
    )
    .bind(workspace)
    .bind(event)
    .bind(&channels)
    .bind(&bodies)
    .bind(&counts)
    .bind(super::outbox::QUEUED_CHANNEL)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

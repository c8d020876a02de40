//! The sale transition of completed sale locks, run inside the transaction
//! that records their `committed` events (the drainer's, or the fallback's
//! own), so exactly once per event: the cards become sold on the lock's
//! channel, every other live listing of them inactive, and each affected
//! satellite gets one `bulk-disengage` per lock listing its cards.
//!
//! A drainer batch holds many completed locks; they are written together,
//! a handful of statements per batch rather than per lock (under a
//! checkout rush on cards, per-lock statements made Postgres most of the
//! machine).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Postgres, Transaction};

use super::listings::{card_refs, enqueue_all};
use crate::domain::{CardId, TenantId};
use crate::error::Error;

/// One completed sale lock.
pub struct LockSale<'a> {
    /// The channel that took the lock.
    pub channel: &'a str,
    /// The lockRef.
    pub lock_ref: &'a str,
    /// Its cards.
    pub cards: Vec<CardId>,
    /// When it completed.
    pub at: DateTime<Utc>,
}

/// Records `sales`, in order: a card in two of them (only possible after a
/// lost Redis epoch) keeps the first sale on record.
pub(super) async fn record_lock_sales(
    tx: &mut Transaction<'_, Postgres>,
    workspace: &TenantId,
    sales: &[LockSale<'_>],
) -> Result<(), Error> {
    let ws = workspace.as_str();
    let mut seen = HashSet::new();
    let (mut cards, mut owner) = (Vec::new(), Vec::new());
    let mut wanted = 0;
    for (i, s) in sales.iter().enumerate() {
        for c in &s.cards {
            wanted += 1;
            if seen.insert(c.as_str()) {
                cards.push(c.as_str());
                owner.push(i);
            }
        }
    }
    if cards.is_empty() {
        return Ok(());
    }
    // Column arrays, one row per card, for the UNNESTs below. Each UPDATE
    // also names its rows by `card_id = ANY(...)`: joined to the UNNEST
    // alone, a planner working from a fresh table's statistics chose to
    // scan every card per batch (4.8 s for one batch, under lock-complete).
    // For the same reason the live-listing test is a CASE: a plain
    // `status = 'active'` lets the planner pick the partial index of all
    // active listings instead of the cards' own rows.
    let channels: Vec<&str> = owner.iter().map(|&i| sales[i].channel).collect();
    let refs: Vec<&str> = owner.iter().map(|&i| sales[i].lock_ref).collect();
    let ats: Vec<DateTime<Utc>> = owner.iter().map(|&i| sales[i].at).collect();

    // The channels and cards exist (a lock needs a listing); these inserts
    // only guard the foreign keys below, so that no state of the tables can
    // make an event fail forever and stall the drainer.
    sqlx::query(
        "INSERT INTO channels (workspace, slug, name)
         SELECT DISTINCT $1, ch, ch FROM unnest($2::text[]) AS ch ON CONFLICT DO NOTHING",
    )
    .bind(ws)
    .bind(&channels)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO cards (workspace, card_id)
         SELECT $1, c FROM unnest($2::text[]) AS c ORDER BY c ON CONFLICT DO NOTHING",
    )
    .bind(ws)
    .bind(&cards)
    .execute(&mut **tx)
    .await?;
    let sold: Vec<(String,)> = sqlx::query_as(
        "UPDATE cards c SET sold_channel = d.channel, sold_lock_ref = d.lock_ref, sold_at = d.at
         FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[]) AS d(card, channel, lock_ref, at)
         WHERE c.workspace = $1 AND c.card_id = ANY($2) AND c.card_id = d.card AND c.sold_channel IS NULL
         RETURNING c.card_id",
    )
    .bind(ws)
    .bind(&cards)
    .bind(&channels)
    .bind(&refs)
    .bind(&ats)
    .fetch_all(&mut **tx)
    .await?;
    if sold.len() != wanted {
        // A card's pool has capacity 1, so this means a Redis epoch was
        // lost and a card sold twice: the first sale stays on record.
        tracing::error!(%workspace, "a sale lock completed on cards already sold; keeping the first sale");
    }
    // The rows of the cards this batch sold.
    let sold: HashSet<String> = sold.into_iter().map(|(c,)| c).collect();
    let keep: Vec<usize> = (0..cards.len())
        .filter(|&k| sold.contains(cards[k]))
        .collect();
    let s_cards: Vec<&str> = keep.iter().map(|&k| cards[k]).collect();
    let s_channels: Vec<&str> = keep.iter().map(|&k| channels[k]).collect();
    let s_refs: Vec<&str> = keep.iter().map(|&k| refs[k]).collect();
    let s_ats: Vec<DateTime<Utc>> = keep.iter().map(|&k| ats[k]).collect();
    // One pass over the sold cards' listings: the lock's own becomes sold,
    // every other live one inactive (pulled, for the webhooks below). It
    // was an upsert of the sold listing and then an UPDATE of the others,
    // two passes, and the upsert was the costliest statement of a lock's
    // completion (deploy/BENCHMARKS.md, "a sale lock's completion in one
    // pass").
    let touched: Vec<(String, String, String, String, bool)> = sqlx::query_as(
        "UPDATE card_channels l
         SET status = CASE WHEN l.channel = d.channel THEN 'sold' ELSE 'inactive' END,
             disengaged_at = d.at
         FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[]) AS d(card, channel, lock_ref, at)
         WHERE l.workspace = $1 AND l.card_id = ANY($2) AND l.card_id = d.card
           AND (l.channel = d.channel OR CASE l.status WHEN 'active' THEN true ELSE false END)
         RETURNING d.lock_ref, l.channel, l.card_id, l.external_ref, l.channel = d.channel",
    )
    .bind(ws)
    .bind(&s_cards)
    .bind(&s_channels)
    .bind(&s_refs)
    .bind(&s_ats)
    .fetch_all(&mut **tx)
    .await?;
    let (sold_rows, pulled): (Vec<_>, Vec<_>) = touched.into_iter().partition(|t| t.4);
    // A lock needs a live listing on its channel, so its sold listing is
    // there; one removed meanwhile (not a path the API has) is written.
    if sold_rows.len() < s_cards.len() {
        let listed: HashSet<&str> = sold_rows.iter().map(|t| t.2.as_str()).collect();
        let missing: Vec<usize> = (0..s_cards.len())
            .filter(|&k| !listed.contains(s_cards[k]))
            .collect();
        sqlx::query(
            "INSERT INTO card_channels (workspace, card_id, channel, status, disengaged_at)
             SELECT $1, d.card, d.channel, 'sold', d.at
             FROM unnest($2::text[], $3::text[], $4::timestamptz[]) AS d(card, channel, at)
             ON CONFLICT (workspace, card_id, channel) DO UPDATE SET status = 'sold', disengaged_at = EXCLUDED.disengaged_at",
        )
        .bind(ws)
        .bind(missing.iter().map(|&k| s_cards[k]).collect::<Vec<_>>())
        .bind(missing.iter().map(|&k| s_channels[k]).collect::<Vec<_>>())
        .bind(missing.iter().map(|&k| s_ats[k]).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    }
    // One webhook per lock and pulled channel, in the order of the sales
    // and then of the channels, as one lock at a time would send them.
    let index: HashMap<&str, usize> = sales
        .iter()
        .enumerate()
        .map(|(i, s)| (s.lock_ref, i))
        .collect();
    let mut hooks: BTreeMap<(usize, String), Vec<(String, String)>> = BTreeMap::new();
    for (lock_ref, ch, card, external_ref, _) in pulled {
        let i = index.get(lock_ref.as_str()).copied().unwrap_or(usize::MAX);
        hooks.entry((i, ch)).or_default().push((card, external_ref));
    }
    let mut queued = Vec::with_capacity(hooks.len());
    for ((i, ch), mut rows) in hooks {
        let Some(sale) = sales.get(i) else { continue };
        rows.sort();
        let body = json!({"reason": "sold", "sold_on": sale.channel, "lock_ref": sale.lock_ref, "cards": card_refs(&rows)});
        queued.push((ch, body, sale.at));
    }
    enqueue_all(tx, ws, "bulk-disengage", queued).await
}

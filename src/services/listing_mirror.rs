//! The listing mirror: which channels each card is live on, copied from
//! Postgres (`card_channels`, the system of record) into Redis, so that a
//! sale lock on cards that are live where the checkout runs never waits for
//! Postgres (deploy/BENCHMARKS.md, lock-complete).
//!
//! The copy is trusted in one direction only. "Live on this channel" lets
//! an acquire skip Postgres; anything else (not live, never copied, Redis
//! unreachable) sends it to Postgres as before. So a copy that is missing
//! or says too little only costs speed; the one copy that must never be
//! wrong is a stale "live", and three rules keep it out:
//!
//! 1. A change that takes a card off a channel (disengage, reconcile)
//!    writes "not live" *before* it commits, while it holds the listing
//!    rows, and does not commit if Redis cannot take the write: that change
//!    answers UNAVAILABLE (retry it) while Redis is unreachable.
//! 2. A change that puts a card on a channel (engage) writes "live" only
//!    *after* it commits, and only once Redis runs the card's pool (so a
//!    lock on it is Redis's to refuse; the rare lock the Postgres fallback
//!    made during an outage is looked for when Redis refuses a card that
//!    nobody there holds: `SaleLocks::acquire`).
//! 3. Each write carries the change's number from Postgres's
//!    `listing_version` sequence, taken while the change held the rows;
//!    `set_listings.lua` keeps the newer of two writes, so an engage whose
//!    write arrives after a later disengage's cannot undo it.
//!
//! A sale needs no write: it sells the card's one unit, which Redis then
//! refuses to every channel. A card with no copy (engaged before the
//! mirror existed, or Redis came back empty) is checked in Postgres, and
//! that acquire then copies it ([`repair`]) under a share lock on its
//! listing rows, so that a delisting waits for the copy and overrides it
//! with its larger version.

use std::sync::Arc;

use crate::domain::{CardId, ChannelSlug, TenantId};
use crate::engine::Engine;
use crate::error::Error;

/// Cards per mirror write, so that wiping a large channel is many short
/// scripts rather than one that stalls Redis for everyone else.
const WRITE_CHUNK: usize = 1_000;

/// Writes `cards`' state on `channel` as of `version`, in parts of
/// [`WRITE_CHUNK`].
async fn write(
    engine: &Engine,
    ws: &TenantId,
    channel: &ChannelSlug,
    version: i64,
    live: bool,
    cards: &[CardId],
) -> Result<(), Error> {
    for part in cards.chunks(WRITE_CHUNK) {
        engine
            .redis()
            .set_listings(ws, channel, version, live, part)
            .await?;
    }
    Ok(())
}

/// Copies "live" after an engage committed (rule 2). Best effort: a card
/// left uncopied is checked in Postgres.
pub async fn record_live(
    engine: &Engine,
    ws: &TenantId,
    channel: &ChannelSlug,
    version: i64,
    cards: &[CardId],
) {
    if let Err(e) = write(engine, ws, channel, version, true, cards).await {
        tracing::warn!(%ws, %channel, error = %e, "cannot copy engaged cards to the listing mirror; their locks read postgres");
    }
}

/// Copies "not live" before a delisting commits (rule 1): an error here
/// must stop the commit.
pub async fn record_gone(
    engine: &Engine,
    ws: &TenantId,
    channel: &ChannelSlug,
    version: i64,
    cards: &[CardId],
) -> Result<(), Error> {
    write(engine, ws, channel, version, false, cards)
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach Redis to stop sale locks on the delisted cards ({e}); nothing changed, retry"
            ))
        })
}

/// Copies `cards`' listings on `channel` from Postgres, in the background:
/// called by an acquire that had to ask Postgres, so the next acquire of
/// these cards does not.
pub fn repair(engine: Arc<Engine>, ws: TenantId, channel: ChannelSlug, cards: Vec<CardId>) {
    tokio::spawn(async move {
        let copied = engine
            .pg()
            .with_live_listings(&ws, &channel, &cards, async |version, live| {
                write(&engine, &ws, &channel, version, true, live).await
            })
            .await;
        if let Err(e) = copied {
            tracing::debug!(%ws, %channel, error = %e, "cannot copy listings to the mirror; the next acquire asks postgres again");
        }
    });
}

//! Sale locks: a card is the pool `card/<card_id>` with capacity 1, and a
//! sale lock is a hold over a batch of card pools whose id is the caller's
//! lockRef and whose reference is the channel that took it. So one active
//! lock per card, whatever the channel, is the engine's capacity rule; the
//! batch is all-or-nothing because a reserve is; an expired lock frees its
//! cards at once because the scripts treat it as gone; completing is a
//! commit, which the drainer turns into the channel changes and webhooks.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::{
    CardId, ChannelSlug, Hold, HoldId, HoldState, Job, Line, Lines, Quantity, TakeOutcome, TenantId,
};
use crate::engine::{Engine, ListedTake, Take};
use crate::error::Error;
use crate::services::channels::{Channels, not_for_sale};
use crate::services::listing_mirror;
use crate::store::postgres::CardOnChannel;
use crate::store::redis::{Holder, Listed};

/// How often a refused batch is retried when a card it was refused for has
/// become free before its holder could be named.
const ATTEMPTS: usize = 3;

/// Why a card could not be locked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardConflict {
    /// Another checkout holds a lock on it, taken on this channel (empty
    /// when not known).
    Locked(Option<ChannelSlug>),
    /// Sold, on this channel (empty when no longer known).
    Sold(Option<ChannelSlug>),
    /// Not live on the calling channel.
    NotListed,
}

/// The answer to an acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// Every card is locked under the lockRef (now, or by an earlier call
    /// with the same lockRef, whose TTL this call refreshed).
    Acquired(SaleLock),
    /// Nothing was locked; every conflicting card, with why.
    Conflict(Vec<(CardId, CardConflict)>),
}

/// A sale lock as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleLock {
    /// The hold underneath (its id is the lockRef).
    pub hold: Hold,
    /// The channel that took it.
    pub channel: String,
    /// The locked cards.
    pub cards: Vec<CardId>,
}

impl SaleLock {
    fn of(hold: Hold) -> Self {
        let cards = hold
            .lines
            .iter()
            .filter_map(|(pool, _)| CardId::of_pool(pool.as_str()))
            .collect();
        Self {
            channel: hold.reference.clone(),
            cards,
            hold,
        }
    }
}

/// The sale-lock use cases.
pub struct SaleLocks {
    engine: Arc<Engine>,
    channels: Arc<Channels>,
    max_batch: usize,
}

impl SaleLocks {
    /// Sale locks on top of `engine`, checking listings with `channels`.
    pub fn new(engine: Arc<Engine>, channels: Arc<Channels>, max_batch: usize) -> Self {
        Self {
            engine,
            channels,
            max_batch,
        }
    }

    /// Locks `cards` (distinct, sorted by the caller's parser) for a
    /// checkout on `channel`. Unknown cards are NOT_FOUND.
    pub async fn acquire(
        &self,
        ws: &TenantId,
        lock_ref: HoldId,
        channel: &ChannelSlug,
        cards: Vec<CardId>,
        ttl: Duration,
    ) -> Result<AcquireOutcome, Error> {
        self.channels.ensure(ws).await?;
        let take = self.lock_take(&lock_ref, channel, &cards, ttl)?;
        // Cards the listing mirror knows to be live here need no Postgres:
        // one Redis call checks the mirror, answers an earlier lock under
        // this lockRef, or takes the cards (services/listing_mirror.rs).
        let listed = Listed {
            channel,
            cards: &cards,
        };
        let mut first = match self.engine.take_if_listed(ws, &take, listed).await? {
            ListedTake::Again(hold) => return self.again(ws, hold, channel, &cards, ttl).await,
            ListedTake::Took(outcome) => Some(outcome),
            ListedTake::NotMirrored => None,
        };
        let mirrored = first.is_some();
        if !mirrored
            && let Some(answer) = self
                .ask_postgres(ws, &lock_ref, channel, &cards, ttl)
                .await?
        {
            return Ok(answer);
        }
        for _ in 0..ATTEMPTS {
            let outcome = match first.take() {
                Some(outcome) => outcome,
                None => self.engine.take(ws, &take).await?,
            };
            match outcome {
                TakeOutcome::Taken(hold) if hold.reference == channel.as_str() => {
                    return Ok(AcquireOutcome::Acquired(SaleLock::of(hold)));
                }
                // A concurrent call with this lockRef from another channel won.
                TakeOutcome::Taken(_) => return Err(reused(&lock_ref)),
                TakeOutcome::SoldOut(short) => {
                    let refused: Vec<CardId> = short
                        .iter()
                        .filter_map(|s| CardId::of_pool(s.pool.as_str()))
                        .collect();
                    let named = self.holders(ws, channel, &refused).await?;
                    if !named.is_empty() {
                        let named = self.name_sellers(ws, channel, named).await?;
                        return Ok(AcquireOutcome::Conflict(named));
                    }
                    // Refused by Redis with no holder there: a lock the
                    // fallback made, perhaps under this lockRef.
                    if mirrored && let Some(hold) = self.existing(ws, &lock_ref).await? {
                        return self.again(ws, hold, channel, &cards, ttl).await;
                    }
                }
                other => {
                    return Err(Error::internal(format!(
                        "unexpected outcome for a sale lock: {other:?}"
                    )));
                }
            }
        }
        Err(Error::Unavailable(
            "the cards kept changing hands; retry with the same lock_ref".into(),
        ))
    }

    /// The take under a sale lock: one unit of each card's pool, held for
    /// `ttl`, with the channel as its reference.
    fn lock_take(
        &self,
        lock_ref: &HoldId,
        channel: &ChannelSlug,
        cards: &[CardId],
        ttl: Duration,
    ) -> Result<Take, Error> {
        let one = Quantity::parse("quantity", 1, 1)?;
        let lines = cards
            .iter()
            .map(|c| Line {
                pool: c.pool(),
                quantity: one,
            })
            .collect();
        Ok(Take {
            id: lock_ref.clone(),
            job: Job::Lock,
            lines: Lines::parse("card_ids", lines, self.max_batch)?,
            ttl: Some(ttl),
            customer: None,
            reference: channel.to_string(),
        })
    }

    /// The acquire's checks when the listing mirror could not vouch for
    /// the cards: their listings in Postgres, and an earlier lock under
    /// this lockRef in either store (the fallback may have made it). The
    /// answer, when one of them decides it; `None` to go on and take.
    async fn ask_postgres(
        &self,
        ws: &TenantId,
        lock_ref: &HoldId,
        channel: &ChannelSlug,
        cards: &[CardId],
        ttl: Duration,
    ) -> Result<Option<AcquireOutcome>, Error> {
        let states = self.states(ws, channel, cards).await?;
        match self.existing(ws, lock_ref).await {
            Ok(Some(hold)) => return self.again(ws, hold, channel, cards, ttl).await.map(Some),
            Ok(None) => {}
            // Redis is away and the fallback has no lock under this
            // lockRef. If Redis has one, its cards' units are in Redis and
            // the fallback's take cannot have them (it answers UNAVAILABLE:
            // wait for Redis); otherwise the fallback serves the lock, as
            // it serves any take while Redis is away.
            Err(Error::Unavailable(_)) => {}
            Err(e) => return Err(e),
        }
        let refused = refused(cards, states)?;
        if !refused.is_empty() {
            return Ok(Some(AcquireOutcome::Conflict(refused)));
        }
        if self.engine.circuit().closed() {
            listing_mirror::repair(
                self.engine.clone(),
                ws.clone(),
                channel.clone(),
                cards.to_vec(),
            );
        }
        Ok(None)
    }

    /// The lock under `lock_ref`, in Redis or the fallback, if there is one.
    async fn existing(&self, ws: &TenantId, lock_ref: &HoldId) -> Result<Option<Hold>, Error> {
        match self.engine.get_hold(ws, lock_ref, Job::Lock).await {
            Ok(hold) => Ok(Some(hold)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// An acquire with a lockRef that exists: the same request refreshes an
    /// active lock's TTL (any number of times); a different one is
    /// ALREADY_EXISTS; a finished lock is FAILED_PRECONDITION.
    async fn again(
        &self,
        ws: &TenantId,
        hold: Hold,
        channel: &ChannelSlug,
        cards: &[CardId],
        ttl: Duration,
    ) -> Result<AcquireOutcome, Error> {
        let lock = SaleLock::of(hold);
        if lock.channel != channel.as_str() || lock.cards != cards {
            return Err(reused(&lock.hold.id));
        }
        if lock.hold.state != HoldState::Active {
            return Err(finished(&lock.hold));
        }
        let hold = self
            .engine
            .extend_within(ws, &lock.hold.id, Job::Lock, ttl, "", u32::MAX)
            .await
            .map_err(lock_words)?;
        Ok(AcquireOutcome::Acquired(SaleLock::of(hold)))
    }

    /// The cards as Postgres sees them on `channel`, read once per acquire.
    /// An unknown channel is NOT_FOUND; one not for sale INVALID_ARGUMENT.
    async fn states(
        &self,
        ws: &TenantId,
        channel: &ChannelSlug,
        cards: &[CardId],
    ) -> Result<Vec<CardOnChannel>, Error> {
        match self
            .engine
            .pg()
            .cards_on_channel(ws, channel, cards)
            .await?
        {
            None => Err(Error::NotFound(format!("channel {channel}"))),
            Some((false, _)) => Err(not_for_sale("channel", channel)),
            Some((true, states)) => Ok(states),
        }
    }

    /// Names who holds or sold each card a take refused; empty when they
    /// all became free meanwhile (the caller tries again).
    ///
    /// Redis names the holders of the units it has. A unit it does not
    /// have is the fallback's: held by a lock the fallback took while Redis
    /// was away, or sold through one, which Postgres names. A card Redis
    /// cannot be asked about and Postgres does not name has its unit in
    /// Redis, free or not: UNAVAILABLE, until Redis answers.
    async fn holders(
        &self,
        ws: &TenantId,
        channel: &ChannelSlug,
        cards: &[CardId],
    ) -> Result<Vec<(CardId, CardConflict)>, Error> {
        let pools: Vec<_> = cards.iter().map(CardId::pool).collect();
        let (mut named, redis_answered) = match self.engine.redis().holders(ws, &pools).await {
            Ok(holders) => (in_redis(cards, holders), true),
            Err(Error::RedisUnavailable(_)) => (Vec::new(), false),
            Err(e) => return Err(e),
        };
        let unnamed: Vec<CardId> = cards
            .iter()
            .filter(|c| !named.iter().any(|(n, _)| n == *c))
            .cloned()
            .collect();
        if unnamed.is_empty() {
            return Ok(named);
        }
        let in_postgres = self.in_postgres(ws, channel, &unnamed).await?;
        if !redis_answered && in_postgres.is_empty() {
            return Err(Error::Unavailable(
                "the cards wait for Redis, which holds their units and is unreachable; \
                 retry with the same lock_ref"
                    .into(),
            ));
        }
        named.extend(in_postgres);
        Ok(named)
    }

    /// Which of `cards` Postgres says are sold, or locked by the fallback,
    /// and on which channel.
    async fn in_postgres(
        &self,
        ws: &TenantId,
        channel: &ChannelSlug,
        cards: &[CardId],
    ) -> Result<Vec<(CardId, CardConflict)>, Error> {
        let states = self.states(ws, channel, cards).await?;
        let pools: Vec<_> = cards.iter().map(CardId::pool).collect();
        let locked = self
            .engine
            .pg()
            .fallback_holders(ws, Job::Lock, &pools)
            .await?;
        Ok(cards
            .iter()
            .filter_map(|card| {
                if let Some(sold) = states
                    .iter()
                    .find(|s| s.card_id == *card)
                    .and_then(|s| s.sold_channel.clone())
                {
                    return Some((card.clone(), CardConflict::Sold(Some(sold))));
                }
                let pool = card.pool();
                locked.iter().find(|(p, _)| *p == pool).map(|(_, holder)| {
                    let on = (!holder.is_empty()).then(|| ChannelSlug::from_store(holder.clone()));
                    (card.clone(), CardConflict::Locked(on))
                })
            })
            .collect())
    }

    /// Fills in the channel of each card Redis says is sold but no longer
    /// remembers who sold (the selling lock is past `--retention-secs`),
    /// from Postgres, which records every sale for good.
    async fn name_sellers(
        &self,
        ws: &TenantId,
        channel: &ChannelSlug,
        mut named: Vec<(CardId, CardConflict)>,
    ) -> Result<Vec<(CardId, CardConflict)>, Error> {
        let unnamed: Vec<CardId> = named
            .iter()
            .filter(|(_, why)| *why == CardConflict::Sold(None))
            .map(|(card, _)| card.clone())
            .collect();
        if unnamed.is_empty() {
            return Ok(named);
        }
        let states = match self.states(ws, channel, &unnamed).await {
            Ok(states) => states,
            // The answer is still right without the channel.
            Err(Error::Unavailable(_)) => return Ok(named),
            Err(e) => return Err(e),
        };
        for (card, why) in &mut named {
            if let Some(s) = states.iter().find(|s| s.card_id == *card)
                && s.sold_channel.is_some()
            {
                *why = CardConflict::Sold(s.sold_channel.clone());
            }
        }
        Ok(named)
    }

    /// Completes a lock: its cards are sold on its channel. Refused with
    /// FAILED_PRECONDITION when the lock expired or was released (the cards
    /// may belong to another buyer by now). A retry answers as the first
    /// call.
    pub async fn complete(
        &self,
        ws: &TenantId,
        lock_ref: &HoldId,
        order_id: &str,
    ) -> Result<SaleLock, Error> {
        let hold = self
            .engine
            .commit(ws, lock_ref, Job::Lock, order_id)
            .await
            .map_err(lock_words)?;
        Ok(SaleLock::of(hold))
    }

    /// Releases a lock: its cards are free again everywhere. Idempotent; a
    /// completed lock is FAILED_PRECONDITION.
    pub async fn release(&self, ws: &TenantId, lock_ref: &HoldId) -> Result<SaleLock, Error> {
        let hold = self
            .engine
            .release(ws, lock_ref, Job::Lock)
            .await
            .map_err(lock_words)?;
        Ok(SaleLock::of(hold))
    }

    /// Reads a lock.
    pub async fn get(&self, ws: &TenantId, lock_ref: &HoldId) -> Result<SaleLock, Error> {
        let hold = self
            .engine
            .get_hold(ws, lock_ref, Job::Lock)
            .await
            .map_err(lock_words)?;
        Ok(SaleLock::of(hold))
    }
}

fn reused(lock_ref: &HoldId) -> Error {
    Error::AlreadyExists(format!(
        "lock_ref {lock_ref} was already used for other cards or another channel; use a new lock_ref"
    ))
}

fn finished(hold: &Hold) -> Error {
    let state = match hold.state {
        HoldState::Committed => "completed",
        HoldState::Released => "released",
        _ => "expired",
    };
    Error::FailedPrecondition(format!(
        "lock {} is {state}; start a new checkout with a new lock_ref",
        hold.id
    ))
}

/// An engine error about a hold, in a lock's words.
fn lock_words(e: Error) -> Error {
    super::in_words(e, "lock", "completed")
}

/// Cards Postgres already refuses: sold, or not live on the channel. A
/// card the workspace does not know is NOT_FOUND.
/// The cards Redis says are held or sold, with the channel where it knows.
fn in_redis(cards: &[CardId], holders: Vec<Holder>) -> Vec<(CardId, CardConflict)> {
    cards
        .iter()
        .zip(holders)
        .filter_map(|(card, h)| {
            let channel = (!h.reference.is_empty() && h.job == Job::Lock.as_str())
                .then(|| ChannelSlug::from_store(h.reference.clone()));
            if h.sold > 0 {
                Some((card.clone(), CardConflict::Sold(channel)))
            } else if h.held > 0 {
                Some((card.clone(), CardConflict::Locked(channel)))
            } else {
                None
            }
        })
        .collect()
}

fn refused(
    cards: &[CardId],
    states: Vec<CardOnChannel>,
) -> Result<Vec<(CardId, CardConflict)>, Error> {
    if let Some(unknown) = cards
        .iter()
        .find(|c| !states.iter().any(|s| s.card_id == **c))
    {
        return Err(Error::NotFound(format!("card {unknown}")));
    }
    Ok(states
        .into_iter()
        .filter_map(|s| match s.sold_channel {
            Some(sold) => Some((s.card_id, CardConflict::Sold(Some(sold)))),
            None => (!s.live).then_some((s.card_id, CardConflict::NotListed)),
        })
        .collect())
}

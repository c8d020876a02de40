//! Channels: each workspace's registry (seeded on first use), its
//! dual-listing setting, satellites, and the transitions of a card's
//! listings. The rules and the transactions live in the domain and the
//! Postgres store; this adapter checks names against the registry and
//! pulls satellites' lists for reconcile.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::domain::channel::PERSONAL;
use crate::domain::{CardId, Channel, ChannelSlug, PoolId, TenantId};
use crate::engine::Engine;
use crate::error::Error;
use crate::satellite::SatelliteClient;
use crate::services::listing_mirror;
use crate::store::postgres::{
    CardState, DeliveryRow, DeliveryState, Drift, DriftRow, EngageCard, EngageOutcome, PgStore,
    Satellite,
};

/// The channel use cases.
pub struct Channels {
    engine: Arc<Engine>,
    client: SatelliteClient,
    /// Workspaces whose registry is known to be seeded, so the seeding
    /// insert runs once per workspace and process.
    seeded: RwLock<HashSet<TenantId>>,
}

impl Channels {
    /// Channels over `engine`'s Postgres; `client` pulls satellites' lists.
    pub fn new(engine: Arc<Engine>, client: SatelliteClient) -> Self {
        Self {
            engine,
            client,
            seeded: RwLock::new(HashSet::new()),
        }
    }

    fn pg(&self) -> &PgStore {
        self.engine.pg()
    }

    /// Seeds the workspace's registry if this process has not yet.
    pub async fn ensure(&self, ws: &TenantId) -> Result<(), Error> {
        if self
            .seeded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(ws)
        {
            return Ok(());
        }
        self.pg().ensure_channels(ws).await?;
        self.seeded
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ws.clone());
        Ok(())
    }

    /// The registry.
    pub async fn list(&self, ws: &TenantId) -> Result<Vec<Channel>, Error> {
        self.ensure(ws).await?;
        self.pg().list_channels(ws).await
    }

    /// A channel of the registry; NOT_FOUND when unknown.
    pub async fn channel(&self, ws: &TenantId, slug: &ChannelSlug) -> Result<Channel, Error> {
        self.ensure(ws).await?;
        self.pg()
            .channel(ws, slug)
            .await?
            .ok_or_else(|| Error::NotFound(format!("channel {slug}")))
    }

    /// A channel cards can be sold on; the personal collection is not one.
    pub async fn sale_channel(
        &self,
        ws: &TenantId,
        field: &str,
        slug: &ChannelSlug,
    ) -> Result<Channel, Error> {
        let channel = self.channel(ws, slug).await?;
        if !channel.for_sale {
            return Err(not_for_sale(field, slug));
        }
        Ok(channel)
    }

    /// Adds a channel, or renames one or changes its exclusive flag. The
    /// personal collection cannot be changed.
    pub async fn put(&self, ws: &TenantId, channel: Channel) -> Result<Channel, Error> {
        if channel.slug.as_str() == PERSONAL {
            return Err(Error::invalid(
                "channel.slug",
                "personal is built in and cannot be changed",
            ));
        }
        self.ensure(ws).await?;
        self.pg().put_channel(ws, &channel).await?;
        self.channel(ws, &channel.slug).await
    }

    /// The dual-listing setting.
    pub async fn dual_listing(&self, ws: &TenantId) -> Result<bool, Error> {
        self.ensure(ws).await?;
        self.pg().dual_listing(ws).await
    }

    /// Changes the dual-listing setting.
    pub async fn set_dual_listing(&self, ws: &TenantId, on: bool) -> Result<(), Error> {
        self.ensure(ws).await?;
        self.pg().set_dual_listing(ws, on).await
    }

    /// Sets a channel's satellite.
    pub async fn put_satellite(
        &self,
        ws: &TenantId,
        slug: &ChannelSlug,
        base_url: &str,
        secret: &str,
        batch_size: i32,
    ) -> Result<Satellite, Error> {
        self.client
            .check_host(base_url)
            .map_err(|why| Error::invalid("base_url", why))?;
        self.sale_channel(ws, "channel", slug).await?;
        let sat = self
            .pg()
            .put_satellite(ws, slug, base_url, secret, batch_size)
            .await?;
        // A satellite moved or mended is tried at once, not after the
        // backoff its old address earned.
        self.pg().retry_deliveries(ws, Some(slug)).await?;
        Ok(sat)
    }

    /// The workspace's satellites.
    pub async fn satellites(&self, ws: &TenantId) -> Result<Vec<Satellite>, Error> {
        self.pg().satellites(Some(ws)).await
    }

    /// The delivery each of the workspace's satellites waits on (its
    /// oldest pending one), by channel.
    pub async fn waiting_deliveries(&self, ws: &TenantId) -> Result<Vec<DeliveryRow>, Error> {
        self.pg().waiting_deliveries(ws).await
    }

    /// Every workspace's satellites, for the reconciler.
    pub async fn all_satellites(&self) -> Result<Vec<Satellite>, Error> {
        self.pg().satellites(None).await
    }

    /// Engages cards on a channel, all-or-nothing.
    pub async fn engage(
        &self,
        ws: &TenantId,
        slug: &ChannelSlug,
        cards: &[EngageCard],
    ) -> Result<EngageOutcome, Error> {
        let channel = self.sale_channel(ws, "channel", slug).await?;
        let outcome = self.pg().engage(ws, &channel, cards).await?;
        if let EngageOutcome::Engaged {
            engaged,
            already,
            version,
        } = &outcome
        {
            // Grant the cards' pools to Redis now rather than on each
            // card's first lock: grants are serial, so a checkout rush over
            // fresh cards would queue behind them (deploy/BENCHMARKS.md,
            // lock-complete), as CreateSale does for a sale's products. The
            // cards are live either way; one left ungranted is granted on
            // its first lock, which checks it in Postgres and copies it to
            // the listing mirror (services/listing_mirror.rs, `repair`).
            let cards: Vec<CardId> = engaged.iter().chain(already).cloned().collect();
            let pools: Vec<PoolId> = cards.iter().map(CardId::pool).collect();
            match self.engine.sync(ws, &pools).await {
                Ok(()) => {
                    listing_mirror::record_live(&self.engine, ws, slug, *version, &cards).await
                }
                Err(e) => {
                    tracing::warn!(%ws, channel = %slug, error = %e, "cannot grant the engaged cards' pools yet; they are granted on first lock");
                }
            }
        }
        Ok(outcome)
    }

    /// Disengages cards from a channel, or every card (`None`). Unknown
    /// cards are NOT_FOUND and change nothing.
    pub async fn disengage(
        &self,
        ws: &TenantId,
        slug: &ChannelSlug,
        cards: Option<&[CardId]>,
    ) -> Result<Vec<CardId>, Error> {
        self.channel(ws, slug).await?;
        if let Some(cards) = cards {
            self.known(ws, cards).await?;
        }
        let engine = &self.engine;
        self.pg()
            .disengage(ws, slug, cards, async |version, gone| {
                listing_mirror::record_gone(engine, ws, slug, version, gone).await
            })
            .await
    }

    /// Reconciles a channel with its satellite's canonical list: the one
    /// given, or (`None`) the one pulled from the satellite now.
    pub async fn reconcile(
        &self,
        ws: &TenantId,
        slug: &ChannelSlug,
        listed: Option<Vec<CardId>>,
    ) -> Result<Drift, Error> {
        self.channel(ws, slug).await?;
        // Before the list is made (pulled now, or pushed by its caller):
        // what is engaged later cannot be on it.
        let as_of = self.pg().now().await?;
        let listed = match listed {
            Some(l) => l,
            None => {
                let sat = self
                    .satellite(ws, slug, "to pull from; push its list instead")
                    .await?;
                let listed = self.pull(&sat).await?;
                // It answered, so it is up: what it missed while it was
                // down need not wait out the backoff.
                self.pg().retry_deliveries(ws, Some(slug)).await?;
                listed
            }
        };
        let engine = &self.engine;
        self.pg()
            .reconcile(ws, slug, &listed, as_of, async |version, gone| {
                listing_mirror::record_gone(engine, ws, slug, version, gone).await
            })
            .await
    }

    /// Pulls a satellite's canonical list, checking each id.
    pub async fn pull(&self, sat: &Satellite) -> Result<Vec<CardId>, Error> {
        let ids = self
            .client
            .active_cards(&sat.base_url, &sat.secret)
            .await
            .map_err(|f| {
                Error::Unavailable(format!(
                    "satellite of {} did not give its list: {}",
                    sat.channel, f.reason
                ))
            })?;
        let mut cards = ids
            .iter()
            .map(|id| CardId::parse("card_ids", id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                Error::Unavailable(format!("satellite of {} sent a bad list: {e}", sat.channel))
            })?;
        cards.sort();
        cards.dedup();
        Ok(cards)
    }

    /// Cards' channel states, in the order asked. Unknown cards are
    /// NOT_FOUND.
    pub async fn card_states(
        &self,
        ws: &TenantId,
        cards: &[CardId],
    ) -> Result<Vec<CardState>, Error> {
        self.known(ws, cards).await?;
        self.pg().card_states(ws, cards).await
    }

    /// Cards live on more channels than the rules allow now.
    pub async fn conflicts(
        &self,
        ws: &TenantId,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(CardId, Vec<Channel>)>, Error> {
        let registry = self.list(ws).await?;
        let rows = self.pg().listing_conflicts(ws, after, limit).await?;
        Ok(rows
            .into_iter()
            .map(|(card, slugs)| {
                let channels = slugs
                    .iter()
                    .filter_map(|s| registry.iter().find(|c| c.slug == *s).cloned())
                    .collect();
                (card, channels)
            })
            .collect())
    }

    /// Recorded drift, newest first.
    pub async fn drift(
        &self,
        ws: &TenantId,
        channel: Option<&ChannelSlug>,
        before: i64,
        limit: i64,
    ) -> Result<Vec<DriftRow>, Error> {
        self.pg().drift(ws, channel, before, limit).await
    }

    /// Webhook deliveries, newest first.
    pub async fn deliveries(
        &self,
        ws: &TenantId,
        channel: Option<&ChannelSlug>,
        state: Option<DeliveryState>,
        before: i64,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, Error> {
        self.pg()
            .deliveries(ws, channel, state, before, limit)
            .await
    }

    /// Makes the next delivery to the satellite of `channel` (or of each
    /// channel) due now if it waits out a backoff; returns the channels
    /// it did so for. A channel that is not known is NOT_FOUND, and one
    /// with no satellite FAILED_PRECONDITION.
    pub async fn retry_deliveries(
        &self,
        ws: &TenantId,
        channel: Option<&ChannelSlug>,
    ) -> Result<Vec<String>, Error> {
        if let Some(slug) = channel {
            self.channel(ws, slug).await?;
            self.satellite(
                ws,
                slug,
                "to retry deliveries to; set one with PutSatellite",
            )
            .await?;
        }
        self.pg().retry_deliveries(ws, channel).await
    }

    /// The satellite of a known channel: FAILED_PRECONDITION if it has
    /// none, with `wanted` (what it was wanted for, and what to do
    /// instead).
    async fn satellite(
        &self,
        ws: &TenantId,
        slug: &ChannelSlug,
        wanted: &str,
    ) -> Result<Satellite, Error> {
        self.satellites(ws)
            .await?
            .into_iter()
            .find(|s| s.channel == slug.as_str())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("channel {slug} has no satellite {wanted}"))
            })
    }

    /// NOT_FOUND naming the first card the workspace does not know.
    pub async fn known(&self, ws: &TenantId, cards: &[CardId]) -> Result<(), Error> {
        match self.pg().unknown_cards(ws, cards).await?.first() {
            Some(card) => Err(Error::NotFound(format!("card {card}"))),
            None => Ok(()),
        }
    }
}

/// The refusal of a channel cards cannot be sold on.
pub fn not_for_sale(field: &str, slug: &ChannelSlug) -> Error {
    Error::invalid(
        field,
        format!(
            "{slug} is not for sale: a card is in the personal collection while it is live nowhere else"
        ),
    )
}

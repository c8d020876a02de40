//! The channel registry of each workspace, its dual-listing setting, the
//! satellites that receive webhooks, and reads of where cards are live.

use chrono::{DateTime, Utc};

use super::PgStore;
use crate::domain::channel::DEFAULT_CHANNELS;
use crate::domain::{CardId, Channel, ChannelSlug, ListingStatus, TenantId};
use crate::error::Error;

/// A channel's satellite: where its webhooks go and how they are signed.
#[derive(Clone, sqlx::FromRow)]
pub struct Satellite {
    /// The workspace.
    pub workspace: String,
    /// The channel.
    pub channel: String,
    /// Base URL; webhooks go to `<base_url>/webhooks/<event>`, or in
    /// batches to `<base_url>/webhooks`.
    pub base_url: String,
    /// The HMAC key. Never logged (see the `Debug` impl).
    pub secret: String,
    /// Most webhooks sent in one request; 1 sends each alone.
    pub batch_size: i32,
    /// When it was last set.
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for Satellite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Satellite")
            .field("workspace", &self.workspace)
            .field("channel", &self.channel)
            .field("base_url", &self.base_url)
            .field("secret", &"<redacted>")
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

/// One card on one channel.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The card.
    pub card_id: CardId,
    /// The channel.
    pub channel: ChannelSlug,
    /// Where it stands there.
    pub status: ListingStatus,
    /// The satellite's id for the listing.
    pub external_ref: String,
    /// Per-channel context, a JSON object.
    pub metadata: serde_json::Value,
    /// When it was (last) engaged.
    pub engaged_at: DateTime<Utc>,
    /// When it was disengaged or sold, if it was.
    pub disengaged_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct ListingRow {
    card_id: String,
    channel: String,
    status: String,
    external_ref: String,
    metadata: serde_json::Value,
    engaged_at: DateTime<Utc>,
    disengaged_at: Option<DateTime<Utc>>,
}

impl TryFrom<ListingRow> for Listing {
    type Error = Error;

    fn try_from(r: ListingRow) -> Result<Self, Error> {
        Ok(Listing {
            status: ListingStatus::parse(&r.status)
                .ok_or_else(|| Error::internal(format!("unknown listing status {}", r.status)))?,
            card_id: CardId::from_store(r.card_id),
            channel: ChannelSlug::from_store(r.channel),
            external_ref: r.external_ref,
            metadata: r.metadata,
            engaged_at: r.engaged_at,
            disengaged_at: r.disengaged_at,
        })
    }
}

/// A card's state: sold or not, and its listings.
#[derive(Debug, Clone)]
pub struct CardState {
    /// The card.
    pub card_id: CardId,
    /// The channel it sold on, if it did.
    pub sold_channel: Option<ChannelSlug>,
    /// When it sold.
    pub sold_at: Option<DateTime<Utc>>,
    /// Every channel it was ever engaged on.
    pub listings: Vec<Listing>,
}

/// What a sale lock needs to know of one card on the calling channel.
#[derive(Debug, Clone)]
pub struct CardOnChannel {
    /// The card.
    pub card_id: CardId,
    /// The channel it sold on, if it did.
    pub sold_channel: Option<ChannelSlug>,
    /// Whether it is live (an active listing) on the calling channel.
    pub live: bool,
}

impl PgStore {
    /// Whether `channel` is for sale (`None`: the registry does not have
    /// it), and each known card's state on it: one query, because a sale
    /// lock asks it before every acquire.
    pub async fn cards_on_channel(
        &self,
        workspace: &TenantId,
        channel: &ChannelSlug,
        cards: &[CardId],
    ) -> Result<Option<(bool, Vec<CardOnChannel>)>, Error> {
        let ids: Vec<&str> = cards.iter().map(CardId::as_str).collect();
        let rows: Vec<(bool, Option<String>, Option<String>, bool)> = sqlx::query_as(
            // The listing is read by its whole unique key and its status
            // compared after: with `status = 'active'` inside, the planner
            // may take the partial index of the channel's active listings
            // and walk every card live there (it did, under lock-complete).
            "SELECT ch.for_sale, c.card_id, c.sold_channel,
                    (SELECT l.status FROM card_channels l
                     WHERE l.workspace = $1 AND l.card_id = c.card_id AND l.channel = $3) IS NOT DISTINCT FROM 'active'
             FROM channels ch
             LEFT JOIN cards c ON c.workspace = $1 AND c.card_id = ANY($2)
             WHERE ch.workspace = $1 AND ch.slug = $3",
        )
        .bind(workspace.as_str())
        .bind(&ids)
        .bind(channel.as_str())
        .fetch_all(&self.pool)
        .await?;
        let Some(for_sale) = rows.first().map(|r| r.0) else {
            return Ok(None);
        };
        let known = rows
            .into_iter()
            .filter_map(|(_, card, sold, live)| {
                Some(CardOnChannel {
                    card_id: CardId::from_store(card?),
                    sold_channel: sold.map(ChannelSlug::from_store),
                    live,
                })
            })
            .collect();
        Ok(Some((for_sale, known)))
    }

    /// Seeds a workspace's registry and settings on first use; harmless
    /// afterwards (existing channels are never overwritten).
    pub async fn ensure_channels(&self, workspace: &TenantId) -> Result<(), Error> {
        self.ensure_tenant(workspace).await?;
        let mut tx = self.begin().await?;
        for (slug, name, exclusive, for_sale) in DEFAULT_CHANNELS {
            sqlx::query(
                "INSERT INTO channels (workspace, slug, name, exclusive, for_sale) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT DO NOTHING",
            )
            .bind(workspace.as_str())
            .bind(slug)
            .bind(name)
            .bind(exclusive)
            .bind(for_sale)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("INSERT INTO channel_settings (workspace) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(workspace.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The workspace's channels, by slug.
    pub async fn list_channels(&self, workspace: &TenantId) -> Result<Vec<Channel>, Error> {
        let rows: Vec<(String, String, bool, bool)> = sqlx::query_as(
            "SELECT slug, name, exclusive, for_sale FROM channels WHERE workspace = $1 ORDER BY slug",
        )
        .bind(workspace.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(slug, name, exclusive, for_sale)| Channel {
                slug: ChannelSlug::from_store(slug),
                name,
                exclusive,
                for_sale,
            })
            .collect())
    }

    /// One channel of the workspace's registry.
    pub async fn channel(
        &self,
        workspace: &TenantId,
        slug: &ChannelSlug,
    ) -> Result<Option<Channel>, Error> {
        let row: Option<(String, bool, bool)> = sqlx::query_as(
            "SELECT name, exclusive, for_sale FROM channels WHERE workspace = $1 AND slug = $2",
        )
        .bind(workspace.as_str())
        .bind(slug.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(name, exclusive, for_sale)| Channel {
            slug: slug.clone(),
            name,
            exclusive,
            for_sale,
        }))
    }

    /// Creates or renames a channel, or changes its exclusive flag.
    pub async fn put_channel(&self, workspace: &TenantId, c: &Channel) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO channels (workspace, slug, name, exclusive, for_sale) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (workspace, slug) DO UPDATE SET name = EXCLUDED.name, exclusive = EXCLUDED.exclusive",
        )
        .bind(workspace.as_str())
        .bind(c.slug.as_str())
        .bind(&c.name)
        .bind(c.exclusive)
        .bind(c.for_sale)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether non-exclusive channels may list one card together.
    pub async fn dual_listing(&self, workspace: &TenantId) -> Result<bool, Error> {
        let row: Option<(bool,)> =
            sqlx::query_as("SELECT dual_listing FROM channel_settings WHERE workspace = $1")
                .bind(workspace.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some_and(|(d,)| d))
    }

    /// Turns dual listing on or off. Turning it off does not delist
    /// anything: cards live on several channels show up in the conflicts.
    pub async fn set_dual_listing(&self, workspace: &TenantId, on: bool) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO channel_settings (workspace, dual_listing) VALUES ($1, $2)
             ON CONFLICT (workspace) DO UPDATE SET dual_listing = EXCLUDED.dual_listing, updated_at = now()",
        )
        .bind(workspace.as_str())
        .bind(on)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Sets a channel's satellite.
    pub async fn put_satellite(
        &self,
        workspace: &TenantId,
        channel: &ChannelSlug,
        base_url: &str,
        secret: &str,
        batch_size: i32,
    ) -> Result<Satellite, Error> {
        Ok(sqlx::query_as::<_, Satellite>(
            "INSERT INTO satellites (workspace, channel, base_url, secret, batch_size)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (workspace, channel) DO UPDATE
                 SET base_url = EXCLUDED.base_url, secret = EXCLUDED.secret,
                     batch_size = EXCLUDED.batch_size, updated_at = now()
             RETURNING workspace, channel, base_url, secret, batch_size, updated_at",
        )
        .bind(workspace.as_str())
        .bind(channel.as_str())
        .bind(base_url)
        .bind(secret)
        .bind(batch_size)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Satellites: of one workspace, or of every workspace (`None`), for the
    /// reconciler.
    pub async fn satellites(&self, workspace: Option<&TenantId>) -> Result<Vec<Satellite>, Error> {
        Ok(sqlx::query_as::<_, Satellite>(
            "SELECT workspace, channel, base_url, secret, batch_size, updated_at FROM satellites
             WHERE $1::text IS NULL OR workspace = $1 ORDER BY workspace, channel",
        )
        .bind(workspace.map(TenantId::as_str))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The cards among `cards` that the workspace does not know.
    pub async fn unknown_cards(
        &self,
        workspace: &TenantId,
        cards: &[CardId],
    ) -> Result<Vec<CardId>, Error> {
        let ids: Vec<&str> = cards.iter().map(CardId::as_str).collect();
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT c FROM unnest($2::text[]) AS c
             WHERE NOT EXISTS (SELECT 1 FROM cards WHERE workspace = $1 AND card_id = c)",
        )
        .bind(workspace.as_str())
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(c,)| CardId::from_store(c)).collect())
    }

    /// Cards' states, in the order asked; unknown cards are left out.
    pub async fn card_states(
        &self,
        workspace: &TenantId,
        cards: &[CardId],
    ) -> Result<Vec<CardState>, Error> {
        let ids: Vec<&str> = cards.iter().map(CardId::as_str).collect();
        let heads: Vec<(String, Option<String>, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT card_id, sold_channel, sold_at FROM cards WHERE workspace = $1 AND card_id = ANY($2)",
        )
        .bind(workspace.as_str())
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let rows: Vec<ListingRow> = sqlx::query_as(
            "SELECT card_id, channel, status, external_ref, metadata, engaged_at, disengaged_at
             FROM card_channels WHERE workspace = $1 AND card_id = ANY($2) ORDER BY channel",
        )
        .bind(workspace.as_str())
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut listings: Vec<Listing> = rows
            .into_iter()
            .map(Listing::try_from)
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(cards.len());
        for card in cards {
            let Some((_, sold, sold_at)) = heads.iter().find(|h| h.0 == card.as_str()) else {
                continue;
            };
            let (mine, rest): (Vec<Listing>, Vec<Listing>) =
                listings.into_iter().partition(|l| l.card_id == *card);
            listings = rest;
            out.push(CardState {
                card_id: card.clone(),
                sold_channel: sold.clone().map(ChannelSlug::from_store),
                sold_at: *sold_at,
                listings: mine,
            });
        }
        Ok(out)
    }

    /// Cards live on more channels than the rules allow now (after dual
    /// listing was turned off, or a channel was made exclusive), each with
    /// the channels it is live on; at most `limit`, by card id after `after`.
    pub async fn listing_conflicts(
        &self,
        workspace: &TenantId,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(CardId, Vec<ChannelSlug>)>, Error> {
        let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT cc.card_id, array_agg(cc.channel ORDER BY cc.channel)
             FROM card_channels cc
             JOIN channels ch ON ch.workspace = cc.workspace AND ch.slug = cc.channel
             LEFT JOIN channel_settings s ON s.workspace = cc.workspace
             WHERE cc.workspace = $1 AND cc.status = 'active' AND cc.card_id > $2
             GROUP BY cc.card_id
             HAVING count(*) > 1 AND (bool_or(ch.exclusive) OR NOT bool_or(coalesce(s.dual_listing, false)))
             ORDER BY cc.card_id
             LIMIT $3",
        )
        .bind(workspace.as_str())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(card, channels)| {
                (
                    CardId::from_store(card),
                    channels.into_iter().map(ChannelSlug::from_store).collect(),
                )
            })
            .collect())
    }
}

//! Channels and cards: where a unique item is live, and the rule that says
//! whether it may go live somewhere else too.
//!
//! A card is the pool `card/<card_id>` with capacity 1, so "one active lock
//! per card, whatever the channel" is the engine's own capacity rule. What
//! is here is the listing rule, checked when a card is engaged.

use std::fmt;

use super::{PoolId, parse_name};
use crate::error::Error;

/// Longest card id and channel slug.
pub const NAME_LEN: usize = 64;

/// The channel every card is on when it is live nowhere: not for sale.
pub const PERSONAL: &str = "personal";

/// The channels a workspace starts with: (slug, display name, exclusive,
/// for sale).
pub const DEFAULT_CHANNELS: &[(&str, &str, bool, bool)] = &[
    (PERSONAL, "Personal collection", false, false),
    ("thisorthat", "ThisOrThat", false, true),
    ("storefront", "Storefront", false, true),
    ("showcase", "Showcase Breaks", true, true),
    ("repack", "Repack Pack", true, true),
    ("ebay", "eBay", false, true),
    ("whatnot", "Whatnot", false, true),
];

/// A card's id, as the workspace names it: 1-64 of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardId(String);

impl CardId {
    /// Parses a card id; `field` names it in errors.
    pub fn parse(field: &str, value: &str) -> Result<Self, Error> {
        parse_name(field, value, NAME_LEN).map(Self)
    }

    /// Wraps a card id read back from our own stores.
    pub fn from_store(value: String) -> Self {
        Self(value)
    }

    /// The card's pool: capacity 1, so one lock or one sale at a time.
    pub fn pool(&self) -> PoolId {
        PoolId::from_parts(&["card", &self.0])
    }

    /// The card of a pool id `card/<card_id>`, if it is one.
    pub fn of_pool(pool: &str) -> Option<Self> {
        pool.strip_prefix("card/").map(|c| Self(c.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A channel's slug: 1-64 of `[a-z0-9_-]` (slugs appear in URLs and logs,
/// so they are lower case).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelSlug(String);

impl ChannelSlug {
    /// Parses a slug; `field` names it in errors.
    pub fn parse(field: &str, value: &str) -> Result<Self, Error> {
        let value = parse_name(field, value, NAME_LEN)?;
        if value
            .chars()
            .any(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'))
        {
            return Err(Error::invalid(field, "may contain only a-z 0-9 _ -"));
        }
        Ok(Self(value))
    }

    /// Wraps a slug read back from our own stores.
    pub fn from_store(value: String) -> Self {
        Self(value)
    }

    /// The slug as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A channel of a workspace's registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Its slug.
    pub slug: ChannelSlug,
    /// Its display name.
    pub name: String,
    /// A card live here may be live nowhere else.
    pub exclusive: bool,
    /// False for the personal collection: cards are not engaged there.
    pub for_sale: bool,
}

/// Where a card stands on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingStatus {
    /// Live: buyers on that channel can see and buy it.
    Active,
    /// Pulled back (delisted, sold elsewhere, or cleared by reconcile).
    Inactive,
    /// Sold on this channel.
    Sold,
}

impl ListingStatus {
    /// The name stored in Postgres.
    pub fn as_str(self) -> &'static str {
        match self {
            ListingStatus::Active => "active",
            ListingStatus::Inactive => "inactive",
            ListingStatus::Sold => "sold",
        }
    }

    /// Parses a stored name.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "active" => Some(ListingStatus::Active),
            "inactive" => Some(ListingStatus::Inactive),
            "sold" => Some(ListingStatus::Sold),
            _ => None,
        }
    }
}

/// Why a card may not be engaged on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngageConflict {
    /// The card is sold (on this channel).
    Sold(ChannelSlug),
    /// The card is live on an exclusive channel, or the target is
    /// exclusive and the card is live elsewhere (this channel).
    Exclusive(ChannelSlug),
    /// The card is live on another channel and the workspace does not
    /// allow dual listing (this channel).
    DualListingOff(ChannelSlug),
}

/// The listing rule: may a card that is live on `live` (each with its
/// exclusive flag) go live on `target` too? Being live on `target` already
/// is no conflict (engage is idempotent).
pub fn engage_rule(
    target: &Channel,
    live: &[(ChannelSlug, bool)],
    sold_on: Option<&ChannelSlug>,
    dual_listing: bool,
) -> Result<(), EngageConflict> {
    if let Some(channel) = sold_on {
        return Err(EngageConflict::Sold(channel.clone()));
    }
    for (channel, exclusive) in live.iter().filter(|(c, _)| *c != target.slug) {
        if *exclusive || target.exclusive {
            return Err(EngageConflict::Exclusive(channel.clone()));
        }
        if !dual_listing {
            return Err(EngageConflict::DualListingOff(channel.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(slug: &str, exclusive: bool) -> Channel {
        Channel {
            slug: ChannelSlug::parse("c", slug).unwrap(),
            name: slug.into(),
            exclusive,
            for_sale: true,
        }
    }

    fn live(slug: &str, exclusive: bool) -> (ChannelSlug, bool) {
        (ChannelSlug::parse("c", slug).unwrap(), exclusive)
    }

    #[test]
    fn a_card_live_nowhere_may_go_anywhere() {
        assert!(engage_rule(&channel("showcase", true), &[], None, false).is_ok());
    }

    #[test]
    fn a_card_live_on_the_same_channel_is_no_conflict() {
        let tot = channel("thisorthat", false);
        assert!(engage_rule(&tot, &[live("thisorthat", false)], None, false).is_ok());
    }

    #[test]
    fn without_dual_listing_a_card_is_live_on_one_channel() {
        let tot = channel("thisorthat", false);
        assert_eq!(
            engage_rule(&tot, &[live("storefront", false)], None, false),
            Err(EngageConflict::DualListingOff(
                ChannelSlug::parse("c", "storefront").unwrap()
            ))
        );
        assert!(engage_rule(&tot, &[live("storefront", false)], None, true).is_ok());
    }

    #[test]
    fn exclusive_channels_refuse_company_even_with_dual_listing() {
        let tot = channel("thisorthat", false);
        assert!(matches!(
            engage_rule(&tot, &[live("showcase", true)], None, true),
            Err(EngageConflict::Exclusive(_))
        ));
        let repack = channel("repack", true);
        assert!(matches!(
            engage_rule(&repack, &[live("ebay", false)], None, true),
            Err(EngageConflict::Exclusive(_))
        ));
    }

    #[test]
    fn a_sold_card_goes_nowhere() {
        let sold_on = ChannelSlug::parse("c", "ebay").unwrap();
        assert!(matches!(
            engage_rule(&channel("ebay", false), &[], Some(&sold_on), true),
            Err(EngageConflict::Sold(_))
        ));
    }

    #[test]
    fn slugs_are_lower_case_and_card_ids_are_key_safe() {
        assert!(ChannelSlug::parse("c", "eBay").is_err());
        assert!(CardId::parse("c", "card:1").is_err());
        assert_eq!(
            CardId::parse("c", "1234").unwrap().pool().as_str(),
            "card/1234"
        );
        assert_eq!(
            CardId::of_pool("card/1234").map(|c| c.to_string()),
            Some("1234".into())
        );
    }
}

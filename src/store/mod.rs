//! The stores: Redis, the fast path that answers every hot call, and
//! Postgres, the system of record (and the fallback while Redis is down).

pub(crate) mod coalesce;
pub mod postgres;
pub mod redis;

use crate::domain::{Hold, PoolId, Shortage};

/// What a store answered about a hold: the Redis scripts and the Postgres
/// fallback speak the same language, so the engine settles both alike.
#[derive(Debug)]
pub enum HoldReply {
    /// The hold as it now stands (taken, committed, released, extended, or
    /// a repeat of the first answer).
    Hold(Hold),
    /// These pools have no grant here yet, or need more.
    NeedGrant(Vec<PoolId>),
    /// The pool's sale window is not open.
    NotActive(PoolId),
    /// Sold out: every short line.
    Short(Vec<Shortage>),
    /// Over the customer's limit; the units they already have.
    CustomerLimit(i64),
    /// The id was used before with a different request.
    IdReused,
    /// No such hold (or not one of this job's).
    NoHold,
    /// The hold is released or expired.
    NotActiveHold(Hold),
    /// The hold was consumed by a different order.
    OrderMismatch(Hold),
    /// The hold was committed, so it cannot be released.
    Committed(Hold),
    /// The hold may not be extended again.
    ExtendLimit(Hold),
    /// A pool of the hold was reloaded after Redis lost data.
    StaleEpoch(PoolId),
    /// The tenant already has this many active holds, its limit.
    TooManyHolds(i64),
    /// Refused, but expired holds still waiting to be finalised might have
    /// freed what was missing: sweep, then ask again.
    Busy,
    /// A sale lock's card is not mirrored live on its channel; nothing
    /// changed (ask Postgres).
    Unlisted,
    /// A sale lock's id already names a lock; the lock as it stands.
    Again(Hold),
}

//! Events: what the scripts append to a tenant's stream, in the same
//! atomic step as the change they describe.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One line of an event: a pool, the units, and the Redis epoch they were
/// taken in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLine {
    /// The pool.
    pub pool: String,
    /// The units.
    pub qty: i64,
    /// The epoch.
    pub epoch: i64,
}

/// One engine event, as the scripts append it to the tenant's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The stream entry id: unique per tenant, the key of exactly-once.
    pub event_id: String,
    /// What happened: reserved, claimed, committed, released, expired,
    /// extended.
    pub kind: String,
    /// Which job: flash, stock, lock, slot.
    pub job: String,
    /// The hold (or claim) id.
    pub hold_id: String,
    /// The pools and units.
    pub lines: Vec<EventLine>,
    /// The caller's reference.
    pub reference: String,
    /// The order id, for commits.
    pub order_id: String,
    /// The customer counter, if any.
    pub customer: String,
    /// When it happened (Redis time).
    pub at: DateTime<Utc>,
}

impl Event {
    /// True for the events that sell units.
    pub fn sells(&self) -> bool {
        matches!(self.kind.as_str(), "claimed" | "committed")
    }

    /// True for the events that take units under a new hold id: the ones
    /// the fallback may have served too (a twin).
    pub fn is_take(&self) -> bool {
        matches!(self.kind.as_str(), "reserved" | "claimed")
    }
}

/// A stream entry id, `<ms>-<seq>`: ordered, unique per tenant.
pub fn parse_event_id(value: &str) -> Option<(u64, u64)> {
    let (ms, seq) = value.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_parse_and_order_numerically() {
        assert_eq!(
            parse_event_id("1700000000000-12"),
            Some((1_700_000_000_000, 12))
        );
        assert!(parse_event_id("17-2") < parse_event_id("17-10"));
        assert_eq!(parse_event_id("x-1"), None);
        assert_eq!(parse_event_id("12"), None);
    }
}

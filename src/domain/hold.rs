//! Holds and their outcomes.

use std::collections::HashSet;

use super::{HoldId, PoolId, Quantity};
use crate::error::Error;

/// Which of holdfast's jobs made a hold: kept in events and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Flash-sale claims and cart holds.
    Flash,
    /// Stock reservations.
    Stock,
    /// Sale locks on unique items.
    Lock,
    /// Time-window slots.
    Slot,
}

impl Job {
    /// Parses a job's name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "flash" => Some(Job::Flash),
            "stock" => Some(Job::Stock),
            "lock" => Some(Job::Lock),
            "slot" => Some(Job::Slot),
            _ => None,
        }
    }

    /// The name used in Redis, events and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Job::Flash => "flash",
            Job::Stock => "stock",
            Job::Lock => "lock",
            Job::Slot => "slot",
        }
    }
}

/// One pool and the units to take from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The pool.
    pub pool: PoolId,
    /// How many units.
    pub quantity: Quantity,
}

/// A validated batch: 1 to `max_batch` lines, no pool twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lines(Vec<Line>);

impl Lines {
    /// Checks a batch. `field` names the repeated field in errors; a
    /// duplicate is reported at its index.
    pub fn parse(field: &str, lines: Vec<Line>, max_batch: usize) -> Result<Self, Error> {
        super::check_batch(field, lines.len(), max_batch, "line")?;
        let mut seen = HashSet::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            if !seen.insert(&line.pool) {
                return Err(Error::invalid(
                    format!("{field}[{i}]"),
                    format!("{} appears twice in the batch", line.pool),
                ));
            }
        }
        Ok(Self(lines))
    }

    /// The lines.
    pub fn as_slice(&self) -> &[Line] {
        &self.0
    }

    /// Total units over the batch; cannot overflow (bounded lines and batch).
    pub fn total(&self) -> i64 {
        self.0.iter().map(|l| l.quantity.get()).sum()
    }
}

/// Where a hold is in its life. A hold ends exactly one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    /// Holding units until it expires.
    Active,
    /// Sold.
    Committed,
    /// Given back by hand.
    Released,
    /// Ran out of time.
    Expired,
}

/// A hold as the store last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The hold's id.
    pub id: HoldId,
    /// Where it is in its life.
    pub state: HoldState,
    /// The job that made it.
    pub job: String,
    /// The pools and units it took.
    pub lines: Vec<(PoolId, i64)>,
    /// When it stops holding (ms since the epoch, Redis time).
    pub expires_at_ms: i64,
    /// How many times it was extended.
    pub extensions: u32,
    /// The caller's reference (cart, session), or empty.
    pub reference: String,
    /// The order that consumed it, or empty.
    pub order_id: String,
    /// When it was made (ms).
    pub created_at_ms: i64,
    /// When it was committed, released or expired (ms), or 0.
    pub finished_at_ms: i64,
    /// Its fencing token: drawn from a per-tenant counter when the hold was
    /// made, so a later hold always has a larger one (0 for claims).
    pub fence: i64,
}

/// A line that could not be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    /// The pool that is short.
    pub pool: PoolId,
    /// What was asked for.
    pub requested: i64,
    /// What it had.
    pub available: i64,
}

/// The business answer to a reserve or claim. None of these is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOutcome {
    /// The units were taken; the hold (COMMITTED for a claim).
    Taken(Hold),
    /// Some lines lack units; all of them, with what they had.
    SoldOut(Vec<Shortage>),
    /// The pool's sale window is not open.
    NotActive(PoolId),
    /// The customer would go over the limit; the units they already have.
    CustomerLimit(i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(pool: &str, q: i64) -> Line {
        Line {
            pool: PoolId::from_parts(&[pool]),
            quantity: Quantity::parse("q", q, 100).unwrap(),
        }
    }

    #[test]
    fn an_empty_batch_is_refused() {
        assert!(Lines::parse("lines", vec![], 10).is_err());
    }

    #[test]
    fn a_pool_twice_in_one_batch_is_refused_at_its_index() {
        let err =
            Lines::parse("lines", vec![line("a", 1), line("b", 1), line("a", 2)], 10).unwrap_err();
        assert!(err.to_string().starts_with("lines[2]"), "{err}");
    }

    #[test]
    fn an_oversized_batch_is_refused() {
        let lines = (0..11).map(|i| line(&format!("p{i}"), 1)).collect();
        assert!(Lines::parse("lines", lines, 10).is_err());
    }

    #[test]
    fn total_adds_every_line() {
        let lines = Lines::parse("lines", vec![line("a", 3), line("b", 4)], 10).unwrap();
        assert_eq!(lines.total(), 7);
    }
}

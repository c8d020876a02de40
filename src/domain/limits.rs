//! The server's input limits, enforced when a request is parsed, before any
//! store is touched.

use std::time::Duration;

use crate::error::Error;

/// Bounds on what one request may ask for. Configured by flags (see
/// `config.rs`); the defaults suit a shop's checkout.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most lines (or products) in one batch.
    pub max_batch: usize,
    /// Largest quantity of one line.
    pub max_quantity: i64,
    /// Longest client-chosen id (hold, claim, order, extension ids).
    pub max_id_len: usize,
    /// Shortest hold time to live a caller may ask for.
    pub min_ttl: Duration,
    /// Longest hold time to live a caller may ask for.
    pub max_ttl: Duration,
    /// Time to live of a hold when the caller gives none.
    pub default_ttl: Duration,
    /// How many times a hold may be extended.
    pub max_extensions: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 500,
            max_quantity: 1_000_000,
            max_id_len: 128,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(24 * 3600),
            default_ttl: Duration::from_secs(15 * 60),
            max_extensions: 1,
        }
    }
}

/// Checks a batch's size: 1 to `max` items (each an `item`, as named in
/// the error). Done before the items are parsed, so a batch too big is
/// refused before any work is spent on it.
pub fn check_batch(field: &str, len: usize, max: usize, item: &str) -> Result<(), Error> {
    if len == 0 {
        return Err(Error::invalid(
            field,
            format!("must have at least one {item}"),
        ));
    }
    if len > max {
        return Err(Error::invalid(
            field,
            format!("must have at most {max} {item}s, got {len}"),
        ));
    }
    Ok(())
}

//! How much of a pool one grant moves to Redis ([`GrantPolicy`]), and the
//! last grant of each pool that sizes the next ([`LastGrants`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::domain::{PoolId, TenantId};

/// How much of a pool Redis is granted at a time. Redis gets
/// `min(limit, ceil(fraction x what Postgres has left))` (and at least what
/// a take needs), so Postgres always keeps a share to sell from while Redis
/// is down. A refill is asked for before Redis runs dry: when its headroom
/// falls to half a grant, a script flags the pool for the refiller.
///
/// The limit is `chunk` for a pool that sells slowly, and grows for one
/// that sells fast ([`GrantPolicy::limit`]): a grant is meant to last
/// about a second (`PACE`) at the pool's recent rate. With a fixed chunk of 1,000
/// a flash sale selling 15,000 units a second ran through half a chunk
/// in 33 ms, faster than the refiller looks (every 50 ms), so claims
/// waited for grants on the hot path: claim-hot's p99 was 29-37 ms
/// against 9 ms with grants too big to run out (deploy/BENCHMARKS.md,
/// 2026-12-04, "paced grants"). What Redis holds when it is lost goes in
/// doubt, so `max_chunk` bounds that too.
#[derive(Debug, Clone, Copy)]
pub struct GrantPolicy {
    /// Share of what Postgres has left that one grant moves to Redis.
    pub fraction: f64,
    /// Most units one grant moves to a pool that sells slowly.
    pub chunk: i64,
    /// Most units one grant moves to a pool that sells fast.
    pub max_chunk: i64,
}

/// How long one grant is meant to last at its pool's recent rate of sale.
const PACE: Duration = Duration::from_secs(1);
/// The most one grant's limit grows over the last grant's size: a pool
/// that needed two grants in a moment (a large take just after a small
/// grant) does not jump to `max_chunk` at once.
const GROWTH: i64 = 4;
/// Last grants older than this are forgotten (a pool sold this slowly is
/// back at `chunk`).
const FORGET: Duration = Duration::from_secs(60);

impl Default for GrantPolicy {
    fn default() -> Self {
        Self {
            fraction: 0.5,
            chunk: 1000,
            max_chunk: 100_000,
        }
    }
}

impl GrantPolicy {
    /// Units to grant out of `undelegated` under `limit`, at least `needed`.
    pub fn size(&self, limit: i64, undelegated: i64, needed: i64) -> i64 {
        let share = ((undelegated as f64) * self.fraction).ceil() as i64;
        share.min(limit).max(needed).max(1).min(undelegated)
    }

    /// Headroom at or below which Redis asks for more, given what Postgres
    /// still has to give and the grant limit.
    pub fn low_water(&self, limit: i64, undelegated: i64) -> i64 {
        if undelegated <= 0 {
            0
        } else {
            (self.size(limit, undelegated, 0) / 2).max(1)
        }
    }

    /// The most a pool's next grant moves, given its last grant (`units`
    /// granted, `ago`): what the pool sold in the last grant's time, scaled
    /// to `PACE`, at most `GROWTH` times the last grant, and between
    /// `chunk` and `max_chunk`. A grant is asked for when half the last one
    /// is left, so `units / ago` is about the rate the pool sells at.
    pub fn limit(&self, last: Option<(i64, Duration)>) -> i64 {
        let Some((units, ago)) = last else {
            return self.chunk;
        };
        let ago = ago.max(Duration::from_millis(1)).as_secs_f64();
        let at_rate = (units as f64 * PACE.as_secs_f64() / ago).ceil() as i64;
        at_rate
            .min(units.saturating_mul(GROWTH))
            .min(self.max_chunk)
            .max(self.chunk)
    }
}

/// A pool's last grant, which sizes its next one.
#[derive(Debug, Clone, Copy)]
pub(super) struct LastGrant {
    pub(super) epoch: i64,
    pub(super) units: i64,
    pub(super) at: Instant,
}

/// The last grant of each pool this daemon granted, by tenant and pool.
///
/// Grants older than [`FORGET`] are dropped when the map has grown to
/// `prune_at` entries, and `prune_at` then moves to twice what is left, so
/// a scan costs each grant O(1) however many pools sell at once. With a
/// fixed bound, a daemon granting to more pools than that within a minute
/// scanned the whole map (a clock read an entry) on every grant: ~300 µs a
/// grant past 10,000 pools (claim-10k has 10,002), a third of the daemon's
/// CPU while it reloaded them after Redis lost its data.
#[derive(Debug)]
pub(super) struct LastGrants {
    map: HashMap<(TenantId, PoolId), LastGrant>,
    prune_at: usize,
}

/// The fewest entries [`LastGrants`] prunes at.
const PRUNE_FROM: usize = 10_000;

impl Default for LastGrants {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            prune_at: PRUNE_FROM,
        }
    }
}

impl LastGrants {
    pub(super) fn get(&self, tenant: &TenantId, pool: &PoolId) -> Option<LastGrant> {
        self.map.get(&(tenant.clone(), pool.clone())).copied()
    }

    pub(super) fn insert(&mut self, tenant: &TenantId, pool: &PoolId, grant: LastGrant) {
        if self.map.len() >= self.prune_at {
            let now = grant.at;
            self.map
                .retain(|_, l| now.saturating_duration_since(l.at) < FORGET);
            self.prune_at = (self.map.len() * 2).max(PRUNE_FROM);
        }
        self.map.insert((tenant.clone(), pool.clone()), grant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_leaves_postgres_a_share_and_covers_what_a_take_needs() {
        let p = GrantPolicy::default();
        assert_eq!(p.size(1000, 100, 0), 50);
        assert_eq!(p.size(1000, 100_000, 0), 1000, "grants are bounded");
        assert_eq!(p.size(1000, 1, 0), 1, "a card is granted on demand");
        assert_eq!(p.size(1000, 10, 8), 8, "a take gets what it needs");
        assert_eq!(p.size(1000, 3, 8), 3, "never more than is left");
        assert_eq!(p.low_water(1000, 0), 0);
        assert_eq!(p.low_water(1000, 100_000), 500);
        assert_eq!(p.low_water(16_000, 100_000), 8_000);
    }

    #[test]
    fn a_pool_that_sells_fast_is_granted_a_paces_worth_at_a_time() {
        let p = GrantPolicy::default();
        let ms = Duration::from_millis;
        assert_eq!(p.limit(None), 1000, "a first grant is a chunk");
        // 1,000 units gone in 50 ms is 20,000 a second: four times the
        // last grant at most, then what a second of sales takes.
        assert_eq!(p.limit(Some((1000, ms(50)))), 4000);
        assert_eq!(p.limit(Some((4000, ms(250)))), 16_000);
        assert_eq!(p.limit(Some((16_000, ms(800)))), 20_000);
        // Never past max_chunk, never under chunk.
        assert_eq!(p.limit(Some((90_000, ms(100)))), 100_000);
        assert_eq!(p.limit(Some((1000, ms(0)))), 4000);
        assert_eq!(p.limit(Some((20_000, Duration::from_secs(40)))), 1000);
        // A pool that slowed down shrinks back.
        assert_eq!(p.limit(Some((20_000, Duration::from_secs(4)))), 5000);
    }

    #[test]
    fn last_grants_forget_old_ones_and_do_not_scan_on_every_grant() {
        let tenant = TenantId::parse("t").unwrap();
        let pool = |i: usize| PoolId::from_store(format!("stock/p{i}"));
        let now = Instant::now();
        let at = |secs_ago: u64| LastGrant {
            epoch: 1,
            units: 1,
            at: now - Duration::from_secs(secs_ago),
        };
        let mut last = LastGrants::default();
        for i in 0..PRUNE_FROM {
            last.insert(&tenant, &pool(i), at(FORGET.as_secs() + 1));
        }
        last.insert(&tenant, &pool(PRUNE_FROM), at(0));
        assert_eq!(last.map.len(), 1, "the old ones were forgotten");
        assert!(last.get(&tenant, &pool(PRUNE_FROM)).is_some());

        // As many recent ones as the bound: all kept, and the next scan
        // waits until the map has doubled.
        for i in 0..PRUNE_FROM {
            last.insert(&tenant, &pool(i), at(0));
        }
        last.insert(&tenant, &pool(PRUNE_FROM + 1), at(0));
        assert_eq!(last.map.len(), PRUNE_FROM + 2);
        assert_eq!(last.prune_at, 2 * PRUNE_FROM, "pruned once, at the bound");
    }
}

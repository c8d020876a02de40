//! Sets of take ids a daemon remembers about the fallback, for the one
//! case where an answer depends on which store saw an id first.
//!
//! - **Unanswered:** ids whose Redis call failed since the circuit last
//!   closed. Such a call may have run in Redis before its answer was lost,
//!   and while the circuit is open a retry of it goes to the fallback
//!   alone, which knows nothing of what Redis did. So the fallback may take
//!   for such an id (the drainer keeps one of the twins) but not refuse it:
//!   the engine answers UNAVAILABLE instead, until the circuit closes and
//!   Redis, which remembers every id it served, answers the retry itself.
//! - **Served by the fallback:** ids the fallback took for. Redis knows
//!   nothing of them, so once it is back it would refuse the retry of one
//!   (sold out) though it succeeded, or take again, making a second hold
//!   under the id: the retry of such an id is answered by the fallback
//!   (`Engine::take`).
//!
//! Kept per daemon: a retry that reaches another daemon is not covered
//! (the drainer settles the twins it makes). An id is remembered for
//! [`KEEP`] to [`KEEP`] × 2, by whole generations, so that once the ids of
//! an outage are forgotten the sets are empty again and cost a take one
//! atomic load.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::domain::{HoldId, TenantId};

/// How long a generation of ids lasts: retries come within seconds or
/// minutes of their first call.
const KEEP: Duration = Duration::from_secs(600);

/// Ids remembered at most; past it the set starts a new generation (a
/// flood of calls in one outage, far beyond what clients retry).
const MAX_IDS: usize = 100_000;

/// A set of (tenant, id), cheap to ask while empty. See the module
/// documentation.
pub(super) struct IdSet {
    /// Whether `ids` may hold anything: read on every take, so the lock is
    /// taken only from an outage until its ids are forgotten.
    any: AtomicBool,
    ids: Mutex<Generations>,
    /// How long a generation lasts ([`KEEP`]).
    keep: Duration,
}

impl Default for IdSet {
    fn default() -> Self {
        Self {
            any: AtomicBool::new(false),
            ids: Mutex::default(),
            keep: KEEP,
        }
    }
}

/// The ids noted since `since`, and the generation before.
#[derive(Default)]
struct Generations {
    current: HashMap<TenantId, HashSet<HoldId>>,
    previous: HashMap<TenantId, HashSet<HoldId>>,
    count: usize,
    since: Option<Instant>,
}

impl Generations {
    /// Starts a new generation when the current one is `keep` old or full;
    /// returns whether any id is left.
    fn age(&mut self, keep: Duration) -> bool {
        if self.count >= MAX_IDS || self.since.is_some_and(|at| at.elapsed() >= keep) {
            self.previous = std::mem::take(&mut self.current);
            self.count = 0;
            self.since = (!self.previous.is_empty()).then(Instant::now);
        }
        !(self.current.is_empty() && self.previous.is_empty())
    }

    fn contains(&self, tenant: &TenantId, id: &HoldId) -> bool {
        [&self.current, &self.previous]
            .iter()
            .any(|g| g.get(tenant).is_some_and(|ids| ids.contains(id)))
    }
}

impl IdSet {
    /// Notes `id`.
    pub(super) fn note(&self, tenant: &TenantId, id: &HoldId) {
        // A poisoned lock only means a panic elsewhere mid-insert; the set
        // is still usable.
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.age(self.keep);
        if ids
            .current
            .entry(tenant.clone())
            .or_default()
            .insert(id.clone())
        {
            ids.count += 1;
        }
        ids.since.get_or_insert_with(Instant::now);
        self.any.store(true, Ordering::Release);
    }

    /// Whether `id` was noted (and not forgotten since).
    pub(super) fn contains(&self, tenant: &TenantId, id: &HoldId) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if !ids.age(self.keep) {
            // Under the lock, as `note` sets the flag.
            self.any.store(false, Ordering::Release);
            return false;
        }
        ids.contains(tenant, id)
    }

    /// Forgets every id.
    pub(super) fn forget_all(&self) {
        if self.any.load(Ordering::Acquire) {
            // Under the lock, as `note` sets the flag, so no id noted
            // meanwhile is cleared with the flag left up or down wrongly.
            let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            *ids = Generations::default();
            self.any.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_kept_for_a_generation_or_two_and_then_forgotten() {
        let keep = Duration::from_millis(50);
        let set = IdSet {
            keep,
            ..IdSet::default()
        };
        let (t, id) = (
            TenantId::parse("t").unwrap(),
            HoldId::from_store("a".into()),
        );
        let other = HoldId::from_store("b".into());
        assert!(!set.contains(&t, &id));
        set.note(&t, &id);
        assert!(set.contains(&t, &id));
        assert!(!set.contains(&t, &other));
        assert!(!set.contains(&TenantId::parse("u").unwrap(), &id));
        // One generation on, it is still known; two on, forgotten, and the
        // set is empty again (no lock taken).
        std::thread::sleep(keep);
        assert!(set.contains(&t, &id));
        std::thread::sleep(keep);
        assert!(!set.contains(&t, &id));
        assert!(!set.any.load(Ordering::Acquire));
    }
}

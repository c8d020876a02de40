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
//!   (sold out) though it succeeded: a refusal from Redis of such an id is
//!   looked up in the fallback first.
//!
//! Kept per daemon: a retry that reaches another daemon is not covered.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::domain::{HoldId, TenantId};

/// Ids remembered at most; past it the set starts over (a flood of calls
/// in one outage, far beyond what clients retry).
const MAX_IDS: usize = 100_000;

/// A set of (tenant, id), cheap to ask while empty. See the module
/// documentation.
#[derive(Default)]
pub(super) struct IdSet {
    /// Whether `ids` may hold anything: read on every take, so the lock is
    /// taken only in an outage.
    any: AtomicBool,
    ids: Mutex<HashSet<(TenantId, HoldId)>>,
}

impl IdSet {
    /// Notes `id`.
    pub(super) fn note(&self, tenant: &TenantId, id: &HoldId) {
        // A poisoned lock only means a panic elsewhere mid-insert; the set
        // is still usable.
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.len() >= MAX_IDS {
            ids.clear();
        }
        ids.insert((tenant.clone(), id.clone()));
        self.any.store(true, Ordering::Release);
    }

    /// Whether `id` was noted (and not forgotten since).
    pub(super) fn contains(&self, tenant: &TenantId, id: &HoldId) -> bool {
        self.any.load(Ordering::Acquire)
            && self
                .ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&(tenant.clone(), id.clone()))
    }

    /// Forgets every id.
    pub(super) fn forget_all(&self) {
        if self.any.load(Ordering::Acquire) {
            // Under the lock, as `note` sets the flag, so no id noted
            // meanwhile is cleared with the flag left up or down wrongly.
            let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            ids.clear();
            self.any.store(false, Ordering::Release);
        }
    }
}

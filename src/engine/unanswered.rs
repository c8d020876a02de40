//! The take ids whose Redis call failed since the circuit last closed.
//!
//! Such a call may have run in Redis before its answer was lost, and while
//! the circuit is open a retry of it goes to the fallback alone, which
//! knows nothing of what Redis did. So the fallback may take for such an
//! id (the drainer keeps one of the twins) but not refuse it: the engine
//! answers UNAVAILABLE instead, until the circuit closes and Redis, which
//! remembers every id it served, answers the retry itself.
//!
//! Kept per daemon: a retry that reaches another daemon while the circuit
//! there is open is not covered.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::domain::{HoldId, TenantId};

/// Ids remembered at most; past it the set starts over (a flood of failed
/// calls in one outage, far beyond what clients retry).
const MAX_IDS: usize = 100_000;

/// See the module documentation.
#[derive(Default)]
pub(super) struct Unanswered {
    /// Whether `ids` may hold anything: read on every take, so the lock is
    /// taken only in an outage.
    any: AtomicBool,
    ids: Mutex<HashSet<(TenantId, HoldId)>>,
}

impl Unanswered {
    /// Notes that Redis did not answer a take of `id`.
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

    /// Whether Redis did not answer a take of `id` since the circuit last
    /// closed.
    pub(super) fn contains(&self, tenant: &TenantId, id: &HoldId) -> bool {
        self.any.load(Ordering::Acquire)
            && self
                .ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&(tenant.clone(), id.clone()))
    }

    /// Forgets every id: the circuit is closed, and Redis answers retries.
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

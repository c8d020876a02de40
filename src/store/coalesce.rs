//! What the two coalescers share (Redis's `redis/batch.rs`, the Postgres
//! fallback's `postgres/take_queue.rs`): requests wait in one queue while
//! the store is busy, and each call to the store takes the oldest one with
//! every other waiting request of the same tenant, in arrival order. No
//! timer is involved: a lone request goes at once, and the busier the
//! store, the bigger the batches.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use crate::domain::TenantId;

/// A queued request: whose it is decides which batch it may join.
pub trait Tenanted {
    /// The tenant the request belongs to.
    fn tenant(&self) -> &TenantId;
}

/// Waits for at least one request (`None` when every sender is gone),
/// gathers what else has arrived, and returns the next batch: the oldest
/// request and, in order, up to `max` - 1 more of its tenant. The others
/// keep their places in `waiting`.
pub async fn next_batch<T: Tenanted>(
    rx: &mut mpsc::Receiver<T>,
    waiting: &mut VecDeque<T>,
    max: usize,
) -> Option<Vec<T>> {
    if waiting.is_empty() {
        waiting.push_back(rx.recv().await?);
    }
    while waiting.len() < max * 4 {
        match rx.try_recv() {
            Ok(q) => waiting.push_back(q),
            Err(_) => break,
        }
    }
    Some(take_batch(waiting, max))
}

/// The oldest waiting request and, in order, up to `max` - 1 more of the
/// same tenant; the others keep their places.
pub fn take_batch<T: Tenanted>(waiting: &mut VecDeque<T>, max: usize) -> Vec<T> {
    let tenant = waiting.front().map(|q| q.tenant().clone());
    let mut batch = Vec::new();
    let mut rest = VecDeque::with_capacity(waiting.len());
    for q in waiting.drain(..) {
        if batch.len() < max && Some(q.tenant()) == tenant.as_ref() {
            batch.push(q);
        } else {
            rest.push_back(q);
        }
    }
    *waiting = rest;
    batch
}

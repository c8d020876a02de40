//! What the two coalescers share (Redis's `redis/batch.rs`, the Postgres
//! fallback's `postgres/take_queue.rs`): requests wait in one queue while
//! the store is busy, and each call to the store takes the oldest one with
//! every other waiting request of the same tenant, in arrival order. No
//! timer is involved: a lone request goes at once, and the busier the
//! store, the bigger the batches.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use crate::domain::TenantId;

/// A queued request: whose it is decides which batch it may join.
pub trait Tenanted {
    /// The tenant the request belongs to.
    fn tenant(&self) -> &TenantId;
}

/// Runs a coalescer until every sender is gone: batches of up to `max`
/// requests, each handed to `send` on a task of its own, at most
/// `in_flight` at once. A batch's slot is freed only when `send` has
/// finished, so whatever `send` records before it returns (a store that
/// did not answer) is seen by the batch that takes the slot next.
pub async fn serve<T, F, Fut>(mut rx: mpsc::Receiver<T>, in_flight: usize, max: usize, send: F)
where
    T: Tenanted,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut waiting = VecDeque::new();
    loop {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let Some(batch) = next_batch(&mut rx, &mut waiting, max).await else {
            return;
        };
        let sent = send(batch);
        tokio::spawn(async move {
            sent.await;
            drop(slot);
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request: its tenant and a name to follow it by.
    struct Request(TenantId, &'static str);

    impl Tenanted for Request {
        fn tenant(&self) -> &TenantId {
            &self.0
        }
    }

    fn queue(requests: &[(&str, &'static str)]) -> VecDeque<Request> {
        let tenant = |t: &str| TenantId::parse(t).expect("a valid tenant id");
        requests
            .iter()
            .map(|(t, n)| Request(tenant(t), n))
            .collect()
    }

    #[test]
    fn a_batch_takes_the_oldest_tenants_requests_in_order_and_leaves_the_rest_queued() {
        let mut waiting = queue(&[
            ("a", "claim"),
            ("b", "commit"),
            ("a", "release"),
            ("b", "extend"),
            ("a", "get_hold"),
        ]);
        let batch: Vec<_> = take_batch(&mut waiting, 10).iter().map(|r| r.1).collect();
        assert_eq!(batch, ["claim", "release", "get_hold"]);
        let rest: Vec<_> = waiting.iter().map(|r| (r.0.as_str(), r.1)).collect();
        assert_eq!(rest, [("b", "commit"), ("b", "extend")]);
    }

    #[test]
    fn a_batch_never_holds_more_than_max() {
        let mut waiting = queue(&[("a", "get_hold"); 8]);
        assert_eq!(take_batch(&mut waiting, 5).len(), 5);
        assert_eq!(waiting.len(), 3);
    }
}

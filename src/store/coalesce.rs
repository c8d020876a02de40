//! What the coalescers share (Redis's `redis/batch.rs`, the Postgres
//! fallback's `postgres/take_queue.rs`, the engine's pool reads in
//! `engine/reads.rs`): requests wait in one queue while the store is busy,
//! and each call to the store takes the oldest one with every other
//! waiting request of the same tenant, in arrival order. No timer is
//! involved: a lone request goes at once, and the busier the store, the
//! bigger the batches.
//!
//! How many calls may be on their way is bounded twice ([`InFlight`]): in
//! all, and for one tenant. A tenant's requests gather while its calls are
//! out, which is what makes its batches big; other tenants' calls need
//! not wait for those, since their requests could never have joined them.
//!
//! Past the store's peak, requests wait their turn in the order they came,
//! so the one sent is the one that waited longest, at the edge of its
//! caller's deadline. The coalescers that change the stores (Redis's and
//! the fallback's) leave unsent a request that could not be answered in
//! time ([`in_time`], [`LastCall`]): what it would sell would be sold to
//! a caller told the call failed (deploy/BENCHMARKS.md, "a stampede past
//! the peak").

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, mpsc};

use crate::domain::TenantId;
use crate::error::Error;

/// A queued request: whose it is decides which batch it may join.
pub trait Tenanted {
    /// The tenant the request belongs to.
    fn tenant(&self) -> &TenantId;

    /// Whether nobody waits for the answer any more: the caller's RPC
    /// ended while the request queued (its deadline passed, its client
    /// reset the stream). Such a request is dropped unsent.
    fn abandoned(&self) -> bool;

    /// The deadline of the call the request serves, if it carried one
    /// (`crate::deadline::current` when it was queued). [`in_time`] reads
    /// it; requests of a coalescer that does not call it need none.
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

/// How long a store's last call took, shared by a coalescer's sending
/// tasks: what a call sent now is likely to take.
#[derive(Debug, Default)]
pub struct LastCall(AtomicU64);

impl LastCall {
    /// Records a call that took `took`.
    pub fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.0.store(us, Ordering::Relaxed);
    }

    /// How close a call's deadline may be and the call still be sent:
    /// twice what the last call took, once to be answered and once more
    /// for the answer's way back through a daemon that is, when calls
    /// queue, as busy as the store. Zero before the first call.
    pub fn margin(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed)).saturating_mul(2)
    }
}

/// Splits `batch` into the requests to send and those whose deadline is
/// closer than `margin` ([`LastCall::margin`]), in their order: sent, one
/// of those would most likely be answered after its caller gave up, and
/// whatever it sold would be sold to a caller told the call failed. Answer
/// each with [`too_late`]. When every request is that close, the one with
/// the latest deadline goes anyway: the margin is only the last call's
/// time, and one slow call (a store that paused) must not keep every later
/// one unsent, with nothing sent to correct it.
pub fn in_time<T: Tenanted>(batch: Vec<T>, margin: Duration) -> (Vec<T>, Vec<T>) {
    let latest_sent = Instant::now() + margin;
    let (mut late, mut send): (Vec<T>, Vec<T>) = batch
        .into_iter()
        .partition(|q| q.deadline().is_some_and(|d| d < latest_sent));
    if send.is_empty()
        && let Some(i) = (0..late.len()).max_by_key(|&i| late[i].deadline())
    {
        send.push(late.swap_remove(i));
    }
    (send, late)
}

/// The answer to a request [`in_time`] left unsent: DEADLINE_EXCEEDED,
/// naming the store (`redis`, `postgres`), how long the request `waited`
/// and the `margin` it was held to. Nothing was changed, so the caller may
/// retry by id.
pub fn too_late(store: &str, waited: Duration, margin: Duration) -> Error {
    Error::DeadlineExceeded(format!(
        "the call's deadline would pass before {store} answered it: it waited {waited:?} for its turn, and a call takes about {:?} (not sent; retry by id)",
        margin / 2,
    ))
}

/// Calls to the store on their way at once, at most.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    /// In all.
    pub total: usize,
    /// Of one tenant.
    pub per_tenant: usize,
}

/// Runs a coalescer until every sender is gone: batches of up to `max`
/// requests, each handed to `send` on a task of its own, at most
/// `in_flight.total` at once and `in_flight.per_tenant` of one tenant. A
/// batch's slot is freed only when `send` has finished, so whatever `send`
/// records before it returns (a store that did not answer) is seen by the
/// batches that start after.
pub async fn serve<T, F, Fut>(mut rx: mpsc::Receiver<T>, in_flight: InFlight, max: usize, send: F)
where
    T: Tenanted,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight.total));
    let busy = Arc::new(Busy::default());
    let mut waiting = VecDeque::new();
    loop {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let sendable = |t: &TenantId| busy.count(t) < in_flight.per_tenant;
        let Some(batch) = next_batch(&mut rx, &mut waiting, max, sendable, &busy.freed).await
        else {
            return;
        };
        let running = Running::start(&busy, batch[0].tenant().clone(), slot);
        let sent = send(batch);
        tokio::spawn(async move {
            sent.await;
            drop(running);
        });
    }
}

/// A call on its way: its tenant's count and its slot, both given back
/// when it is dropped, even by a `send` that panicked (a tenant whose
/// count stayed up would never be sent for again).
struct Running {
    busy: Arc<Busy>,
    tenant: TenantId,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Running {
    fn start(busy: &Arc<Busy>, tenant: TenantId, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        busy.start(&tenant);
        Self {
            busy: Arc::clone(busy),
            tenant,
            _slot: slot,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.busy.end(&self.tenant);
    }
}

/// The calls on their way, by tenant, and word when one ends.
#[derive(Default)]
struct Busy {
    calls: Mutex<HashMap<TenantId, usize>>,
    freed: Notify,
}

impl Busy {
    fn count(&self, tenant: &TenantId) -> usize {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.get(tenant).copied().unwrap_or(0)
    }

    fn start(&self, tenant: &TenantId) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        *calls.entry(tenant.clone()).or_insert(0) += 1;
    }

    fn end(&self, tenant: &TenantId) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = calls.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                calls.remove(tenant);
            }
        }
        drop(calls);
        self.freed.notify_one();
    }
}

/// Waits until some waiting request's tenant is `sendable` (`None` when
/// every sender is gone and nothing waits), gathering what arrives, and
/// returns the next batch: the oldest sendable request and, in order, up
/// to `max` - 1 more of its tenant. The others keep their places in
/// `waiting`. `freed` wakes it when a call ends, which may make a tenant
/// sendable again.
pub async fn next_batch<T: Tenanted>(
    rx: &mut mpsc::Receiver<T>,
    waiting: &mut VecDeque<T>,
    max: usize,
    sendable: impl Fn(&TenantId) -> bool,
    freed: &Notify,
) -> Option<Vec<T>> {
    let mut open = true;
    loop {
        while open && waiting.len() < max * 4 {
            match rx.try_recv() {
                Ok(q) => waiting.push_back(q),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let batch = take_batch(waiting, max, &sendable);
        if !batch.is_empty() {
            return Some(batch);
        }
        if !open && waiting.is_empty() {
            return None;
        }
        tokio::select! {
            q = rx.recv(), if open && waiting.len() < max * 4 => match q {
                Some(q) => waiting.push_back(q),
                None => open = false,
            },
            _ = freed.notified() => {}
        }
    }
}

/// The oldest waiting request whose tenant is `sendable` and, in order, up
/// to `max` - 1 more of the same tenant; the others keep their places.
/// Empty when no waiting request's tenant is sendable.
///
/// Requests [`abandoned`](Tenanted::abandoned) by their callers are
/// dropped first, whoever's they are. Sent, one would change the stores
/// for nobody (a unit sold to a shopper whose checkout had given up on the
/// call, and knows of it only if it retries by id), and take a place in a
/// batch from a caller still waiting. Past the peak that is most of the
/// queue: callers give up and call again faster than the queue drains
/// (deploy/BENCHMARKS.md, "a stampede past the peak").
pub fn take_batch<T: Tenanted>(
    waiting: &mut VecDeque<T>,
    max: usize,
    sendable: impl Fn(&TenantId) -> bool,
) -> Vec<T> {
    waiting.retain(|q| !q.abandoned());
    // A tenant is asked about once a run of its requests: a queue of one
    // busy tenant's requests costs one look, not one a request.
    let mut refused: Option<&TenantId> = None;
    let Some(tenant) = waiting
        .iter()
        .map(|q| q.tenant())
        .find(|&t| {
            if refused == Some(t) {
                return false;
            }
            let ok = sendable(t);
            refused = Some(t);
            ok
        })
        .cloned()
    else {
        return Vec::new();
    };
    let mut batch = Vec::new();
    let mut rest = VecDeque::with_capacity(waiting.len());
    for q in waiting.drain(..) {
        if batch.len() < max && *q.tenant() == tenant {
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

        /// A request named "gone" has lost its caller.
        fn abandoned(&self) -> bool {
            self.1 == "gone"
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
        let batch: Vec<_> = take_batch(&mut waiting, 10, |_| true)
            .iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(batch, ["claim", "release", "get_hold"]);
        let rest: Vec<_> = waiting.iter().map(|r| (r.0.as_str(), r.1)).collect();
        assert_eq!(rest, [("b", "commit"), ("b", "extend")]);
    }

    #[test]
    fn requests_whose_callers_left_are_dropped_unsent_whoever_s_they_are() {
        let mut waiting = queue(&[
            ("a", "gone"),
            ("b", "commit"),
            ("a", "claim"),
            ("b", "gone"),
            ("a", "gone"),
            ("a", "release"),
        ]);
        let batch: Vec<_> = take_batch(&mut waiting, 10, |_| true)
            .iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(batch, ["commit"], "b's request is the oldest still wanted");
        let rest: Vec<_> = waiting.iter().map(|r| (r.0.as_str(), r.1)).collect();
        assert_eq!(rest, [("a", "claim"), ("a", "release")]);
        let mut left = queue(&[("a", "gone"), ("b", "gone")]);
        assert!(take_batch(&mut left, 10, |_| true).is_empty());
        assert!(left.is_empty(), "nothing is kept for nobody");
    }

    #[test]
    fn a_batch_is_of_the_oldest_request_whose_tenant_may_send() {
        let mut waiting = queue(&[("a", "claim"), ("b", "commit"), ("a", "release")]);
        let batch: Vec<_> = take_batch(&mut waiting, 10, |t| t.as_str() != "a")
            .iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(batch, ["commit"]);
        assert_eq!(waiting.len(), 2);
        assert!(take_batch(&mut waiting, 10, |_| false).is_empty());
        assert_eq!(waiting.len(), 2, "nothing taken, nothing lost");
    }

    /// A tenant with every one of its calls out does not hold back another
    /// tenant's, and its own next batch goes once one of its calls ends.
    #[tokio::test]
    async fn a_tenant_at_its_limit_waits_alone() {
        let (tx, rx) = mpsc::channel(16);
        let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Vec<&'static str>>();
        let gates: Arc<Mutex<Vec<tokio::sync::oneshot::Sender<()>>>> = Arc::default();
        let held = Arc::clone(&gates);
        let limits = InFlight {
            total: 4,
            per_tenant: 1,
        };
        tokio::spawn(serve(rx, limits, 10, move |batch: Vec<Request>| {
            let (open, wait) = tokio::sync::oneshot::channel();
            held.lock().unwrap().push(open);
            let _ = sent_tx.send(batch.iter().map(|r| r.1).collect());
            async move {
                let _ = wait.await;
            }
        }));
        let tenant = |t: &str| TenantId::parse(t).expect("a valid tenant id");
        tx.send(Request(tenant("a"), "first")).await.unwrap();
        assert_eq!(next(&mut sent_rx).await, ["first"]);
        // a's one call is out: its next request waits, b's goes.
        tx.send(Request(tenant("a"), "second")).await.unwrap();
        tx.send(Request(tenant("b"), "other")).await.unwrap();
        assert_eq!(next(&mut sent_rx).await, ["other"]);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            sent_rx.try_recv().is_err(),
            "a's second waits for its first"
        );
        // a's first call ends: its second goes.
        let first = gates.lock().unwrap().remove(0);
        first.send(()).unwrap();
        assert_eq!(next(&mut sent_rx).await, ["second"]);
    }

    /// A call whose sending panicked still gives its tenant's place back.
    #[tokio::test]
    async fn a_call_that_panicked_does_not_keep_its_tenant_waiting() {
        let (tx, rx) = mpsc::channel(16);
        let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Vec<&'static str>>();
        let limits = InFlight {
            total: 4,
            per_tenant: 1,
        };
        tokio::spawn(serve(rx, limits, 10, move |batch: Vec<Request>| {
            let names: Vec<&'static str> = batch.iter().map(|r| r.1).collect();
            let _ = sent_tx.send(names.clone());
            async move {
                assert!(names != ["boom"], "a send that panics");
            }
        }));
        let tenant = TenantId::parse("a").expect("a valid tenant id");
        tx.send(Request(tenant.clone(), "boom")).await.unwrap();
        assert_eq!(next(&mut sent_rx).await, ["boom"]);
        tx.send(Request(tenant, "after")).await.unwrap();
        assert_eq!(next(&mut sent_rx).await, ["after"]);
    }

    /// The next batch the coalescer sent, waited for 5 s at most.
    async fn next(sent: &mut mpsc::UnboundedReceiver<Vec<&'static str>>) -> Vec<&'static str> {
        tokio::time::timeout(std::time::Duration::from_secs(5), sent.recv())
            .await
            .expect("a batch within 5 s")
            .expect("the coalescer runs")
    }

    /// A request with a deadline, `in_ms` from now.
    struct Timed(TenantId, &'static str, Option<Instant>);

    impl Tenanted for Timed {
        fn tenant(&self) -> &TenantId {
            &self.0
        }

        fn abandoned(&self) -> bool {
            false
        }

        fn deadline(&self) -> Option<Instant> {
            self.2
        }
    }

    fn timed(requests: &[(&'static str, Option<u64>)]) -> Vec<Timed> {
        let now = Instant::now();
        let tenant = TenantId::parse("a").expect("a valid tenant id");
        requests
            .iter()
            .map(|&(n, ms)| {
                Timed(
                    tenant.clone(),
                    n,
                    ms.map(|ms| now + Duration::from_millis(ms)),
                )
            })
            .collect()
    }

    fn names(batch: &[Timed]) -> Vec<&'static str> {
        batch.iter().map(|r| r.1).collect()
    }

    /// Requests whose deadline is closer than the margin are set apart, the
    /// others go in order, those without a deadline among them; when all
    /// are that close, the latest deadline goes anyway.
    #[test]
    fn requests_that_could_not_be_answered_in_time_are_set_apart() {
        let margin = Duration::from_secs(2);
        let batch = timed(&[
            ("hurried", Some(500)),
            ("patient", None),
            ("early", Some(1_900)),
            ("roomy", Some(60_000)),
        ]);
        let (send, late) = in_time(batch, margin);
        assert_eq!(names(&send), ["patient", "roomy"]);
        assert_eq!(names(&late), ["hurried", "early"]);

        let (send, late) = in_time(
            timed(&[("a", Some(500)), ("b", Some(900)), ("c", Some(100))]),
            margin,
        );
        assert_eq!(names(&send), ["b"], "the latest deadline goes");
        assert_eq!(late.len(), 2);

        let (send, late) = in_time(timed(&[("a", Some(1)), ("b", None)]), Duration::ZERO);
        assert_eq!(
            (send.len(), late.len()),
            (2, 0),
            "no margin before a first call"
        );
    }

    #[test]
    fn the_margin_is_twice_the_last_call_and_never_overflows() {
        let last = LastCall::default();
        assert_eq!(last.margin(), Duration::ZERO);
        last.record(Duration::from_millis(30));
        assert_eq!(last.margin(), Duration::from_millis(60));
        last.record(Duration::MAX);
        assert!(last.margin() >= Duration::from_secs(1 << 40));
    }

    #[test]
    fn a_batch_never_holds_more_than_max() {
        let mut waiting = queue(&[("a", "get_hold"); 8]);
        assert_eq!(take_batch(&mut waiting, 5, |_| true).len(), 5);
        assert_eq!(waiting.len(), 3);
    }
}

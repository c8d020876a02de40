//! A small read-through cache whose misses load once.
//!
//! The daemon caches a few definitions read from Postgres on the hot path:
//! sales (claims), venues (slot reservations) and API keys. Each used to
//! check a map and, on a miss, read Postgres itself, so every call in
//! flight when an entry was missing or had gone stale read it at once. A
//! miss is likeliest exactly when the load is highest: the first seconds
//! of a flash sale, on every daemon behind the balancer, with hundreds of
//! claims in flight, each reading a sale of thousands of products.
//!
//! Here the first call to miss a key loads it; the calls that miss the same
//! key meanwhile wait for that one load and share its answer, success or
//! error. A failed load is not kept: the next call tries again. A call
//! whose load is cancelled (its client went away) hands the load to the
//! next waiter.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::error::Error;

/// One load of one key, and then its answer while it is fresh.
type Slot<V> = Arc<OnceCell<Result<(V, Instant), Error>>>;

/// Values by key, each loaded once and trusted for `fresh`.
pub struct Cache<K, V> {
    slots: RwLock<HashMap<K, Slot<V>>>,
    fresh: Duration,
    most: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
    /// A cache that trusts a value for `fresh` after it was loaded (or
    /// put), and keeps at most `most` keys: past that it starts over, and
    /// each key costs one load again.
    pub fn new(fresh: Duration, most: usize) -> Self {
        Self {
            slots: RwLock::default(),
            fresh,
            most,
        }
    }

    /// The value of `key`: the cached one while fresh, else what `load`
    /// answers, loaded by one caller at a time however many ask.
    pub async fn get_or_load<F, Fut>(&self, key: &K, load: F) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, Error>>,
    {
        let slot = match self.fresh_slot(key) {
            Some(slot) => slot,
            None => self.slot_to_load(key),
        };
        let answer = slot
            .get_or_init(|| async { load().await.map(|v| (v, Instant::now())) })
            .await;
        match answer {
            Ok((v, _)) => Ok(v.clone()),
            Err(e) => {
                self.forget(key, &slot);
                Err(e.share())
            }
        }
    }

    /// Caches `value` for `key` now (a write through this daemon applies at
    /// once); a load of the key in flight answers only its own callers.
    pub fn put(&self, key: K, value: V) {
        let slot = Arc::new(OnceCell::new_with(Some(Ok((value, Instant::now())))));
        let mut slots = self.write();
        self.make_room(&mut slots, &key);
        slots.insert(key, slot);
    }

    /// The key's slot when it is loading or holds a fresh value.
    fn fresh_slot(&self, key: &K) -> Option<Slot<V>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(key).filter(|s| self.usable(s)).cloned()
    }

    /// The slot a missing or stale key is loaded into: one a caller that
    /// came first already made, or a new one in place of the stale.
    fn slot_to_load(&self, key: &K) -> Slot<V> {
        let mut slots = self.write();
        if let Some(slot) = slots.get(key).filter(|s| self.usable(s)) {
            return slot.clone();
        }
        self.make_room(&mut slots, key);
        let slot = Slot::default();
        slots.insert(key.clone(), slot.clone());
        slot
    }

    /// Whether a slot may answer: still loading, or loaded recently.
    fn usable(&self, slot: &Slot<V>) -> bool {
        match slot.get() {
            None => true,
            Some(Ok((_, at))) => at.elapsed() < self.fresh,
            Some(Err(_)) => false,
        }
    }

    /// Drops a failed load's slot, unless another has replaced it.
    fn forget(&self, key: &K, slot: &Slot<V>) {
        let mut slots = self.write();
        if slots.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            slots.remove(key);
        }
    }

    /// Starts over when `key` would be one more than the bound allows (a
    /// key already there is replaced, and takes no room).
    fn make_room(&self, slots: &mut HashMap<K, Slot<V>>, key: &K) {
        if slots.len() >= self.most && !slots.contains_key(key) {
            slots.clear();
        }
    }

    // A poisoned lock only means a panic elsewhere mid-insert; the map is
    // a cache, so its contents are still usable.
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<K, Slot<V>>> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    type Shared = Arc<(Cache<u32, String>, AtomicUsize)>;

    fn cache(fresh: Duration, most: usize) -> Shared {
        Arc::new((Cache::new(fresh, most), AtomicUsize::new(0)))
    }

    /// Loads key `key` through the cache, counting loads; each load takes
    /// a moment, as a Postgres read does, and answers `answer` (an error
    /// is NOT_FOUND).
    async fn load(c: &Shared, key: u32, answer: Result<&str, &str>) -> Result<String, Error> {
        let (cache, loads) = &**c;
        cache
            .get_or_load(&key, || async {
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer
                    .map(str::to_owned)
                    .map_err(|e| Error::NotFound(e.to_owned()))
            })
            .await
    }

    /// `n` concurrent loads of key 1, each on a task of its own.
    async fn many(
        c: &Shared,
        n: usize,
        answer: Result<&'static str, &'static str>,
    ) -> Vec<Result<String, Error>> {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let c = c.clone();
            tasks.spawn(async move { load(&c, 1, answer).await });
        }
        tasks.join_all().await
    }

    fn loads(c: &Shared) -> usize {
        c.1.load(Ordering::SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_of_one_key_load_it_once() {
        let c = cache(Duration::from_secs(60), 100);
        let answers = many(&c, 50, Ok("sale")).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(v) if v == "sale")));
        assert_eq!(loads(&c), 1);
        // The next call is answered from the cache.
        assert_eq!(load(&c, 1, Ok("other")).await.unwrap(), "sale");
        assert_eq!(loads(&c), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_load_is_shared_by_its_waiters_and_not_kept() {
        let c = cache(Duration::from_secs(60), 100);
        for a in many(&c, 20, Err("sale x")).await {
            assert!(
                matches!(&a, Err(Error::NotFound(m)) if m == "sale x"),
                "{a:?}"
            );
        }
        assert_eq!(loads(&c), 1);
        // Not kept: the next call loads again, and this time it is there.
        assert_eq!(load(&c, 1, Ok("sale")).await.unwrap(), "sale");
        assert_eq!(loads(&c), 2);
    }

    #[tokio::test]
    async fn a_stale_value_is_loaded_again() {
        let c = cache(Duration::from_millis(30), 100);
        assert_eq!(load(&c, 1, Ok("a")).await.unwrap(), "a");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(load(&c, 1, Ok("b")).await.unwrap(), "b");
        assert_eq!(loads(&c), 2);
    }

    #[tokio::test]
    async fn a_put_replaces_the_value_at_once() {
        let c = cache(Duration::from_secs(60), 100);
        assert_eq!(load(&c, 1, Ok("a")).await.unwrap(), "a");
        c.0.put(1, "b".into());
        assert_eq!(load(&c, 1, Ok("c")).await.unwrap(), "b");
        assert_eq!(loads(&c), 1);
    }

    #[tokio::test]
    async fn past_its_bound_the_cache_starts_over() {
        let c = cache(Duration::from_secs(60), 2);
        for key in [1, 2, 3, 1] {
            load(&c, key, Ok("v")).await.unwrap();
        }
        // 1 and 2 filled it; 3 cleared it, so 1 was loaded again.
        assert_eq!(loads(&c), 4);
    }
}

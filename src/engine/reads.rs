//! Pool reads, gathered. A storefront asks for a sale's counts on every
//! view of its product page, so reads come far more often than takes; and
//! each read alone cost a Postgres query and a Redis call: ~9,500
//! `GetSale`s a second, a tenth of the no-op RPC's rate, and 2,000 a second
//! beside claim-hot cost it a third of its claims (deploy/BENCHMARKS.md,
//! "storefront reads").
//!
//! So concurrent reads of one tenant go as one read of both stores, over
//! every pool any of them asked for, through the coalescer the takes use
//! (store/coalesce.rs): a lone read goes at once, and reads that arrive
//! while the tenant's reads are on their way wait for one to end and go
//! together. No read is answered from a read that began before it was
//! asked: a batch starts only after all of its reads arrived, so a read
//! still sees every change acknowledged before it was made.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Engine, PoolView};
use crate::domain::{PoolId, TenantId};
use crate::error::Error;
use crate::store::coalesce::{self, InFlight, Tenanted};
use crate::telemetry::metric;

/// Reads on their way at once: of one tenant, two, as the Redis
/// coalescer's calls (one answered while the next is read; with one, the
/// storefront's reads beside claim-hot waited longer at p99, 16-23 ms
/// against 14, and nothing else moved: deploy/BENCHMARKS.md, "storefront
/// reads"); in all, as many as the Redis coalescer's, since other
/// tenants' reads could never join them.
const IN_FLIGHT: InFlight = InFlight {
    total: 32,
    per_tenant: 2,
};
/// Reads answered by one read of the stores, at most.
const MAX_READS: usize = 64;
/// Reads that may wait for the coalescer before callers wait to queue.
const QUEUE: usize = 4096;
/// Pools read by one call to each store, at most: one read's own most
/// (`GetAvailability`'s 2,000 windows). Reads of different pools (each
/// shopper's own week of a venue) would otherwise make one script that
/// holds Redis, and every claim waiting on it, for as long as 64 reads.
const READ_PART: usize = 2_000;
/// The longest a read waits in the queue, and then for the stores, before
/// it answers UNAVAILABLE (a retry is safe): as long as a call waits for a
/// Postgres connection (startup.rs). A statement that Postgres holds (a
/// lock it waits on, a server that stopped mid-answer) need never return,
/// and the tenant's later reads queue behind the two on their way;
/// bounded, each read answers within twice this.
const READ_WAIT: Duration = Duration::from_secs(5);

/// The pool reads' coalescer, an [`Engine`]'s.
pub(super) struct PoolReads {
    tx: mpsc::Sender<Read>,
}

/// One caller's read: which pools, answered in the order asked.
struct Read {
    tenant: TenantId,
    ids: Vec<PoolId>,
    asked: Instant,
    reply: oneshot::Sender<Result<Vec<Option<PoolView>>, Error>>,
}

impl Tenanted for Read {
    fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

impl PoolReads {
    /// Starts the coalescer for `engine` (made with it: the coalescer's
    /// loop ends when the engine, and with it the sender, is dropped).
    pub(super) fn start(engine: Weak<Engine>) -> Self {
        let (tx, rx) = mpsc::channel::<Read>(QUEUE);
        tokio::spawn(coalesce::serve(rx, IN_FLIGHT, MAX_READS, move |batch| {
            let engine = engine.clone();
            async move {
                if let Some(engine) = engine.upgrade() {
                    read_together(&engine, batch).await;
                }
            }
        }));
        Self { tx }
    }

    /// Reads `ids` of `tenant`, as [`Engine::pools_if_any`] answers.
    pub(super) async fn read(
        &self,
        tenant: &TenantId,
        ids: &[PoolId],
    ) -> Result<Vec<Option<PoolView>>, Error> {
        let (reply, rx) = oneshot::channel();
        let gone = || Error::Unavailable("the pool reads' queue stopped".into());
        self.tx
            .send(Read {
                tenant: tenant.clone(),
                ids: ids.to_vec(),
                asked: Instant::now(),
                reply,
            })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Answers `batch` (one tenant's reads) with one read of every pool they
/// name, each pool once (in parts of [`READ_PART`]). Reads whose callers
/// left never get here (`coalesce::take_batch` drops them), and those
/// that waited [`READ_WAIT`] already answer UNAVAILABLE unread.
async fn read_together(engine: &Engine, batch: Vec<Read>) {
    let (late, batch): (Vec<Read>, Vec<Read>) = batch
        .into_iter()
        .partition(|r| r.asked.elapsed() >= READ_WAIT);
    for read in late {
        let _ = read.reply.send(Err(too_long()));
    }
    let Some(tenant) = batch.first().map(|r| r.tenant.clone()) else {
        return;
    };
    metrics::histogram!(metric::POOL_READ_BATCH_OPS).record(batch.len() as f64);
    let mut at: HashMap<&PoolId, usize> = HashMap::new();
    let mut all: Vec<PoolId> = Vec::new();
    for id in batch.iter().flat_map(|r| &r.ids) {
        at.entry(id).or_insert_with(|| {
            all.push(id.clone());
            all.len() - 1
        });
    }
    let answer = tokio::time::timeout(READ_WAIT, read_in_parts(engine, &tenant, &all))
        .await
        .unwrap_or_else(|_| Err(too_long()));
    let places: Vec<Vec<usize>> = batch
        .iter()
        .map(|r| r.ids.iter().map(|id| at[id]).collect())
        .collect();
    for (read, places) in batch.into_iter().zip(places) {
        let own = match &answer {
            Ok(views) => Ok(places.iter().map(|&i| views[i].clone()).collect()),
            Err(e) => Err(e.share()),
        };
        let _ = read.reply.send(own);
    }
}

/// `ids` read [`READ_PART`] at a time, one part after the other.
async fn read_in_parts(
    engine: &Engine,
    tenant: &TenantId,
    ids: &[PoolId],
) -> Result<Vec<Option<PoolView>>, Error> {
    let mut views = Vec::with_capacity(ids.len());
    for part in ids.chunks(READ_PART) {
        views.extend(engine.read_pools(tenant, part).await?);
    }
    Ok(views)
}

/// A read's answer when the stores did not answer within [`READ_WAIT`].
fn too_long() -> Error {
    Error::Unavailable(format!(
        "the stores did not answer a read of pools within {} s; retry",
        READ_WAIT.as_secs()
    ))
}

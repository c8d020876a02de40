//! The fallback's coalescer: while Redis is down, takes that arrive while
//! [`IN_FLIGHT`] fallback transactions are running wait, and go together
//! as one transaction of `fallback/take.rs` when one ends. A flash sale's
//! claims all contend for one pool row, so per-claim transactions would
//! queue on its lock one commit at a time; a batch takes that lock once.
//!
//! The fallback is slower than Redis, so a crowd that Redis would serve in
//! time can outrun it: a take whose caller left while it queued is dropped
//! unsent (`coalesce::take_batch`), and one whose deadline is closer than
//! twice the last transaction's time is answered DEADLINE_EXCEEDED unsent
//! (`coalesce::in_time`), as on the Redis path.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::{PgStore, PgTake};
use crate::domain::TenantId;
use crate::error::Error;
use crate::store::HoldReply;
use crate::store::coalesce::{self, InFlight, LastCall, Tenanted};
use crate::telemetry::metric;

/// Fallback transactions running at once: one holding the hot pool row
/// while the next prepares (ids locked, replays read) keeps that row busy,
/// and four let other tenants' and pools' batches run beside them. Each
/// takes one Postgres connection. A tenant may have all four: its calls
/// contend for its own pool rows, not another tenant's.
const IN_FLIGHT: InFlight = InFlight {
    total: 4,
    per_tenant: 4,
};
/// Takes in one transaction, at most: bounds how long it holds a pool.
const MAX_TAKES: usize = 64;
/// Takes that may wait before callers wait to queue.
const QUEUE: usize = 4096;

struct Queued {
    tenant: TenantId,
    take: PgTake,
    at: Instant,
    /// The deadline of the call it serves, if it carried one.
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<HoldReply, Error>>,
}

impl Tenanted for Queued {
    fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// The handle the engine takes through; cheap to clone.
#[derive(Clone)]
pub struct TakeQueue {
    tx: mpsc::Sender<Queued>,
}

impl TakeQueue {
    /// Starts the coalescer's task on the current runtime; it ends when the
    /// last handle is dropped.
    pub fn start(pg: PgStore) -> Self {
        let (tx, rx) = mpsc::channel::<Queued>(QUEUE);
        let last_call = Arc::new(LastCall::default());
        tokio::spawn(coalesce::serve(rx, IN_FLIGHT, MAX_TAKES, move |batch| {
            let pg = pg.clone();
            let last_call = Arc::clone(&last_call);
            async move { run(&pg, &last_call, batch).await }
        }));
        Self { tx }
    }

    /// Takes on the fallback path, as [`PgStore::fallback_take`] does.
    pub async fn take(&self, tenant: &TenantId, take: PgTake) -> Result<HoldReply, Error> {
        let (reply, rx) = oneshot::channel();
        let gone = || Error::Unavailable("the fallback's queue stopped".into());
        self.tx
            .send(Queued {
                tenant: tenant.clone(),
                take,
                at: Instant::now(),
                deadline: crate::deadline::current(),
                reply,
            })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

async fn run(pg: &PgStore, last_call: &LastCall, batch: Vec<Queued>) {
    let margin = last_call.margin();
    let (batch, late) = coalesce::in_time(batch, margin);
    for q in late {
        let _ = q
            .reply
            .send(Err(coalesce::too_late("postgres", q.at.elapsed(), margin)));
    }
    let Some(tenant) = batch.first().map(|q| q.tenant.clone()) else {
        return;
    };
    metrics::histogram!(metric::PG_BATCH_TAKES).record(batch.len() as f64);
    let (takes, replies): (Vec<PgTake>, Vec<_>) =
        batch.into_iter().map(|q| (q.take, q.reply)).unzip();
    let started = Instant::now();
    let answers = pg.fallback_takes(&tenant, &takes).await;
    last_call.record(started.elapsed());
    match answers {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            // Nothing was written: every caller may retry by id.
            for reply in replies {
                let _ = reply.send(Err(e.share()));
            }
        }
    }
}

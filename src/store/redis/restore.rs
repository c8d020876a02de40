//! Writing back into Redis the holds it lost with its data, from the
//! audit log (`Engine::restore_lost_takes`): without them, a retried take
//! of a lost id was a new take, and a claim retried after the loss sold a
//! second unit to one customer.

use super::{RedisStore, pairs_json, reply, scripts};
use crate::domain::{HoldState, TenantId};
use crate::error::Error;
use crate::store::postgres::AuditedTake;

/// Holds written back per script call: each is twelve arguments, and a
/// call holds Redis's one thread for its length (a few ms for this many:
/// 118,040 holds took 1.9 s with the log's read, deploy/BENCHMARKS.md).
const CHUNK: usize = 200;

impl RedisStore {
    /// Whether Redis has a hold under each of `ids` of `tenant` (one
    /// `EXISTS` of them all).
    pub async fn has_holds(&self, tenant: &TenantId, ids: &[String]) -> Result<bool, Error> {
        if ids.is_empty() {
            return Ok(true);
        }
        let prefix = self.keys.tenant(tenant);
        let keys: Vec<String> = ids.iter().map(|id| format!("{prefix}hold:{id}")).collect();
        let n: usize = redis::cmd("EXISTS")
            .arg(&keys)
            .query_async(&mut self.multiplexed())
            .await?;
        Ok(n == keys.len())
    }

    /// Writes back, for `tenant`, those of `takes` that ended (committed,
    /// released, expired) and that Redis has no hold under, each for what
    /// is left of its retention (`lua/restore.lua`). A hold live at the
    /// loss is not written: its units are in doubt, and a retry of its
    /// take is a new take of other units. Returns how many were written.
    pub async fn restore_takes(
        &self,
        tenant: &TenantId,
        takes: &[AuditedTake],
    ) -> Result<usize, Error> {
        let ended: Vec<&AuditedTake> = takes
            .iter()
            .filter(|t| t.hold.state != HoldState::Active)
            .collect();
        let mut written = 0;
        for chunk in ended.chunks(CHUNK) {
            let v = self
                .run("restore", &scripts::RESTORE, tenant, |i| {
                    for t in chunk {
                        let h = &t.hold;
                        i.arg(h.id.as_str())
                            .arg(if t.claim { "claim" } else { "hold" })
                            .arg(&h.job)
                            .arg(pairs_json(h.lines.iter().map(|(p, q)| (p.as_str(), *q))))
                            .arg(stored_lines(t))
                            .arg(&t.customer)
                            .arg(state_letter(h.state))
                            .arg(h.created_at_ms)
                            .arg(h.finished_at_ms)
                            .arg(&h.order_id)
                            .arg(&h.reference)
                            .arg(h.extensions);
                    }
                })
                .await?;
            written += usize::try_from(reply::int_reply("restore", &v)?).unwrap_or(0);
        }
        Ok(written)
    }
}

/// A hold's lines as Redis keeps them, each with its epoch.
fn stored_lines(t: &AuditedTake) -> String {
    let v: Vec<(&str, i64, i64)> = t
        .hold
        .lines
        .iter()
        .zip(&t.epochs)
        .map(|((p, q), e)| (p.as_str(), *q, *e))
        .collect();
    serde_json::to_string(&v).expect("lines serialise")
}

fn state_letter(state: HoldState) -> &'static str {
    match state {
        HoldState::Active => "A",
        HoldState::Committed => "C",
        HoldState::Released => "R",
        HoldState::Expired => "E",
    }
}

//! What Redis lost with its data, answered from the audit log: a retry
//! of a hold in neither store (`unless_lost`), and the ended holds written
//! back into Redis when the loss is noticed (`restore_lost_takes`), so
//! that a retried take of a lost id is not a new take.

use super::{Engine, settle};
use crate::domain::{Hold, HoldId, HoldState, Job, TenantId};
use crate::error::Error;
use crate::store::HoldReply;

/// How many of a tenant's newest takes tell whether Redis lost any.
const NEWEST: i64 = 16;

impl Engine {
    /// A hold in neither store (NOT_FOUND) may be one Redis lost with its
    /// data: its retry (of a commit, say) is then answered from the audit
    /// log, by `answer` from the hold as it ended there, instead of
    /// NOT_FOUND, which would tell a caller that its committed order
    /// never was. One still live at the loss is FAILED_PRECONDITION: its
    /// units are in doubt until an operator resolves them. Not on the hot
    /// path: only a hold no store has is looked up.
    pub(super) async fn unless_lost(
        &self,
        tenant: &TenantId,
        id: &HoldId,
        job: Job,
        found: Result<Hold, Error>,
        answer: impl FnOnce(Hold) -> HoldReply,
    ) -> Result<Hold, Error> {
        let Err(Error::NotFound(why)) = found else {
            return found;
        };
        let retention = self.redis.retention();
        match self.pg.audited_hold(tenant, id, job, retention).await? {
            None => Err(Error::NotFound(why)),
            Some(hold) if hold.state == HoldState::Active => {
                Err(Error::FailedPrecondition(format!(
                    "hold {id} was live when Redis lost its data; its units are in doubt until an operator resolves them (AdminService)"
                )))
            }
            Some(hold) => settle(id, answer(hold)),
        }
    }

    /// Writes back into Redis, tenant by tenant, the holds the audit log
    /// has from the last `--retention-secs` that ended and that Redis has
    /// no hold under: after Redis came back empty, restarted or replaced
    /// (src/jobs/redis_watch.rs, with the circuit open, before the marker
    /// is left). A retried take of such an id then answers as the first
    /// time, as it would have before the loss, and another request under
    /// it is ALREADY_EXISTS; before, it was a new take, and a claim
    /// retried after the loss sold a second unit. Holds Redis still has
    /// are left as they are. A tenant whose newest takes Redis still has
    /// lost nothing the log knows of (Redis loses everything, or all after
    /// some moment) and is not read further: a restart of a Redis that
    /// lost nothing costs one look a tenant. Returns how many holds were
    /// written.
    pub async fn restore_lost_takes(&self) -> Result<usize, Error> {
        let retention = self.redis.retention();
        let mut written = 0;
        for tenant in self.pg.tenants().await? {
            let newest = self.pg.newest_take_ids(&tenant, retention, NEWEST).await?;
            if self.redis.has_holds(&tenant, &newest).await? {
                continue;
            }
            let takes = self.pg.audited_takes(&tenant, retention).await?;
            written += self.redis.restore_takes(&tenant, &takes).await?;
        }
        Ok(written)
    }
}

//! `holdfast.v1.SaleLockService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Auth, Role};
use super::convert::{self, ms_timestamp};
use super::pb::sale_lock_service_server::SaleLockService;
use super::pb::{self, AcquireOutcome as Outcome, CardConflictReason as Reason};
use super::{meter, observe};
use crate::domain::{ChannelSlug, HoldId, HoldState, Limits};
use crate::error::Error;
use crate::services::sale_locks::{AcquireOutcome, CardConflict, SaleLock, SaleLocks};

const SERVICE: &str = "SaleLockService";

/// The adapter from gRPC to [`SaleLocks`].
pub struct SaleLockApi {
    locks: Arc<SaleLocks>,
    auth: Arc<Auth>,
    /// The input limits, with the sale-lock TTL bounds.
    limits: Limits,
}

impl SaleLockApi {
    /// An adapter over `locks`; `limits` carries the lock TTL bounds.
    pub fn new(locks: Arc<SaleLocks>, auth: Arc<Auth>, limits: Limits) -> Self {
        Self {
            locks,
            auth,
            limits,
        }
    }

    fn lock_ref(&self, value: &str) -> Result<HoldId, Error> {
        HoldId::parse("lock_ref", value, self.limits.max_id_len)
    }
}

fn lock_pb(l: SaleLock) -> pb::SaleLock {
    let state = match l.hold.state {
        HoldState::Active => pb::SaleLockState::Active,
        HoldState::Committed => pb::SaleLockState::Completed,
        HoldState::Released => pb::SaleLockState::Released,
        HoldState::Expired => pb::SaleLockState::Expired,
    };
    pb::SaleLock {
        lock_ref: l.hold.id.to_string(),
        channel: l.channel,
        card_ids: l.cards.iter().map(ToString::to_string).collect(),
        state: state as i32,
        expires_at: Some(ms_timestamp(l.hold.expires_at_ms)),
        fencing_token: u64::try_from(l.hold.fence).unwrap_or(0),
        acquired_at: Some(ms_timestamp(l.hold.created_at_ms)),
        order_id: l.hold.order_id,
        finished_at: (l.hold.finished_at_ms > 0).then(|| ms_timestamp(l.hold.finished_at_ms)),
    }
}

fn conflict_pb((card, why): (crate::domain::CardId, CardConflict)) -> pb::CardConflict {
    let (reason, channel) = match why {
        CardConflict::Locked(c) => (Reason::Locked, c.map(|c| c.to_string()).unwrap_or_default()),
        CardConflict::Sold(c) => (Reason::Sold, c.map(|c| c.to_string()).unwrap_or_default()),
        CardConflict::NotListed => (Reason::NotListed, String::new()),
    };
    pb::CardConflict {
        card_id: card.to_string(),
        reason: reason as i32,
        channel,
    }
}

#[tonic::async_trait]
impl SaleLockService for SaleLockApi {
    async fn acquire_sale_locks(
        &self,
        request: Request<pb::AcquireSaleLocksRequest>,
    ) -> Result<Response<pb::AcquireSaleLocksResponse>, Status> {
        observe(meter!(SERVICE, "AcquireSaleLocks"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().lock_ref)
                .await?;
            let r = request.into_inner();
            let lock_ref = self.lock_ref(&r.lock_ref)?;
            let channel = ChannelSlug::parse("channel", &r.channel)?;
            let cards = convert::card_ids("card_ids", r.card_ids, self.limits.max_batch)?;
            let ttl = convert::ttl("ttl", r.ttl, &self.limits)?;
            let mut resp = pb::AcquireSaleLocksResponse::default();
            match self
                .locks
                .acquire(&caller.tenant, lock_ref, &channel, cards, ttl)
                .await?
            {
                AcquireOutcome::Acquired(lock) => {
                    resp.set_outcome(Outcome::Acquired);
                    resp.lock = Some(lock_pb(lock));
                }
                AcquireOutcome::Conflict(mut conflicts) => {
                    conflicts.sort_by(|a, b| a.0.cmp(&b.0));
                    resp.set_outcome(Outcome::Conflict);
                    resp.conflicts = conflicts.into_iter().map(conflict_pb).collect();
                }
            }
            Ok(resp)
        })
        .await
    }

    async fn complete_sale_locks(
        &self,
        request: Request<pb::CompleteSaleLocksRequest>,
    ) -> Result<Response<pb::CompleteSaleLocksResponse>, Status> {
        observe(meter!(SERVICE, "CompleteSaleLocks"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().lock_ref)
                .await?;
            let r = request.into_inner();
            let lock_ref = self.lock_ref(&r.lock_ref)?;
            let order_id = convert::optional_name("order_id", r.order_id, self.limits.max_id_len)?;
            let lock = self
                .locks
                .complete(&caller.tenant, &lock_ref, &order_id)
                .await?;
            Ok(pb::CompleteSaleLocksResponse {
                lock: Some(lock_pb(lock)),
            })
        })
        .await
    }

    async fn release_sale_locks(
        &self,
        request: Request<pb::ReleaseSaleLocksRequest>,
    ) -> Result<Response<pb::ReleaseSaleLocksResponse>, Status> {
        observe(meter!(SERVICE, "ReleaseSaleLocks"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().lock_ref)
                .await?;
            let lock_ref = self.lock_ref(&request.get_ref().lock_ref)?;
            let lock = self.locks.release(&caller.tenant, &lock_ref).await?;
            Ok(pb::ReleaseSaleLocksResponse {
                lock: Some(lock_pb(lock)),
            })
        })
        .await
    }

    async fn get_sale_lock(
        &self,
        request: Request<pb::GetSaleLockRequest>,
    ) -> Result<Response<pb::GetSaleLockResponse>, Status> {
        observe(meter!(SERVICE, "GetSaleLock"), async {
            let caller = self
                .auth
                .caller(&request, Role::Checkout, &request.get_ref().lock_ref)
                .await?;
            let lock_ref = self.lock_ref(&request.get_ref().lock_ref)?;
            let lock = self.locks.get(&caller.tenant, &lock_ref).await?;
            Ok(pb::GetSaleLockResponse {
                lock: Some(lock_pb(lock)),
            })
        })
        .await
    }
}

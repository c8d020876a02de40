//! `holdfast.v1.AdminService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Auth, Role};
use super::pb;
use super::pb::admin_service_server::AdminService;
use super::{meter, observe};
use crate::domain::{PoolId, parse_name};
use crate::engine::Engine;
use crate::store::postgres::InDoubtResolution;

const SERVICE: &str = "AdminService";

/// The adapter from gRPC to the engine's operator reads.
pub struct AdminApi {
    engine: Arc<Engine>,
    auth: Arc<Auth>,
    /// The longest client-chosen id (a resolution's).
    max_id_len: usize,
}

impl AdminApi {
    /// An adapter over `engine`.
    pub fn new(engine: Arc<Engine>, auth: Arc<Auth>, max_id_len: usize) -> Self {
        Self {
            engine,
            auth,
            max_id_len,
        }
    }
}

fn pool_pb(view: crate::engine::PoolView) -> pb::Pool {
    pb::Pool {
        pool_id: view.pool.to_string(),
        unlimited: view.capacity.is_none(),
        capacity: view.capacity.unwrap_or(0),
        sold: view.sold,
        held: view.held,
        available: view.available,
        in_doubt: view.in_doubt,
        granted_to_redis: view.granted_to_redis,
        epoch: view.epoch,
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_pool(
        &self,
        request: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::GetPoolResponse>, Status> {
        observe(meter!(SERVICE, "GetPool"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().pool_id)
                .await?;
            let id = PoolId::parse("pool_id", &request.get_ref().pool_id)?;
            let view = self
                .engine
                .pools(&caller.tenant, std::slice::from_ref(&id))
                .await?
                .pop();
            let view = view.ok_or_else(|| crate::Error::NotFound(format!("pool {id}")))?;
            Ok(pb::GetPoolResponse {
                pool: Some(pool_pb(view)),
            })
        })
        .await
    }

    async fn list_in_doubt_pools(
        &self,
        request: Request<pb::ListInDoubtPoolsRequest>,
    ) -> Result<Response<pb::ListInDoubtPoolsResponse>, Status> {
        observe(meter!(SERVICE, "ListInDoubtPools"), async {
            let caller = self.auth.caller(&request, Role::Admin, "").await?;
            let ids = self.engine.pg().pools_in_doubt(&caller.tenant).await?;
            let views = self.engine.pools(&caller.tenant, &ids).await?;
            Ok(pb::ListInDoubtPoolsResponse {
                pools: views.into_iter().map(pool_pb).collect(),
            })
        })
        .await
    }

    async fn resolve_in_doubt(
        &self,
        request: Request<pb::ResolveInDoubtRequest>,
    ) -> Result<Response<pb::ResolveInDoubtResponse>, Status> {
        observe(meter!(SERVICE, "ResolveInDoubt"), async {
            let caller = self
                .auth
                .caller(&request, Role::Admin, &request.get_ref().pool_id)
                .await?;
            let r = request.into_inner();
            let id = PoolId::parse("pool_id", &r.pool_id)?;
            let resolution_id = parse_name("resolution_id", &r.resolution_id, self.max_id_len)?;
            if r.in_doubt_units < 0 {
                return Err(crate::Error::invalid(
                    "in_doubt_units",
                    format!("must not be negative, got {}", r.in_doubt_units),
                ));
            }
            if !(0..=r.in_doubt_units).contains(&r.sold_units) {
                return Err(crate::Error::invalid(
                    "sold_units",
                    format!(
                        "must be between 0 and in_doubt_units ({}), got {}",
                        r.in_doubt_units, r.sold_units
                    ),
                ));
            }
            let resolution = InDoubtResolution {
                resolution_id,
                in_doubt: r.in_doubt_units,
                sold: r.sold_units,
            };
            self.engine
                .resolve_in_doubt(&caller.tenant, &id, &resolution)
                .await?;
            let view = self
                .engine
                .pools(&caller.tenant, std::slice::from_ref(&id))
                .await?
                .pop();
            let view = view.ok_or_else(|| crate::Error::NotFound(format!("pool {id}")))?;
            Ok(pb::ResolveInDoubtResponse {
                pool: Some(pool_pb(view)),
            })
        })
        .await
    }
}

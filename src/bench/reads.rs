//! Storefront reads during a sale: the question of a shop whose product
//! page shows "12 left" and asks holdfast for it on every view. A flash
//! sale's page is viewed far more often than its buy button is pressed,
//! so the read is the hottest call a storefront makes, and it shares the
//! machine with the claims it counts.
//!
//! The probe makes each page's read flat out at `--clients` for
//! `--duration` seconds (a flash sale's `GetSale`, a shop's
//! `GetStockLevels`, a venue's `GetAvailability` of a day's windows) and
//! reports its rate beside the no-op RPC's (`vs_noop`), with each
//! process's CPU and Postgres's transactions a read. Then claim-hot
//! alone, and beside `GetSale`s at [`READ_RATE`] on a connection of their
//! own (a storefront's page views): what the reads cost the sale
//! (`claims_vs_alone`), and how long a read waits then.

use std::time::Duration;

use anyhow::Context;
use sqlx::Connection;
use tonic::transport::Channel;

use super::baselines;
use super::cpu::Watched;
use super::load::{Done, Plan, Run, drive};
use super::workloads::{self, Caller, Workload};
use crate::grpc::pb;

/// Page views a second beside the stampede: a busy storefront's.
const READ_RATE: f64 = 2_000.0;
/// The readers' clients beside the stampede.
const READ_CLIENTS: usize = 16;

/// Runs the probe and prints its lines; the readers beside the stampede
/// call over `own`, a connection of their own.
pub async fn run(
    channels: &[Channel],
    own: Channel,
    caller: &Caller,
    watched: &Watched,
    plan: &Plan,
    database_url: &str,
) -> anyhow::Result<()> {
    let mut pg = sqlx::PgConnection::connect(database_url)
        .await
        .context("the reads probe counts Postgres's transactions")?;
    // The venue; the sale and the stock are every workload's.
    workloads::setup(Workload::SlotConfirm, &channels[0], caller).await?;
    let flat_out = Plan {
        rate: None,
        ..plan.clone()
    };
    let warm = Plan {
        duration: Duration::from_secs(1),
        ..flat_out.clone()
    };
    let noop = baselines::noop(channels, &flat_out, 1).await;
    for page in Page::ALL {
        read(page, channels, &warm, caller).await;
        let cpu_before = watched.sample();
        let xacts_before = transactions(&mut pg).await?;
        let reads = read(page, channels, &flat_out, caller).await;
        let cpu = cpu_before.per_op(&watched.sample(), reads.calls);
        let xacts = transactions(&mut pg).await? - xacts_before;
        println!(
            "probe: reads read={} rps={:.0} noop_rps={:.0} vs_noop={:.2} p50_ms={:.2} p99_ms={:.2} errors={} pg_xacts_per_read={:.2} cpu_us_per_read={cpu}",
            page.rpc(),
            reads.rate(),
            noop.rate(),
            reads.rate() / noop.rate(),
            reads.ms(0.5),
            reads.ms(0.99),
            reads.errors(),
            xacts as f64 / reads.calls.max(1) as f64,
        );
    }

    let page_views = Plan {
        clients: READ_CLIENTS,
        rate: Some(READ_RATE),
        ..flat_out.clone()
    };
    let own = [own];
    workloads::run(Workload::ClaimHot, channels, &warm, caller).await;
    let alone = workloads::run(Workload::ClaimHot, channels, &flat_out, caller).await;
    let (beside, views) = tokio::join!(
        workloads::run(Workload::ClaimHot, channels, &flat_out, caller),
        read(Page::Sale, &own, &page_views, caller),
    );
    println!(
        "probe: reads-beside-claims read=GetSale read_rate={READ_RATE:.0} claims_alone_rps={:.0} claims_beside_rps={:.0} claims_vs_alone={:.2} claims_p99_alone_ms={:.2} claims_p99_beside_ms={:.2} read_p50_ms={:.2} read_p99_ms={:.2} read_errors={}",
        alone.rate(),
        beside.rate(),
        beside.rate() / alone.rate(),
        alone.ms(0.99),
        beside.ms(0.99),
        views.ms(0.5),
        views.ms(0.99),
        views.errors(),
    );
    Ok(())
}

/// The page a read is for, and so which RPC it makes.
#[derive(Debug, Clone, Copy)]
enum Page {
    /// A flash sale's product page: `GetSale` of the claim-hot sale's
    /// product.
    Sale,
    /// A shop's product page: `GetStockLevels` of the workloads' stock.
    Stock,
    /// A venue's booking page: `GetAvailability` of the slot-confirm
    /// venue's next 24 windows.
    Slots,
}

impl Page {
    const ALL: [Page; 3] = [Page::Sale, Page::Stock, Page::Slots];

    fn rpc(self) -> &'static str {
        match self {
            Page::Sale => "GetSale",
            Page::Stock => "GetStockLevels",
            Page::Slots => "GetAvailability",
        }
    }
}

/// `page`'s read, as its page asks for it, driven per `plan`.
async fn read(page: Page, channels: &[Channel], plan: &Plan, caller: &Caller) -> Run {
    let c = caller.clone();
    drive(channels, plan, move |ch, _| {
        let c = c.clone();
        async move {
            let answered = match page {
                Page::Sale => {
                    let r = pb::flash_sale_service_client::FlashSaleServiceClient::new(ch)
                        .get_sale(c.req(pb::GetSaleRequest {
                            sale_id: workloads::hot_sale(&c),
                            product_ids: vec![workloads::HOT_PRODUCT.into()],
                        }))
                        .await?;
                    r.into_inner().sale.is_some_and(|s| !s.products.is_empty())
                }
                Page::Stock => {
                    let r = pb::reservation_service_client::ReservationServiceClient::new(ch)
                        .get_stock_levels(c.req(pb::GetStockLevelsRequest {
                            keys: vec![workloads::stock_key(&c)],
                        }))
                        .await?;
                    r.into_inner().levels.len() == 1
                }
                Page::Slots => {
                    let now = chrono::Utc::now().timestamp();
                    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
                    let r = pb::slot_service_client::SlotServiceClient::new(ch)
                        .get_availability(c.req(pb::GetAvailabilityRequest {
                            venue_id: workloads::venue(&c),
                            from: at(now),
                            to: at(now + 24 * 3600),
                        }))
                        .await?;
                    !r.into_inner().windows.is_empty()
                }
            };
            Ok(Done::ok(if answered { "read" } else { "other" }, 0))
        }
    })
    .await
}

/// Transactions Postgres has committed in the daemon's database so far
/// (a read's statement is one). Postgres publishes these counters up to
/// a second late, so the count waits that long first.
async fn transactions(pg: &mut sqlx::PgConnection) -> anyhow::Result<i64> {
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pg)
    .await?)
}

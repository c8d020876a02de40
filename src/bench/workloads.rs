//! The named workloads: each sets up what it needs through the public API
//! (as a user would) and then drives one hot operation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::ValueEnum;
use tonic::Request;
use tonic::transport::Channel;

use super::baselines::{PgAlternative, PgSteps, UNCAPPED};
use super::load::{Done, Plan, Run, drive};
use crate::grpc::pb::{self, Outcome};

/// A workload's name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Flash-sale claims of one unit of one hot product (never sells out).
    ClaimHot,
    /// The same, on a cap of 1,000 units: sells out early.
    ClaimSellout,
    /// Claims spread over 10,000 products.
    #[value(name = "claim-10k")]
    Claim10k,
    /// Reserve one unit of stock, then consume the reservation.
    ReserveCommit,
    /// Reserve one unit of stock, then release it.
    ReserveRelease,
    /// Sale lock on a distinct card, then complete it.
    LockComplete,
    /// Reserve a time-window slot, then confirm it.
    SlotConfirm,
}

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 7] = [
        Workload::ClaimHot,
        Workload::ClaimSellout,
        Workload::Claim10k,
        Workload::ReserveCommit,
        Workload::ReserveRelease,
        Workload::LockComplete,
        Workload::SlotConfirm,
    ];

    /// The name, as typed.
    pub fn name(self) -> &'static str {
        match self {
            Workload::ClaimHot => "claim-hot",
            Workload::ClaimSellout => "claim-sellout",
            Workload::Claim10k => "claim-10k",
            Workload::ReserveCommit => "reserve-commit",
            Workload::ReserveRelease => "reserve-release",
            Workload::LockComplete => "lock-complete",
            Workload::SlotConfirm => "slot-confirm",
        }
    }

    /// RPCs per operation (two-step workloads make two).
    pub fn rpcs(self) -> u32 {
        match self {
            Workload::ClaimHot | Workload::ClaimSellout | Workload::Claim10k => 1,
            _ => 2,
        }
    }

    /// What an operation that finished leaves in the audit log: the
    /// letter its hold id starts with (then the caller's tag and `n`), the
    /// outcome it counts under, and its audit rows (a take and, for the
    /// two-step workloads, its end). `None` for claim-sellout, whose
    /// operations are mostly refusals that leave nothing.
    pub fn audit_trail(self) -> Option<(char, &'static str, i64)> {
        match self {
            Workload::ClaimHot | Workload::Claim10k => Some(('c', "claimed", 1)),
            Workload::ClaimSellout => None,
            Workload::ReserveCommit => Some(('r', "consumed", 2)),
            Workload::ReserveRelease => Some(('r', "released", 2)),
            Workload::LockComplete => Some(('l', "sold", 2)),
            Workload::SlotConfirm => Some(('s', "confirmed", 2)),
        }
    }

    /// What a shop without holdfast would run instead: the same steps over
    /// as many rows as this workload spreads over, with its cap.
    pub fn pg_alternative(self) -> PgAlternative {
        let (steps, rows, cap) = match self {
            Workload::ClaimHot => (PgSteps::Claim, 1, UNCAPPED),
            Workload::ClaimSellout => (PgSteps::Claim, 1, SELLOUT_CAP),
            Workload::Claim10k => (PgSteps::Claim, SALES_10K * PRODUCTS_PER_SALE, UNCAPPED),
            Workload::ReserveCommit => (PgSteps::ReserveThenCommit, 1, UNCAPPED),
            Workload::ReserveRelease => (PgSteps::ReserveThenRelease, 1, UNCAPPED),
            // Each card is its own row; a card sells once in holdfast, and
            // a run sells far fewer than there are, so no cap is reached.
            Workload::LockComplete => (PgSteps::ReserveThenCommit, CARDS, UNCAPPED),
            // One venue's one window: every slot counts against one row.
            Workload::SlotConfirm => (PgSteps::ReserveThenCommit, 1, UNCAPPED),
        };
        PgAlternative {
            steps,
            rows: u32::try_from(rows).expect("rows fit u32"),
            cap,
        }
    }
}

/// Six random hex digits, a run's tag.
fn fresh_tag() -> Arc<str> {
    Arc::from(format!("{:06x}", rand::random::<u32>() & 0xff_ffff).as_str())
}

/// Who calls, with what key, under which tag (every id of a run carries
/// it, so runs never collide), and as which customers.
#[derive(Clone)]
pub struct Caller {
    /// The API key sent as a bearer token; none for a `--dev` daemon.
    pub key: Option<Arc<str>>,
    /// Six hex digits in every id the caller makes.
    pub tag: Arc<str>,
    /// Units a customer may claim in each sale (`--customer-limit`); 0:
    /// no limit, and claims name no customer.
    pub customer_limit: u32,
    /// The channels each lock-complete card is listed on (`--listings`,
    /// 1-4): `CHANNEL`, then `OTHER_CHANNELS` in order.
    pub listings: u32,
    /// The deadline every call carries (`grpc-timeout`), as a checkout's
    /// stub would set it; none: the bench's own 30 s guard alone.
    pub deadline: Option<Duration>,
}

impl Caller {
    /// A caller with `key` under a fresh random tag.
    pub fn new(key: Option<Arc<str>>) -> Self {
        Self {
            key,
            tag: fresh_tag(),
            customer_limit: 0,
            listings: 1,
            deadline: None,
        }
    }

    /// The same caller under a fresh tag: ids, sales and stock of its own.
    pub fn retagged(&self) -> Self {
        Self {
            tag: fresh_tag(),
            ..self.clone()
        }
    }

    /// The same caller, with sales that limit each customer to `units`
    /// (0: none).
    pub fn with_customer_limit(mut self, units: u32) -> Self {
        self.customer_limit = units;
        self
    }

    /// The same caller, with lock-complete's cards listed on `channels`
    /// channels in all.
    pub fn with_listings(mut self, channels: u32) -> Self {
        self.listings = channels;
        self
    }

    /// The same caller, each call carrying `deadline`: the daemon gives
    /// up on a call past it (tonic answers CANCELLED), as a client's stub
    /// would.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The customer who makes claim number `n`: the K claims n = iK ..
    /// iK + K - 1 are customer i's, so with a limit of K none is refused
    /// for it (call numbers are unique across the bench). Empty without a
    /// limit.
    fn customer(&self, n: u64) -> String {
        match self.customer_limit {
            0 => String::new(),
            k => format!("u{}", n / u64::from(k)),
        }
    }

    /// `msg` with the caller's key, if any.
    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(key) = &self.key
            && let Ok(v) = format!("Bearer {key}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
        if let Some(deadline) = self.deadline {
            req.set_timeout(deadline);
        }
        req
    }
}

/// Cards engaged for `lock-complete`: each operation sells the next one
/// ([`next_card`]), and one finding its card sold reports a conflict.
const CARDS: u64 = 100_000;

/// The card the next lock-complete operation locks. Its own count, not
/// the call number: call numbers also advance for the no-op runs between
/// a workload's runs, so card `n % CARDS` of the half-load run could fall
/// on cards the measured run had sold, and then measured conflicts, the
/// cheaper answer (until 2026-12-05 night). Wraps only after `CARDS`
/// operations.
fn next_card() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) % CARDS
}

/// Sales and products per sale of `claim-10k`.
const SALES_10K: u64 = 20;
const PRODUCTS_PER_SALE: u64 = 500;
/// The cap `claim-sellout` sells out of.
pub const SELLOUT_CAP: i64 = 1_000;

fn sale(caller: &Caller, id: String, products: Vec<(String, i64)>) -> pb::CreateSaleRequest {
    let now = chrono::Utc::now().timestamp();
    pb::CreateSaleRequest {
        sale_id: id.clone(),
        name: id,
        starts_at: Some(prost_types::Timestamp {
            seconds: now - 60,
            nanos: 0,
        }),
        ends_at: Some(prost_types::Timestamp {
            seconds: now + 24 * 3600,
            nanos: 0,
        }),
        products: products
            .into_iter()
            .map(|(product_id, cap)| pb::SaleProduct {
                product_id,
                unit_cap: Some(cap),
            })
            .collect(),
        per_customer_limit: caller.customer_limit,
    }
}

fn ttl(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

/// The product claim-hot claims, in [`hot_sale`].
pub const HOT_PRODUCT: &str = "hot";

/// The sale claim-hot claims from (product [`HOT_PRODUCT`]), which every
/// workload's setup makes.
pub fn hot_sale(caller: &Caller) -> String {
    format!("b{}hot", caller.tag)
}

/// What the daemon counts sold of the product claim workload `w` claims
/// first (claim-hot's and claim-sellout's only one).
pub async fn sold(ch: &Channel, caller: &Caller, w: Workload) -> anyhow::Result<i64> {
    let (sale_id, product) = claimed(w, caller, 0);
    let sale = pb::flash_sale_service_client::FlashSaleServiceClient::new(ch.clone())
        .get_sale(caller.req(pb::GetSaleRequest {
            sale_id,
            product_ids: vec![product],
        }))
        .await?
        .into_inner()
        .sale
        .ok_or_else(|| anyhow::anyhow!("GetSale answered no sale"))?;
    Ok(sale.products.first().map_or(0, |p| p.sold))
}

/// The stock the reservation workloads reserve, which every workload's
/// setup makes.
pub fn stock_key(caller: &Caller) -> pb::StockKey {
    pb::StockKey {
        product_id: format!("sku{}", caller.tag),
        variant_id: String::new(),
    }
}

/// The venue slot-confirm books, which its setup makes.
pub fn venue(caller: &Caller) -> String {
    format!("v{}", caller.tag)
}

/// The pool the workload's Redis limit exercises, as the engine names it
/// (src/bench/redis_limit.rs): the hot sale's product for the claims
/// (claim-sellout's once it sold out, so that the limit is of the refusal
/// its calls get), the stock for the reservations.
pub fn hot_pool(w: Workload, caller: &Caller) -> String {
    let tag = &caller.tag;
    match w {
        Workload::ClaimHot | Workload::Claim10k => {
            format!("sale/{}/{HOT_PRODUCT}", hot_sale(caller))
        }
        Workload::ClaimSellout => format!("sale/b{tag}out/hot"),
        _ => format!("stock/sku{tag}"),
    }
}

/// The channel the cards are engaged on and locked for.
pub const CHANNEL: &str = "storefront";

/// The other channels lock-complete's cards are listed on with
/// `--listings` above 1: a workspace's default non-exclusive ones, with
/// dual listing turned on.
pub const OTHER_CHANNELS: [&str; 3] = ["ebay", "thisorthat", "whatnot"];

/// Card `n` of those the lock-complete Redis limit locks, each once (the
/// workload's own are sold by then), `n` as the driver writes it
/// (`redis_limit::number`).
pub fn baseline_card(caller: &Caller, n: &str) -> String {
    format!("c{}b{n}", caller.tag)
}

/// Engages the cards numbered `numbers` on [`CHANNEL`] for the
/// lock-complete Redis limit ([`baseline_card`]); an engage grants their
/// pools in Redis, as a lock needs.
pub async fn engage_baseline_cards(
    ch: &Channel,
    caller: &Caller,
    numbers: std::ops::Range<u64>,
) -> anyhow::Result<()> {
    let numbers: Vec<u64> = numbers.collect();
    engage(ch, caller, CHANNEL, &numbers, |i| {
        baseline_card(caller, &super::redis_limit::number(i))
    })
    .await
}

/// Engages the cards numbered `numbers`, named by `name`, on `channel`,
/// 5,000 a call.
async fn engage(
    ch: &Channel,
    caller: &Caller,
    channel: &str,
    numbers: &[u64],
    name: impl Fn(u64) -> String,
) -> anyhow::Result<()> {
    let mut channels = pb::channel_service_client::ChannelServiceClient::new(ch.clone());
    for chunk in numbers.chunks(5_000) {
        let cards = chunk
            .iter()
            .map(|&c| pb::EngageCard {
                card_id: name(c),
                external_ref: String::new(),
                metadata_json: String::new(),
            })
            .collect();
        let done = channels
            .engage(caller.req(pb::EngageRequest {
                channel: channel.into(),
                cards,
            }))
            .await?
            .into_inner();
        anyhow::ensure!(
            done.conflicts.is_empty(),
            "engaging cards on {channel}: {:?}",
            done.conflicts.first()
        );
    }
    Ok(())
}

/// Creates a sale; one that exists already (an earlier workload of the
/// run made it) is fine.
async fn create_sale(
    flash: &mut pb::flash_sale_service_client::FlashSaleServiceClient<Channel>,
    caller: &Caller,
    req: pb::CreateSaleRequest,
) -> anyhow::Result<()> {
    match flash.create_sale(caller.req(req)).await {
        Err(s) if s.code() != tonic::Code::AlreadyExists => Err(s.into()),
        _ => Ok(()),
    }
}

/// Creates what `w` needs. Runs once, before the clock starts.
pub async fn setup(w: Workload, ch: &Channel, caller: &Caller) -> anyhow::Result<()> {
    let tag = &caller.tag;
    let mut flash = pb::flash_sale_service_client::FlashSaleServiceClient::new(ch.clone());
    // The hot sale and stock exist for every workload: the Redis baseline
    // runs against them.
    create_sale(
        &mut flash,
        caller,
        sale(
            caller,
            hot_sale(caller),
            vec![(HOT_PRODUCT.into(), 100_000_000)],
        ),
    )
    .await?;
    let mut stock = pb::reservation_service_client::ReservationServiceClient::new(ch.clone());
    stock
        .set_stock(caller.req(pb::SetStockRequest {
            key: Some(stock_key(caller)),
            on_hand: 1_000_000,
            adjustment_id: format!("a{tag}"),
            reason: "bench".into(),
        }))
        .await?;
    match w {
        Workload::ClaimSellout => {
            create_sale(
                &mut flash,
                caller,
                sale(
                    caller,
                    format!("b{tag}out"),
                    vec![("hot".into(), SELLOUT_CAP)],
                ),
            )
            .await?;
        }
        Workload::Claim10k => {
            for s in 0..SALES_10K {
                let products = (0..PRODUCTS_PER_SALE)
                    .map(|p| (format!("p{p}"), 1_000_000))
                    .collect();
                create_sale(
                    &mut flash,
                    caller,
                    sale(caller, format!("b{tag}k{s}"), products),
                )
                .await?;
            }
        }
        Workload::LockComplete => {
            let numbers: Vec<u64> = (0..CARDS).collect();
            let extra = (caller.listings.saturating_sub(1) as usize).min(OTHER_CHANNELS.len());
            let others = &OTHER_CHANNELS[..extra];
            if !others.is_empty() {
                let mut registry =
                    pb::channel_service_client::ChannelServiceClient::new(ch.clone());
                // Each sale would tell those channels' satellites that the
                // bench's cards sold: refused where one is configured.
                let satellites = registry
                    .list_satellites(caller.req(pb::ListSatellitesRequest {}))
                    .await?
                    .into_inner()
                    .satellites;
                if let Some(s) = satellites
                    .iter()
                    .find(|s| others.contains(&s.channel.as_str()))
                {
                    anyhow::bail!(
                        "--listings {} lists the bench's cards on {}, whose satellite ({}) would be sent a webhook for every sale; run with --listings 1, or against a workspace without satellites on {}",
                        caller.listings,
                        s.channel,
                        s.base_url,
                        others.join(", ")
                    );
                }
                registry
                    .update_channel_settings(
                        caller.req(pb::UpdateChannelSettingsRequest { dual_listing: true }),
                    )
                    .await?;
            }
            for channel in std::iter::once(&CHANNEL).chain(others) {
                engage(ch, caller, channel, &numbers, |c| format!("c{tag}n{c}")).await?;
            }
        }
        Workload::SlotConfirm => {
            let mut slots = pb::slot_service_client::SlotServiceClient::new(ch.clone());
            slots
                .set_venue(caller.req(pb::SetVenueRequest {
                    venue_id: venue(caller),
                    time_zone: "UTC".into(),
                    window_minutes: 60,
                }))
                .await?;
            let hours = (1..=7)
                .flat_map(|weekday| {
                    (0..24).map(move |hour| pb::HourSlots {
                        weekday,
                        hour,
                        slots_per_hour: 100_000,
                    })
                })
                .collect();
            slots
                .set_schedule(caller.req(pb::SetScheduleRequest {
                    venue_id: venue(caller),
                    hours,
                }))
                .await?;
        }
        _ => {}
    }
    Ok(())
}

/// Drives `w` over `channels` per `plan`.
pub async fn run(w: Workload, channels: &[Channel], plan: &Plan, caller: &Caller) -> Run {
    spread(w, channels, plan, std::slice::from_ref(caller)).await
}

/// Drives `w` over `channels` per `plan`, operation `n` made by caller
/// `n % callers.len()` (each a shop of its own, for the shops probe).
pub async fn spread(w: Workload, channels: &[Channel], plan: &Plan, callers: &[Caller]) -> Run {
    let callers: Arc<[Caller]> = Arc::from(callers);
    drive(channels, plan, move |ch, n| {
        let c = callers[(n % callers.len() as u64) as usize].clone();
        async move {
            match w {
                Workload::ClaimHot | Workload::ClaimSellout | Workload::Claim10k => {
                    claim(w, ch, n, &c).await
                }
                Workload::ReserveCommit | Workload::ReserveRelease => {
                    reserve_then(w, ch, n, &c).await
                }
                Workload::LockComplete => lock_then_complete(ch, n, &c).await,
                Workload::SlotConfirm => slot_then_confirm(ch, n, &c, None).await,
            }
        }
    })
    .await
}

/// The sale and product claim number `n` of workload `w` claims.
fn claimed(w: Workload, c: &Caller, n: u64) -> (String, String) {
    let tag = &c.tag;
    match w {
        Workload::ClaimHot => (hot_sale(c), HOT_PRODUCT.to_string()),
        Workload::ClaimSellout => (format!("b{tag}out"), "hot".to_string()),
        _ => (
            format!("b{tag}k{}", n % SALES_10K),
            format!("p{}", (n / SALES_10K) % PRODUCTS_PER_SALE),
        ),
    }
}

/// Claim number `n` of a claim workload: one unit of its hot product
/// (claim-hot, claim-sellout) or of product `n` of the 10,000 (claim-10k).
pub async fn claim(w: Workload, ch: Channel, n: u64, c: &Caller) -> Result<Done, tonic::Status> {
    let tag = &c.tag;
    let (sale_id, product) = claimed(w, c, n);
    let r = pb::flash_sale_service_client::FlashSaleServiceClient::new(ch)
        .claim(c.req(pb::ClaimRequest {
            claim_id: format!("c{tag}n{n}"),
            sale_id,
            customer_id: c.customer(n),
            lines: vec![pb::ClaimLine {
                product_id: product,
                quantity: 1,
            }],
        }))
        .await?
        .into_inner();
    Ok(match r.outcome() {
        Outcome::Ok => Done::ok("claimed", 1),
        Outcome::SoldOut => Done::ok("sold_out", 0),
        _ => Done::ok("other", 0),
    })
}

async fn reserve_then(w: Workload, ch: Channel, n: u64, c: &Caller) -> Result<Done, tonic::Status> {
    let tag = &c.tag;
    let mut client = pb::reservation_service_client::ReservationServiceClient::new(ch);
    let id = format!("r{tag}n{n}");
    let r = client
        .reserve(c.req(pb::ReserveRequest {
            reservation_id: id.clone(),
            reference: String::new(),
            lines: vec![pb::ReservationLine {
                key: Some(stock_key(c)),
                quantity: 1,
            }],
            ttl: ttl(60),
        }))
        .await?
        .into_inner();
    if r.outcome() != pb::ReserveOutcome::Reserved {
        return Ok(Done::ok("short", 0));
    }
    if w == Workload::ReserveCommit {
        client
            .consume_reservation(c.req(pb::ConsumeReservationRequest {
                reservation_id: id,
                order_id: format!("o{n}"),
            }))
            .await?;
        Ok(Done::ok("consumed", 1))
    } else {
        client
            .release_reservation(c.req(pb::ReleaseReservationRequest { reservation_id: id }))
            .await?;
        Ok(Done::ok("released", 0))
    }
}

async fn lock_then_complete(ch: Channel, n: u64, c: &Caller) -> Result<Done, tonic::Status> {
    let tag = &c.tag;
    let card = next_card();
    let mut client = pb::sale_lock_service_client::SaleLockServiceClient::new(ch);
    let lock_ref = format!("l{tag}n{n}");
    let r = client
        .acquire_sale_locks(c.req(pb::AcquireSaleLocksRequest {
            lock_ref: lock_ref.clone(),
            channel: CHANNEL.into(),
            card_ids: vec![format!("c{tag}n{card}")],
            ttl: ttl(60),
        }))
        .await?
        .into_inner();
    if r.outcome() != pb::AcquireOutcome::Acquired {
        return Ok(Done::ok("conflict", 0));
    }
    client
        .complete_sale_locks(c.req(pb::CompleteSaleLocksRequest {
            lock_ref,
            order_id: format!("o{n}"),
        }))
        .await?;
    Ok(Done::ok("sold", 1))
}

/// Slot number `n` of slot-confirm: a slot of the window that holds `at`
/// (now's when `None`), then its confirmation.
pub async fn slot_then_confirm(
    ch: Channel,
    n: u64,
    c: &Caller,
    at: Option<prost_types::Timestamp>,
) -> Result<Done, tonic::Status> {
    let tag = &c.tag;
    let mut client = pb::slot_service_client::SlotServiceClient::new(ch);
    let id = format!("s{tag}n{n}");
    let r = client
        .reserve_slot(c.req(pb::ReserveSlotRequest {
            reservation_id: id.clone(),
            venue_id: venue(c),
            at,
            ttl: ttl(60),
            reference: String::new(),
        }))
        .await?
        .into_inner();
    if r.outcome() != pb::SlotOutcome::Reserved {
        return Ok(Done::ok("full", 0));
    }
    client
        .confirm_slot(c.req(pb::ConfirmSlotRequest {
            reservation_id: id,
            payment_id: format!("p{n}"),
        }))
        .await?;
    Ok(Done::ok("confirmed", 1))
}

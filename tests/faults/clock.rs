//! A step of the Redis host's wall clock must not end holds early.
//!
//! Redis runs with `clock_shift.c` preloaded, which moves its wall clock by
//! the seconds written in a file, as `date -s` or a bad NTP step would move
//! its host's. The daemon follows Redis's clock on its own monotonic clock
//! (src/store/redis/clock.rs), so a hold taken before a ten-minute forward
//! step still holds its unit after it, and holds still end when they should.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast::grpc::pb::flash_sale_service_client::FlashSaleServiceClient;
use holdfast::grpc::pb::{self, HoldState, Outcome};
use tonic::transport::Channel;

use crate::TempDir;
use crate::cluster::{Daemon, Postgres, Redis};

/// How far Redis's clock is stepped forward: longer than the hold's TTL.
const STEP_SECS: i64 = 600;
/// The hold's TTL.
const TTL_SECS: i64 = 120;

/// Builds the shim into `dir` with the C compiler Rust's linker uses.
fn build_shim(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("clock_shift.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/faults/clock_shift.c");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc runs (the Rust toolchain's linker needs it)");
    assert!(status.success(), "cannot build {}", src.display());
    out
}

fn hold(id: &str, ttl_secs: i64) -> pb::CreateCartHoldRequest {
    pb::CreateCartHoldRequest {
        hold_id: id.into(),
        sale_id: "s".into(),
        customer_id: String::new(),
        lines: vec![pb::ClaimLine {
            product_id: "card".into(),
            quantity: 1,
        }],
        ttl: Some(prost_types::Duration {
            seconds: ttl_secs,
            nanos: 0,
        }),
    }
}

async fn state(client: &mut FlashSaleServiceClient<Channel>, id: &str) -> HoldState {
    client
        .get_cart_hold(pb::GetCartHoldRequest { hold_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .hold
        .unwrap()
        .state()
}

/// The clock offset the daemon reports, from its metrics page.
async fn reported_offset(daemon: &Daemon) -> Option<f64> {
    daemon
        .scrape()
        .await
        .lines()
        .find(|l| l.starts_with("holdfast_redis_clock_offset_seconds "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_step_of_redis_clock_ends_no_hold_early() {
    let tmp = TempDir::new("clock");
    let dir = tmp.0.clone();
    let shift = dir.join("shift");
    std::fs::write(&shift, "0").unwrap();
    let shim = build_shim(&dir);
    let redis = Redis::start_with_env(
        &dir,
        vec![
            ("LD_PRELOAD".into(), shim.display().to_string()),
            ("CLOCK_SHIFT_FILE".into(), shift.display().to_string()),
        ],
    );
    let pg = Postgres::start(&dir);
    let daemon = Daemon::start(&dir, redis.port, &pg.url());
    let channel = daemon.channel().await;
    let mut client = FlashSaleServiceClient::new(channel);
    client
        .create_sale(crate::live_sale("s", &[("card", 1)]))
        .await
        .unwrap();
    let first = client.create_cart_hold(hold("a", TTL_SECS)).await.unwrap();
    assert_eq!(first.into_inner().outcome(), Outcome::Ok);

    // Step Redis's clock past the hold's expiry; wait until the daemon has
    // seen the step (its watch compares the clocks every 200 ms).
    std::fs::write(&shift, STEP_SECS.to_string()).unwrap();
    let started = Instant::now();
    loop {
        match reported_offset(&daemon).await {
            Some(s) if s >= (STEP_SECS - 5) as f64 => break,
            seen => assert!(
                started.elapsed() < Duration::from_secs(10),
                "the daemon never reported the step (last offset {seen:?})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The hold still holds its unit, and gives the sweeper (bound: 1 s)
    // time to get it wrong before looking again.
    for round in 0..2 {
        let other = client
            .create_cart_hold(hold(&format!("b{round}"), TTL_SECS))
            .await
            .unwrap();
        assert_eq!(
            other.into_inner().outcome(),
            Outcome::SoldOut,
            "a second buyer got the card while the first hold was live"
        );
        assert_eq!(state(&mut client, "a").await, HoldState::Active);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    // Holds still end when they should on the engine's clock.
    client
        .release_cart_hold(pb::ReleaseCartHoldRequest {
            hold_id: "a".into(),
        })
        .await
        .unwrap();
    let short = client.create_cart_hold(hold("c", 1)).await.unwrap();
    assert_eq!(short.into_inner().outcome(), Outcome::Ok);
    let started = Instant::now();
    while state(&mut client, "c").await != HoldState::Expired {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a one-second hold never expired after the step"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("clock: step_secs={STEP_SECS} early_expiries=0 late_hold_expired=true");
}

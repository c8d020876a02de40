//! Randomised tests against the real daemon, Redis and Postgres.
//!
//! - Random interleavings of claim, hold, extend, commit, release, retries
//!   and waits (which let holds expire) never break the pool invariant
//!   (sold + held + in doubt <= cap), and sold is exactly what the client
//!   was told it bought.
//! - Random, mostly malformed claims get only the statuses a client is
//!   promised, and a refused one changes nothing.
//!
//! Each run draws a seed and prints it; `HOLDFAST_PROPTEST_SEED=N` replays
//! one.

use std::collections::HashMap;
use std::time::Duration;

use holdfast::grpc::pb::{self, HoldState, Outcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

use crate::helpers::{TestApp, cart_hold, claim, spawn_app};

/// Products and their caps: small, so the pool runs dry often.
const PRODUCTS: [(&str, i64); 3] = [("a", 5), ("b", 3), ("c", 8)];
const STEPS: usize = 220;

fn seed() -> u64 {
    let seed = std::env::var("HOLDFAST_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("property seed: HOLDFAST_PROPTEST_SEED={seed}");
    seed
}

fn random_lines(rng: &mut StdRng) -> Lines {
    let mut lines: Lines = Vec::new();
    for (p, _) in PRODUCTS {
        if lines.is_empty() || rng.random_bool(0.3) {
            lines.push((p, rng.random_range(1..=3)));
        }
    }
    lines
}

/// A request's lines: (product, quantity).
type Lines = Vec<(&'static str, i64)>;

/// What the client was told.
#[derive(Default)]
struct Model {
    sold: HashMap<&'static str, i64>,
    /// Hold id -> (lines, how it ended as far as the client knows).
    holds: HashMap<String, (Lines, Option<HoldState>)>,
    /// Claim id -> (lines, whether it was sold).
    claims: HashMap<String, (Lines, bool)>,
}

impl Model {
    fn sell(&mut self, lines: &[(&'static str, i64)]) {
        for (p, q) in lines {
            *self.sold.entry(p).or_default() += q;
        }
    }

    fn pick_hold(&self, rng: &mut StdRng) -> Option<String> {
        let mut ids: Vec<&String> = self.holds.keys().collect();
        ids.sort();
        (!ids.is_empty()).then(|| ids[rng.random_range(0..ids.len())].clone())
    }
}

async fn check_invariant(app: &TestApp, model: &Model, step: usize, op: &str) {
    for (p, cap) in PRODUCTS {
        let s = app.stock("prop", p).await;
        let told = model.sold.get(p).copied().unwrap_or(0);
        assert_eq!(
            s.sold, told,
            "step {step} ({op}): {p} sold {} but clients were told {told}",
            s.sold
        );
        assert!(
            s.sold + s.held + s.in_doubt <= cap && s.remaining >= 0,
            "step {step} ({op}): {p} broke the invariant: {s:?}"
        );
    }
}

#[tokio::test]
async fn random_interleavings_never_break_the_pool_invariant() {
    let mut rng = StdRng::seed_from_u64(seed());
    let app = spawn_app().await;
    let caps: Vec<(&str, Option<i64>)> = PRODUCTS.iter().map(|(p, c)| (*p, Some(*c))).collect();
    app.live_sale("prop", &caps, 0).await;
    let mut flash = app.flash();
    let mut model = Model::default();
    for step in 0..STEPS {
        let op = rng.random_range(0..100);
        let name = match op {
            0..=19 => {
                // A claim, or a retry of an earlier one with the same id.
                let retry = rng.random_bool(0.2) && !model.claims.is_empty();
                let (id, lines) = if retry {
                    let mut ids: Vec<&String> = model.claims.keys().collect();
                    ids.sort();
                    let id = ids[rng.random_range(0..ids.len())].clone();
                    (id.clone(), model.claims[&id].0.clone())
                } else {
                    (format!("c{step}"), random_lines(&mut rng))
                };
                let r = flash
                    .claim(claim(&id, "prop", &lines))
                    .await
                    .unwrap()
                    .into_inner();
                let sold = r.outcome() == Outcome::Ok;
                match model.claims.get(&id) {
                    Some((_, was)) => {
                        // A refused claim is not remembered (a retry
                        // re-evaluates); a sold one answers the same again.
                        assert!(
                            !*was || sold,
                            "step {step}: a sold claim's retry said {r:?}"
                        );
                        if sold && !*was {
                            model.sell(&lines);
                        }
                    }
                    None if sold => model.sell(&lines),
                    None => {}
                }
                let entry = model.claims.entry(id).or_insert((lines, false));
                entry.1 |= sold;
                "claim"
            }
            20..=44 => {
                let id = format!("h{step}");
                let lines = random_lines(&mut rng);
                let ttl = [1, 1, 2, 30][rng.random_range(0..4)];
                let r = flash
                    .create_cart_hold(cart_hold(&id, "prop", &lines, ttl))
                    .await
                    .unwrap()
                    .into_inner();
                if r.outcome() == Outcome::Ok {
                    model.holds.insert(id, (lines, None));
                }
                "hold"
            }
            45..=64 => {
                let Some(id) = model.pick_hold(&mut rng) else {
                    continue;
                };
                let r = flash
                    .commit_cart_hold(pb::CommitCartHoldRequest {
                        hold_id: id.clone(),
                    })
                    .await;
                let (lines, ended) = model.holds.get(&id).cloned().unwrap();
                match r {
                    Ok(r) => {
                        let state = r.into_inner().hold.unwrap().state();
                        assert_eq!(state, HoldState::Committed, "step {step}");
                        assert!(
                            matches!(ended, None | Some(HoldState::Committed)),
                            "step {step}: {id} committed after it ended as {ended:?}"
                        );
                        if ended.is_none() {
                            model.sell(&lines);
                        }
                        model.holds.get_mut(&id).unwrap().1 = Some(HoldState::Committed);
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::FailedPrecondition, "step {step}: {e:?}");
                        assert_ne!(ended, Some(HoldState::Committed), "step {step}");
                        // Expired (or released): it can never be sold now.
                        model.holds.get_mut(&id).unwrap().1 = ended.or(Some(HoldState::Expired));
                    }
                }
                "commit"
            }
            65..=79 => {
                let Some(id) = model.pick_hold(&mut rng) else {
                    continue;
                };
                let r = flash
                    .release_cart_hold(pb::ReleaseCartHoldRequest {
                        hold_id: id.clone(),
                    })
                    .await;
                let ended = model.holds[&id].1;
                match r {
                    Ok(r) => {
                        let state = r.into_inner().hold.unwrap().state();
                        assert_ne!(state, HoldState::Active, "step {step}");
                        if state == HoldState::Committed {
                            assert!(matches!(ended, None | Some(HoldState::Committed)));
                        } else {
                            assert_ne!(ended, Some(HoldState::Committed), "step {step}");
                            model.holds.get_mut(&id).unwrap().1 = Some(state);
                        }
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::FailedPrecondition, "step {step}: {e:?}");
                        assert_eq!(ended, Some(HoldState::Committed), "step {step}");
                    }
                }
                "release"
            }
            80..=89 => {
                let Some(id) = model.pick_hold(&mut rng) else {
                    continue;
                };
                let r = flash
                    .extend_cart_hold(pb::ExtendCartHoldRequest {
                        hold_id: id.clone(),
                        ttl: Some(prost_types::Duration {
                            seconds: 2,
                            nanos: 0,
                        }),
                        extension_id: format!("x{step}"),
                    })
                    .await;
                match r {
                    Ok(r) => {
                        let state = r.into_inner().hold.unwrap().state();
                        assert_eq!(state, HoldState::Active, "step {step}");
                        assert_eq!(
                            model.holds[&id].1, None,
                            "step {step}: {id} extended after it ended"
                        );
                    }
                    Err(e) => assert!(
                        matches!(e.code(), Code::FailedPrecondition),
                        "step {step}: {e:?}"
                    ),
                }
                "extend"
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..900))).await;
                "wait"
            }
        };
        check_invariant(&app, &model, step, name).await;
    }

    // Every hold ends (by hand or by expiry), nothing stays held, and
    // Postgres records exactly what the clients were told they bought.
    for id in model.holds.keys() {
        let _ = flash
            .release_cart_hold(pb::ReleaseCartHoldRequest {
                hold_id: id.clone(),
            })
            .await;
    }
    for (p, _) in PRODUCTS {
        assert_eq!(app.stock("prop", p).await.held, 0, "{p} still held");
        let told = model.sold.get(p).copied().unwrap_or(0);
        app.eventually("Postgres to record every sale", || async {
            (app.pg_sold("prop", p).await == told).then_some(())
        })
        .await;
    }
    app.shutdown().await;
}

/// An id-ish string: usually fine, sometimes long, empty or full of the
/// characters a key must never carry.
fn random_id(rng: &mut StdRng, good: &[&str]) -> String {
    const NASTY: [&str; 8] = [":", "{", "}", " ", "é", "\n", "/", "*"];
    match rng.random_range(0..10) {
        0..=5 => good[rng.random_range(0..good.len())].to_string(),
        6 => String::new(),
        7 => "x".repeat(rng.random_range(100..300)),
        _ => format!(
            "id{}{}",
            NASTY[rng.random_range(0..NASTY.len())],
            rng.random_range(0..9)
        ),
    }
}

fn random_quantity(rng: &mut StdRng) -> i64 {
    const EDGES: [i64; 8] = [i64::MIN, -1, 0, 1, 2, 1_000_000, 1_000_001, i64::MAX];
    if rng.random_bool(0.5) {
        rng.random_range(1..=3)
    } else {
        EDGES[rng.random_range(0..EDGES.len())]
    }
}

async fn stock_of(app: &TestApp) -> (pb::ProductStock, pb::ProductStock) {
    (app.stock("fz", "a").await, app.stock("fz", "b").await)
}

#[tokio::test]
async fn random_requests_get_a_promised_status_and_refusals_change_nothing() {
    let mut rng = StdRng::seed_from_u64(seed());
    let app = spawn_app().await;
    app.live_sale("fz", &[("a", Some(1_000)), ("b", Some(1_000))], 0)
        .await;
    let mut flash = app.flash();
    let mut statuses: HashMap<Code, usize> = HashMap::new();
    for i in 0..300 {
        let n = [0, 1, 1, 2, 3, 101][rng.random_range(0..6)];
        let mut req = claim(&random_id(&mut rng, &[&format!("f{i}")]), "", &[]);
        req.sale_id = random_id(&mut rng, &["fz", "fz", "nope"]);
        req.lines = (0..n)
            .map(|_| pb::ClaimLine {
                product_id: random_id(&mut rng, &["a", "b", "zz"]),
                quantity: random_quantity(&mut rng),
            })
            .collect();
        let before = stock_of(&app).await;
        let r = flash.claim(req.clone()).await;
        let after = stock_of(&app).await;
        let code = match &r {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        *statuses.entry(code).or_default() += 1;
        assert!(
            matches!(
                code,
                Code::Ok | Code::InvalidArgument | Code::NotFound | Code::AlreadyExists
            ),
            "{req:?} got {r:?}"
        );
        let sold = matches!(&r, Ok(r) if r.get_ref().outcome() == Outcome::Ok);
        if sold {
            let units = |p: &str| -> i64 {
                req.lines
                    .iter()
                    .filter(|l| l.product_id == p)
                    .map(|l| l.quantity)
                    .sum()
            };
            assert_eq!(after.0.sold - before.0.sold, units("a"), "{req:?}");
            assert_eq!(after.1.sold - before.1.sold, units("b"), "{req:?}");
        } else {
            assert_eq!(
                before, after,
                "{req:?} was refused ({r:?}) but changed stock"
            );
        }
        if let Err(e) = &r
            && e.code() == Code::InvalidArgument
        {
            assert!(!e.message().is_empty(), "INVALID_ARGUMENT names the field");
        }
    }
    println!("fuzz statuses: {statuses:?}");
    assert!(statuses.get(&Code::InvalidArgument).copied().unwrap_or(0) > 0);
    assert!(statuses.get(&Code::Ok).copied().unwrap_or(0) > 0);
    app.shutdown().await;
}

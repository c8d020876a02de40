//! What operators and tools see: health, reflection (grpcurl with no proto
//! files), Prometheus metrics, and the README's grpcurl session.

use std::process::Command;

use holdfast::grpc::pb::Outcome;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{claim, spawn_app};

#[tokio::test]
async fn health_reports_every_service_serving() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel());
    for service in [
        "",
        "holdfast.v1.FlashSaleService",
        "holdfast.v1.AdminService",
    ] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "service {service:?}");
    }
    app.shutdown().await;
}

/// The /metrics page's body.
pub(crate) async fn scrape(app: &crate::helpers::TestApp) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(app.metrics_addr)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Parses Prometheus text exposition strictly enough to catch a broken
/// page: every sample line is `name{labels} value` with a numeric value.
pub(crate) fn samples(body: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            if l.starts_with('#') {
                assert!(
                    l.starts_with("# HELP ") || l.starts_with("# TYPE "),
                    "bad comment line {l:?}"
                );
                return None;
            }
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let name_ok = series
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            assert!(name_ok, "bad metric name in {l:?}");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            Some((series.to_owned(), value))
        })
        .collect()
}

pub(crate) fn value(samples: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s.starts_with(name) && labels.iter().all(|l| s.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn a_scrape_parses_and_counters_move_with_calls() {
    let app = spawn_app().await;
    app.live_sale("m", &[("p", Some(1))], 0).await;
    let before = samples(&scrape(&app).await);
    app.flash()
        .claim(claim("c1", "m", &[("p", 1)]))
        .await
        .unwrap();
    let r = app
        .flash()
        .claim(claim("c2", "m", &[("p", 1)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), Outcome::SoldOut);
    let _ = app
        .flash()
        .claim(claim("", "m", &[("p", 1)]))
        .await
        .unwrap_err();
    let after = samples(&scrape(&app).await);

    let rpc = |s: &[(String, f64)], code: &str| {
        value(
            s,
            "holdfast_rpc_total",
            &[
                "service=\"FlashSaleService\"",
                "method=\"Claim\"",
                &format!("code=\"{code}\""),
            ],
        )
    };
    assert!(rpc(&after, "OK") - rpc(&before, "OK") >= 2.0);
    assert!(rpc(&after, "INVALID_ARGUMENT") - rpc(&before, "INVALID_ARGUMENT") >= 1.0);
    let outcome = |s: &[(String, f64)], o: &str| {
        value(
            s,
            "holdfast_engine_outcomes_total",
            &["job=\"flash\"", &format!("outcome=\"{o}\"")],
        )
    };
    assert!(outcome(&after, "claimed") - outcome(&before, "claimed") >= 1.0);
    assert!(outcome(&after, "sold_out") - outcome(&before, "sold_out") >= 1.0);
    let script = |s: &[(String, f64)]| {
        value(
            s,
            "holdfast_redis_script_duration_seconds_count",
            &["script=\"claim\""],
        )
    };
    assert!(script(&after) - script(&before) >= 2.0);
    assert!(
        value(
            &after,
            "holdfast_rpc_duration_seconds_bucket",
            &["method=\"Claim\""]
        ) > 0.0
    );
    // The drainer writes the claims to Postgres (a transaction: a wait on
    // the Postgres pool).
    let waits = |s: &[(String, f64)]| {
        value(
            s,
            "holdfast_pool_wait_seconds_count",
            &["pool=\"postgres\""],
        )
    };
    app.eventually("a pool wait and the drainer's backlog", || async {
        let now = samples(&scrape(&app).await);
        (waits(&now) > waits(&before)
            && now.iter().any(|(n, _)| n == "holdfast_drainer_lag_events"))
        .then_some(())
    })
    .await;
    app.shutdown().await;
}

fn grpcurl_available() -> bool {
    Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn grpcurl_lists_every_service_through_reflection() {
    assert!(
        grpcurl_available(),
        "grpcurl is not installed: deploy/test.sh installs it"
    );
    let app = spawn_app().await;
    // Async: a blocking wait would stall the runtime the daemon runs on.
    let out = tokio::process::Command::new("grpcurl")
        .args(["-plaintext", &app.addr.to_string(), "list"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for service in [
        "holdfast.v1.FlashSaleService",
        "holdfast.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            listed.lines().any(|l| l == service),
            "{service} missing from:\n{listed}"
        );
    }
    app.shutdown().await;
}

/// The README's grpcurl session is copy-pasteable: run it, as written,
/// against a daemon (only the address differs).
#[tokio::test]
async fn the_readme_grpcurl_session_works_as_written() {
    assert!(
        grpcurl_available(),
        "grpcurl is not installed: deploy/test.sh installs it"
    );
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- grpcurl-session -->")
        .expect("the README marks its grpcurl session");
    let end = readme[start..]
        .find("<!-- /grpcurl-session -->")
        .expect("the session's end marker")
        + start;
    let session: String = readme[start..end]
        .lines()
        .filter(|l| !l.starts_with("```") && !l.starts_with("<!--"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(session.contains("grpcurl"), "the session has commands");

    let app = spawn_app().await;
    let script = format!(
        "set -euo pipefail\n{}",
        session.replace("127.0.0.1:50051", &app.addr.to_string())
    );
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the session failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"OUTCOME_OK\""),
        "the claim succeeded:\n{stdout}"
    );
    assert!(
        stdout.contains("\"OUTCOME_SOLD_OUT\""),
        "the last claim sold out:\n{stdout}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn admin_get_pool_shows_the_grant_and_the_counts() {
    use holdfast::grpc::pb::GetPoolRequest;
    let app = spawn_app().await;
    app.live_sale("g", &[("p", Some(7))], 0).await;
    app.flash()
        .claim(claim("c", "g", &[("p", 2)]))
        .await
        .unwrap();
    let pool = app.pool("sale/g/p").await;
    assert_eq!(
        (
            pool.capacity,
            pool.sold,
            pool.held,
            pool.available,
            pool.in_doubt
        ),
        (7, 2, 0, 5, 0)
    );
    assert_eq!(
        pool.granted_to_redis, 4,
        "half of the capacity (rounded up) was delegated on first use"
    );
    let err = app
        .admin()
        .get_pool(GetPoolRequest {
            pool_id: "sale/g/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = app
        .admin()
        .get_pool(GetPoolRequest {
            pool_id: "sale/{g}/p".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    app.shutdown().await;
}

/// A take that Redis could not serve from its grant, and that waited for
/// Postgres to grant more, is counted in `holdfast_grant_wait_seconds`;
/// one served from the grant is not.
#[tokio::test]
async fn a_take_that_waited_for_a_grant_is_counted() {
    let app = spawn_app().await;
    app.live_sale("g", &[("p", Some(10))], 0).await;
    let waits = |s: &[(String, f64)]| value(s, "holdfast_grant_wait_seconds_count", &[]);
    let before = waits(&samples(&scrape(&app).await));
    let one = app.flash().claim(claim("c1", "g", &[("p", 1)])).await;
    assert_eq!(one.unwrap().into_inner().outcome(), Outcome::Ok);
    let served = waits(&samples(&scrape(&app).await));
    assert_eq!(served, before, "served from the grant Redis had");
    // The rest: more than Redis was granted when the sale was made.
    let rest = app.flash().claim(claim("c2", "g", &[("p", 9)])).await;
    assert_eq!(rest.unwrap().into_inner().outcome(), Outcome::Ok);
    let after = waits(&samples(&scrape(&app).await));
    assert_eq!(after, before + 1.0, "one take waited");
    app.shutdown().await;
}
